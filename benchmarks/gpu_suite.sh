#!/usr/bin/env bash
# The GPU checks in one call, on a machine with a CUDA device and torch installed: build the CUDA
# kernels for that device, run the whole test suite, compute-sanitizer (memcheck, racecheck) over
# the CUDA op tests, the op benchmarks in float32 and bfloat16 with the large shape and the copy
# bandwidth, and the SNS-against-PGD-AT step on ResNet-18 at batch 256 with bf16 autocast.
# The tests that read MNIST want data/mnist (neurosens data fetch mnist) beside the checkout.
# Usage: [PYTHON=python] [TORCH_CUDA_ARCH_LIST=9.0] benchmarks/gpu_suite.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
out=${1:-benchmarks/results}
mkdir -p "$out"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
sanitizer=$CUDA_HOME/bin/compute-sanitizer

"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
step() { echo; echo "== $*"; }

step build
FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$py" -m pip install --quiet --no-build-isolation -e .
"$py" -m neurosens info | tee "$out/gpu_info.txt"

status=0
step tests
"$py" -m pytest -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt" || status=1

for tool in memcheck racecheck; do
  step "compute-sanitizer $tool"
  "$sanitizer" --tool "$tool" --error-exitcode 99 --print-limit 20 \
    "$py" -m pytest -q -p no:cacheprovider tests/test_ops.py -k cuda 2>&1 | tail -n 40 | tee "$out/gpu_sanitizer_$tool.txt" \
    || status=1
done

step "op benchmarks"
for dtype in float32 bfloat16; do
  "$py" benchmarks/bench_ops.py --device cuda --dtype "$dtype" --large --out "$out"
done

step "SNS step against PGD-AT"
"$py" benchmarks/bench_sns_step.py --device cuda --resnet-batch 256 --amp --out "$out"

exit $status
