#!/usr/bin/env bash
# Sets up a virtual environment in .venv with moefx (editable) and its test extras.
#
# torch: an importable torch is kept as it is (CPU or CUDA, 2.8 or newer). Without one, the
# tested version is installed by pin: on machines with a local CPU wheel (pip find-links) that
# wheel is used; elsewhere PyPI's build for the platform (CUDA on Linux). A bare `torch`
# requirement would instead pull the newest CUDA build, several GB. Override with TORCH_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${VIRTUAL_ENV:-}" ]; then
  py=python
else
  # System site-packages stay visible so an installed (e.g. CUDA) torch is reused.
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv --system-site-packages .venv
  py=.venv/bin/python
fi

if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
# pip's warnings about find-links folders this machine lacks are noise; its failure is not: a failed
# install must stop here, not surface later as a missing moefx.kernels.
log=$(mktemp)
status=0
"$py" -m pip install -q -e ".[test]" >"$log" 2>&1 || status=$?
grep -v "is ignored: it is neither a file nor a directory" "$log" || true
rm -f "$log"
if [ "$status" -ne 0 ]; then
  echo "setup: 'pip install -e .[test]' failed (exit $status), see pip's error above; free disk space or fix the index, then rerun" >&2
  exit "$status"
fi
"$py" -c "import torch, moefx; print(f'moefx {moefx.__version__} with torch {torch.__version__} in {__import__(\"sys\").prefix}')"
