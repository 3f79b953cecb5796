#!/usr/bin/env bash
# Sets everything up, then runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=.venv/bin/python; [ -n "${VIRTUAL_ENV:-}" ] && py=python
exec "$py" -m pytest "$@"
