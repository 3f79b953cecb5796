"""The layer benchmark; its code lives in ``moefx.cli.bench`` so that ``moefx bench`` runs it too.

    python benchmarks/bench_layer.py --help
"""

import sys

from moefx.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
