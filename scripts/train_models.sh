#!/usr/bin/env bash
# Train and evaluate small-CNN models on MNIST (eps 0.3) or Fashion-MNIST (eps 0.1), one job at a
# time on one CPU thread, as reported in docs/results.md. Every method gets the same budget: 8 epochs,
# PGD-5 training attack, Adam 1e-3; evaluation on the first 1,000 test images.
# Usage: [METHODS="standard pgd_at trades sns"] [SEEDS="0 1"] scripts/train_models.sh mnist|fashion-mnist [RUNS_DIR]
# Runs land in RUNS_DIR/DATA-METHOD-sSEED. Finished steps are skipped; an interrupted training
# continues from its checkpoint.
set -euo pipefail
data=${1:?usage: $0 mnist|fashion-mnist [runs dir]}
runs=${2:-runs}
py=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
case $data in
  mnist)         eps=0.3; alpha=0.1;  warmup=2; eval_alpha=0.01 ;;
  fashion-mnist) eps=0.1; alpha=0.03; warmup=1; eval_alpha=0.01 ;;
  *) echo "unknown data set: $data" >&2; exit 2 ;;
esac
mkdir -p "$runs"

timed() {  # timed NAME COMMAND...: run, log to RUNS/NAME.log, record wall-clock seconds
  local name=$1; shift
  local start=$SECONDS
  echo "$*" > "$runs/$name.cmd"
  "$@" >> "$runs/$name.log" 2>&1
  echo $((SECONDS - start + $(cat "$runs/$name.seconds" 2>/dev/null || echo 0))) > "$runs/$name.seconds.new"
  mv "$runs/$name.seconds.new" "$runs/$name.seconds"
}

for seed in ${SEEDS:-0}; do
  for method in ${METHODS:-pgd_at standard trades sns}; do
    name=$data-$method-s$seed
    out=$runs/$name
    if [[ ! -f $out/model.pt ]]; then
      extra=()
      [[ $method != standard ]] && extra=(--eps-warmup "$warmup")
      timed "$name-train" "$py" -m neurosens train --arch small-cnn --data "$data" --method "$method" --seed "$seed" \
        --eps "$eps" --alpha "$alpha" --steps 5 "${extra[@]}" --epochs 8 --batch-size 128 --optimizer adam \
        --lr 1e-3 --weight-decay 0 --eval-steps 10 --eval-limit 500 --threads 1 --no-progress --out "$out" --resume
    fi
    if [[ ! -f $out/eval.json ]]; then
      timed "$name-eval" "$py" -m neurosens eval "$out/model.pt" --eps "$eps" --steps 40 --alpha "$eval_alpha" \
        -n 1000 --threads 1 --json "$out/eval.json"
    fi
  done
done
