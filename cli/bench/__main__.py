"""``python -m moefx.cli.bench``: the layer benchmark (how ``--processes`` starts each child)."""

import sys

from moefx.cli.bench.command import main

if __name__ == "__main__":
    sys.exit(main())
