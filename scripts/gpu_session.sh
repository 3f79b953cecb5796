#!/usr/bin/env bash
# Everything moefx checks on a CUDA GPU, for a machine with no network whose python already has
# torch, triton and transformers (the device tool's machines; any CUDA box works too).
#
#   scripts/gpu_session.sh tests            # the tests that run on the GPU (Triton kernels, CUDA offload)
#   scripts/gpu_session.sh bench [ARGS...]  # the issue's layer benchmark, a process and bench-SHAPE.json per
#                                           # shape; ARGS: one `moefx bench` run with them instead (bench.json)
#   scripts/gpu_session.sh all              # both, tests first
#
# moefx is installed from this checkout without dependencies (nothing is fetched). Logs and the
# benchmark's JSON go to $OUT (the device tool brings that folder back), else /tmp/moefx-gpu.
# Each part fits in one 10-minute device call; the benchmark's first steps per shape include
# Triton's compilation and the tile timing, which the warm-up steps absorb.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-all}"
[ $# -gt 0 ] && shift
out="${OUT:-/tmp/moefx-gpu}"
mkdir -p "$out"
py="${PYTHON:-python3}"

"$py" -m pip install -q --no-deps --no-build-isolation -e .  # editable: quick, and safe to repeat
{
  nvidia-smi -L || true
  "$py" -c "import torch, triton, moefx; print('torch', torch.__version__, 'triton', triton.__version__, 'moefx', moefx.__version__, 'from', moefx.__file__); print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE')"
  "$py" -c "import transformers; print('transformers', transformers.__version__)" || true
} 2>&1 | tee "$out/env.txt"

run_tests() {
  # -rs lists what was skipped and why: on a GPU nothing here should be skipped but TensorRT.
  "$py" -m pytest -q -rs -p no:cacheprovider tests/kernels/triton \
    tests/offloading/test_offload.py::test_offloaded_on_cuda_equals_the_resident_model_on_cpu \
    tests/cli/test_export.py::test_tensorrt_export_matches_the_model 2>&1 | tee "$out/tests.log"
}

run_bench() {
  if [ $# -gt 0 ]; then
    "$py" -m moefx.cli.bench "$@" --json "$out/bench.json" 2>&1 | tee "$out/bench.log"
    return
  fi
  # The issue's shapes, one process each: a shape that runs past the call's time limit leaves
  # the finished ones' JSON behind. Every shape runs even if one reports a MISMATCH (exit 1).
  local status=0 shape
  : > "$out/bench.log"
  for shape in S1 S2 mixtral deepseek; do
    "$py" -m moefx.cli.bench --shapes "$shape" --repeats 11 --json "$out/bench-$shape.json" 2>&1 \
      | tee -a "$out/bench.log" || status=1
  done
  return $status
}

case "$mode" in
  tests) run_tests ;;
  bench) run_bench "$@" ;;
  all) run_tests && run_bench "$@" ;;
  *) echo "usage: scripts/gpu_session.sh tests|bench [ARGS...]|all" >&2; exit 2 ;;
esac
