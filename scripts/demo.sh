#!/usr/bin/env bash
# Sets everything up, then runs the bundled example: a tiny Llama upcycled into an MoE model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=.venv/bin/python; [ -n "${VIRTUAL_ENV:-}" ] && py=python
exec "$py" examples/upcycle_llama.py "$@"
