#!/usr/bin/env bash
# SNS ablations on MNIST (eps 0.3) at a reduced budget: 20,000 training images, 3 epochs (the first
# ramps eps up), one seed; each variant changes one option of its round's base. Evaluated with PGD-40
# (step 0.01, random start) on the first 1,000 test images.
# Usage: scripts/sns_ablation.sh [RUNS_DIR]   (then: python scripts/ablation_table.py RUNS_DIR)
set -euo pipefail
runs=${1:-runs/ablation}
py=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p "$runs"

variant() {  # variant NAME METHOD [extra train flags...]
  local name=$1 method=$2; shift 2
  local out=$runs/$name
  if [[ ! -f $out/model.pt ]]; then
    local start=$SECONDS
    "$py" -m neurosens train --arch small-cnn --data mnist --method "$method" --train-limit 20000 --eps 0.3 --alpha 0.1 \
      --steps 5 --eps-warmup 1 --epochs 3 --batch-size 128 --optimizer adam --lr 1e-3 --weight-decay 0 --eval-limit 0 \
      --threads 1 --no-progress --out "$out" --resume "$@" > "$runs/$name.log" 2>&1
    echo $((SECONDS - start)) > "$runs/$name.train.seconds"
  fi
  if [[ ! -f $out/eval.json ]]; then
    "$py" -m neurosens eval "$out/model.pt" --eps 0.3 --steps 40 --alpha 0.01 --attacks clean,fgsm,pgd -n 1000 \
      --threads 1 --json "$out/eval.json" >> "$runs/$name.log" 2>&1
  fi
}

# Round 1 pins its base (cosine, k 0.1, lam 1, every conv/linear layer) so it does not follow
# the package defaults, which it helped choose.
base=(--sns-metric cosine --sns-k 0.1 --sns-lam 1)
variant pgd_at pgd_at
variant sns sns "${base[@]}"
variant lam3 sns "${base[@]}" --sns-lam 3
variant lam10 sns "${base[@]}" --sns-lam 10
variant lam30 sns "${base[@]}" --sns-lam 30
variant k0.05 sns "${base[@]}" --sns-k 0.05
variant k0.3 sns "${base[@]}" --sns-k 0.3
variant l1 sns "${base[@]}" --sns-metric l1
variant l2 sns "${base[@]}" --sns-metric l2
variant hidden sns "${base[@]}" --sns-layers conv1,conv2,fc1
variant fc1 sns "${base[@]}" --sns-layers fc1
variant detached sns "${base[@]}" --sns-detach-benign
variant refresh-epoch sns "${base[@]}" --sns-refresh epoch
# Round 2 moves lam, k and the detached benign side around round 1's best metric (l1). Its best,
# l1-k0.3, is the package default (metric l1, k 0.3, lam 1).
base=(--sns-metric l1 --sns-k 0.1 --sns-lam 1)
variant l1-lam0.3 sns "${base[@]}" --sns-lam 0.3
variant l1-lam3 sns "${base[@]}" --sns-lam 3
variant l1-k0.3 sns "${base[@]}" --sns-k 0.3
variant l1-detached sns "${base[@]}" --sns-detach-benign
