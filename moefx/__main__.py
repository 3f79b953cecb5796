"""``python -m moefx``: the ``moefx`` command."""

import sys

from moefx.cli.main import main

sys.exit(main())
