#!/usr/bin/env bash
# The clean/robust trade-off frontier: sweep each method's knob (PGD-AT: the training eps; TRADES:
# beta; SNS: lambda) on MNIST, small CNN, and evaluate every model at one eps (0.3) on the same test
# images, so scripts/frontier.py can draw clean against robust accuracy, one curve per method.
#   BUDGET=pilot (default): 20,000 training images, 3 epochs (eps ramped over the first), PGD-5
#     training attack (step eps/3), Adam 1e-3, batch 128: the budget of the attribution pilot.
#   BUDGET=full: 8 epochs of the 60,000 training images, eps ramped over 2 (the main results' budget).
# Evaluation: the first N_EVAL (default 500) test images; clean, PGD-40 (step 0.01, random start) and
# AutoAttack (standard, through torchattacks), all at eps 0.3.
# DATA=fashion-mnist runs the same sweep there at eps 0.1 (PGD-AT's eps points scaled by a third).
# Usage: [DATA=mnist|fashion-mnist] [BUDGET=pilot|full] [SEEDS="0 1"] [POINTS="pgd_at:0.3 sns:1 ..."] [N_EVAL=500] scripts/frontier.sh [RUNS_DIR]
# (POINTS: METHOD:VALUE pairs; the default is the sweep of docs/results.md.)
# then:  python scripts/frontier.py RUNS_DIR --attack autoattack --plot docs/mnist_frontier.png
# Runs land in RUNS_DIR/DATA-METHOD-VALUE-sSEED; finished steps are skipped and an interrupted
# training resumes; give each budget its own RUNS_DIR. Two copies may run side by side on disjoint
# POINTS or SEEDS.
set -euo pipefail
runs=${1:-runs/frontier}
py=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
case ${BUDGET:-pilot} in
  pilot) budget=(--epochs 3 --eps-warmup 1 --train-limit 20000) ;;
  full)  budget=(--epochs 8 --eps-warmup 2) ;;
  *) echo "BUDGET must be pilot or full" >&2; exit 2 ;;
esac
data=${DATA:-mnist}
case $data in
  mnist) eval_eps=0.3; pgd_points="pgd_at:0.2 pgd_at:0.3 pgd_at:0.35 pgd_at:0.4" ;;
  fashion-mnist) eval_eps=0.1; pgd_points="pgd_at:0.07 pgd_at:0.1 pgd_at:0.13" ;;
  *) echo "DATA must be mnist or fashion-mnist" >&2; exit 2 ;;
esac
points=${POINTS:-$pgd_points trades:1 trades:6 sns:0.3 sns:1 sns:3}
mkdir -p "$runs"

for seed in ${SEEDS:-0}; do
  for point in $points; do
    method=${point%%:*} value=${point#*:}
    eps=$eval_eps
    case $method in
      pgd_at) knob=(); eps=$value ;;
      trades) knob=(--beta "$value") ;;
      sns)    knob=(--sns-lam "$value") ;;
      *) echo "unknown method in POINTS: $point" >&2; exit 2 ;;
    esac
    alpha=$("$py" -c "print(round($eps / 3, 6))")
    name=$data-$method-$value-s$seed
    out=$runs/$name
    if [[ ! -f $out/model.pt ]]; then
      start=$SECONDS
      "$py" -m neurosens train --arch small-cnn --data "$data" --method "$method" "${knob[@]}" --seed "$seed" --eps "$eps" \
        --alpha "$alpha" --steps 5 "${budget[@]}" --eval-limit 0 --batch-size 128 --optimizer adam --lr 1e-3 \
        --weight-decay 0 --threads 1 --no-progress --out "$out" --resume >> "$runs/$name.log" 2>&1
      echo $((SECONDS - start)) > "$runs/$name.train.seconds"
    fi
    if [[ ! -f $out/eval.json ]]; then
      "$py" -m neurosens eval "$out/model.pt" --eps "$eval_eps" --steps 40 --alpha 0.01 --attacks clean,pgd,autoattack \
        -n "${N_EVAL:-500}" --threads 1 --json "$out/eval.json" >> "$runs/$name.log" 2>&1
    fi
  done
done
