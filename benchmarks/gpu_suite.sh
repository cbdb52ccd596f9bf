#!/usr/bin/env bash
# The GPU round in four phases, each callable alone and each well under 8 minutes on an H100:
#
#   benchmarks/gpu_suite.sh [--dry-run] PHASE OUTDIR
#
#   build     compile the CPU and CUDA kernels for the visible GPU (pip --no-build-isolation --no-deps),
#             then the checks below
#   checks    the extension loads, and a C++ error reaches Python as an exception
#   test      the op tests on CUDA, then the rest of the suite
#   sanitize  compute-sanitizer memcheck (caching allocator off), initcheck and synccheck, side by
#             side, over the CUDA op tests, without gradcheck/compile cases (too many launches)
#   bench     copy bandwidth; neuron_topk and stabilize forward + backward: float32 NCHW at the
#             benchmark shapes plus [256, 256, 56, 56], and that large shape in bfloat16 and
#             channels_last; fused against torch.compile, eager and the read floor. Then one SNS
#             step against TRADES and PGD-AT (ResNet-18, batch 256, bf16 autocast), streaming
#             measurement against stored activations (ResNet-18, 8,192 images), and a profile of
#             each op's kernels
#   round     all of it in one go for a short lease: build (or only the checks, when an extension
#             built for this python and torch is already in place), then test and sanitize side by
#             side, then bench alone (about 8 minutes on an H200)
#
# It uses the machine's python3 (PYTHON=... to change) and its torch; no virtual environment, no
# network. Every phase writes ONE file, OUTDIR/gpu_PHASE.tar.gz (logs and results), and prints one
# summary line last. A failing step does not stop the others; the exit code is 0 only when every
# step passed. Phases after build build the extension first when it is not there.
# --dry-run prints and records each step's command instead of running it (CI runs it on the CPU).
set -uo pipefail

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
dry=0
if [[ ${1:-} == --dry-run ]]; then dry=1; shift; fi
phase=${1:-}
out=${2:-}
case "$phase" in build | checks | test | sanitize | bench | round) ;; *) usage; exit 2 ;; esac
[[ -n $out ]] || { usage; exit 2; }

cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
work=$(mktemp -d) || exit 2
trap 'rm -rf "$work"' EXIT
logs="$work/gpu_$phase"
mkdir -p "$logs"
py=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$PATH:$CUDA_HOME/bin"
# Op tests on CUDA, minus the cases that launch thousands of kernels or need 8 GiB buffers.
cuda_tests=(tests/test_ops.py tests/test_kernel_edges.py -k "cuda and not gradcheck and not compile and not opcheck and not int64_indexing and not saturate")

missing=()  # tools a dry run did not find
outcomes="$logs/outcomes"  # one line per step, so that steps run side by side are all counted
: >"$outcomes"

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output in NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local log="$logs/${name// /_}.log"
  echo "== $name"
  if ((dry)); then
    echo "$*" >"$log"
    echo "   $*"
    echo "passed $name" >>"$outcomes"
    return
  fi
  local start=$SECONDS
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  tail -n 3 "$log" | sed 's/^/   /'
  echo "   rc $rc, $((SECONDS - start)) s" | tee -a "$log"
  if ((rc == 0)); then echo "passed $name" >>"$outcomes"; else echo "failed $name (rc $rc)" >>"$outcomes"; fi
}

# need TOOL: a missing tool is a failed step, said by name (a dry run only says it).
need() {
  if command -v "$1" >/dev/null 2>&1; then
    echo "$1: $(command -v "$1")" >>"$logs/tools.txt"
  else
    echo "missing: $1 (not on PATH nor in $CUDA_HOME/bin)" | tee -a "$logs/tools.txt"
    if ((dry)); then missing+=("$1"); else echo "failed $1 missing" >>"$outcomes"; fi
  fi
}

build() {
  need nvcc
  step "build" 420 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$py" -m pip install -v --no-build-isolation --no-deps -e .
}

build_if_missing() {
  if ! ls neurosens/_C*.so >/dev/null 2>&1; then build; fi
}

step "environment" 60 "$py" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE'); sys.exit(0 if torch.cuda.is_available() else 1)"
step "python packages" 60 "$py" -c "import importlib.util as u, sys; missing = [m for m in ('numpy', 'tqdm', 'matplotlib', 'sklearn', 'pytest', 'hypothesis') if u.find_spec(m) is None]; print('missing:', missing or 'none'); sys.exit(1 if missing else 0)"

checks() {
  step "info" 60 "$py" -m neurosens info
  # A compiler that links libstdc++ statically builds an extension whose C++ errors crash Python.
  step "C++ errors reach Python" 120 "$py" -m pytest -q -p no:cacheprovider tests/test_build.py -k reaches_python
}

case "$phase" in
build)
  build
  checks
  ;;
checks)
  checks
  ;;
test)
  build_if_missing
  step "op tests" 240 "$py" -m pytest -q -p no:cacheprovider -rs tests/test_ops.py tests/test_kernel_edges.py tests/test_build.py
  step "other tests" 200 "$py" -m pytest -q -p no:cacheprovider -m "not slow" --ignore=tests/test_ops.py --ignore=tests/test_kernel_edges.py
  ;;
sanitize)
  build_if_missing
  need compute-sanitizer
  step "memcheck" 300 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 "$py" -m pytest -q -p no:cacheprovider "${cuda_tests[@]}" &
  # Every kernel is checked: with a kernel filter, initcheck misses the writes of the kernels it
  # skips and reports their outputs as uninitialized.
  step "initcheck" 300 compute-sanitizer --tool initcheck --error-exitcode 99 --print-limit 20 "$py" -m pytest -q -p no:cacheprovider "${cuda_tests[@]}" &
  step "synccheck" 300 compute-sanitizer --tool synccheck --error-exitcode 99 --print-limit 20 "$py" -m pytest -q -p no:cacheprovider "${cuda_tests[@]}" &
  wait
  ;;
bench)
  build_if_missing
  step "ops float32 contiguous" 150 "$py" benchmarks/bench_ops.py --device cuda --large --repeats 20 --out "$logs"
  for config in "bfloat16 contiguous" "float32 channels_last" "bfloat16 channels_last"; do
    set -- $config
    step "ops $1 $2" 60 "$py" benchmarks/bench_ops.py --device cuda --dtype "$1" --memory-format "$2" --large-only \
      --repeats 20 --out "$logs"
  done
  step "sns step" 150 "$py" benchmarks/bench_sns_step.py --device cuda --resnet-batch 256 --amp --out "$logs"
  step "measure" 120 "$py" benchmarks/bench_measure.py --device cuda --images 8192 --batch 256 --out "$logs"
  step "profile" 120 "$py" benchmarks/profile_ops.py --device cuda --out "$logs"
  ;;
round)
  # Each phase is its own run of this script, with its own tarball; test and sanitize share the GPU.
  # The phases run even in a dry run (dry=0 here), passing --dry-run on to their own steps.
  args=()
  ((dry)) && args=(--dry-run)
  first=build
  # A dry run plans the full round.
  if ((!dry)) && ls "neurosens/_C.$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("SOABI"))').so" >/dev/null 2>&1; then
    first=checks
  fi
  dry=0 step "phase $first" 480 "$0" "${args[@]}" "$first" "$out"
  dry=0 step "phase test" 480 "$0" "${args[@]}" test "$out" &
  dry=0 step "phase sanitize" 480 "$0" "${args[@]}" sanitize "$out" &
  wait
  dry=0 step "phase bench" 480 "$0" "${args[@]}" bench "$out"
  ;;
esac

passed=$(sed -n 's/^passed //p' "$outcomes" | paste -sd, -)
failed=$(sed -n 's/^failed //p' "$outcomes" | paste -sd, -)
status=ok
[[ -z $failed ]] || status=FAILED
{
  echo "phase $phase: $status"
  echo "passed: ${passed:-none}"
  echo "failed: ${failed:-none}"
} >"$logs/summary.txt"
tar -czf "$out/gpu_$phase.tar.gz" -C "$work" "gpu_$phase"
note=""
((dry)) && note="; dry run${missing[*]:+, missing here: ${missing[*]}}"
echo "gpu_suite $phase: $status; passed: ${passed:-none}; failed: ${failed:-none}$note -> $out/gpu_$phase.tar.gz"
[[ $status == ok ]]
