#!/usr/bin/env bash
# Build the sdist and, from it, the wheel (CPU kernels only), install each into a fresh virtual
# environment and run `neurosens info` and a small measurement from outside the source tree.
#
# The fresh environments have no packages of their own: torch and the other dependencies come from
# the project's .venv through a path file, which adds its site-packages to sys.path without running
# that folder's own path files, so the editable install of the source tree stays out of sight. The
# check asserts that neurosens is imported from the fresh environment and runs its compiled kernels.
#
#   scripts/check_dist.sh            # PYTHON=path/to/python to use another built environment
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
python=$(realpath -s "${PYTHON:-$root/.venv/bin/python}")  # absolute: the script changes directory
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unset NEUROSENS_NO_EXT
export FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2}

deps=$("$python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
base=$("$python" -c 'import sys; print(sys.base_prefix)')/bin/python3

echo "== sdist"
(cd "$root" && "$python" setup.py -q sdist -d "$work/dist" >/dev/null 2>&1)
sdist=$(ls "$work"/dist/neurosens-*.tar.gz)
members=$(tar tzf "$sdist")
shopt -s nullglob
for source in "$root"/csrc/*.cpp "$root"/csrc/*/*.h "$root"/csrc/*/*.cpp "$root"/csrc/*/*.cu "$root/LICENSE"; do
    member=${source#"$root"/}
    grep -qx "neurosens-[^/]*/$member" <<<"$members" || { echo "$(basename "$sdist") lacks $member" >&2; exit 1; }
done
echo "$(basename "$sdist"): every kernel source of csrc/ and LICENSE"

echo "== wheel, built from the sdist"
"$python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$work/dist" "$sdist"
wheel=$(ls "$work"/dist/neurosens-*.whl)
echo "$(basename "$wheel")"

mkdir -p "$work/outside"
for artifact in "$sdist" "$wheel"; do
    kind=$([[ $artifact == *.whl ]] && echo wheel || echo sdist)
    echo "== install the $kind into a fresh environment"
    env_dir=$work/venv-$kind
    "$base" -m venv --without-pip "$env_dir"
    env_python=$env_dir/bin/python
    echo "$deps" > "$("$env_python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/deps.pth"
    "$python" -m pip --python "$env_python" install --quiet --no-deps --no-build-isolation --ignore-installed "$artifact"
    cd "$work/outside"
    "$env_dir/bin/neurosens" info
    "$env_python" - "$env_dir" <<'PY'
import sys
from pathlib import Path

import torch

import neurosens as ns
from neurosens.data import digits, make_loader
from neurosens.models import build_model

where = Path(ns.__file__).resolve()
assert where.is_relative_to(Path(sys.argv[1]).resolve()), f"neurosens imported from {where}, not the fresh environment"
assert ns.info()["cpu kernels"].startswith("fused"), ns.info()
torch.manual_seed(0)
model = build_model("small-cnn", num_classes=10, in_channels=1, input_size=28).eval()
test = digits(train=False).subset(64)
report = ns.measure(model, make_loader(test, batch_size=32), ns.FGSM(model, eps=0.1), progress=False)
means = report.layer_means()
assert report.meta["samples"] == 64 and all(v > 0 for v in means.values()), means
print("measured", ", ".join(f"{k} {v:.4f}" for k, v in means.items()), "from", where.parent)
PY
done
echo "== sdist and wheel install and run"
