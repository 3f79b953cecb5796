#!/usr/bin/env bash
# Sets everything up, then runs the main job on a bundled example: `moefx convert` turns a tiny
# Llama (random weights) into an MoE model in ./tiny_llama-moefx, and `moefx inspect` shows it.
# Extra arguments go to `moefx convert` (e.g. --experts 16 --top-k 4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
py=.venv/bin/python; [ -n "${VIRTUAL_ENV:-}" ] && py=python
"$py" -m moefx convert examples/tiny_llama.py --experts 8 --top-k 2 -o tiny_llama-moefx --force "$@"
exec "$py" -m moefx inspect tiny_llama-moefx
