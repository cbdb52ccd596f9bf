#!/usr/bin/env bash
# Where does SNS's gain come from? Small-CNN on MNIST (eps 0.3): SNS-L1 on the hidden layers, on the
# logits, on both (the default); on the hidden layers with the top-k sensitive neurons, random k neurons
# or every neuron; adversarial logit pairing (L1 and L2); PGD-AT as the reference.
#   BUDGET=full (default): the budget of scripts/train_models.sh (8 epochs of the 60,000 training
#     images, eps ramped over 2), seeds 0 and 1, evaluated with clean, FGSM, PGD-40, CW-40 and AutoAttack.
#   BUDGET=pilot: the budget of scripts/sns_ablation.sh (20,000 training images, 3 epochs, eps ramped
#     over 1), seeds 0 and 1, evaluated with clean, FGSM, PGD-40 and CW-40.
# Every evaluation uses the first 1,000 test images (PGD and CW: step 0.01, random start).
# Usage: [BUDGET=full|pilot] [SEEDS="0 1"] [VARIANTS="pgd_at sns-all ..."] scripts/attribution.sh [RUNS_DIR]
# then:  python scripts/results_table.py mnist RUNS_DIR pgd_at sns-all ...   (mean and half-range over seeds)
#        python scripts/ablation_table.py RUNS_DIR   (one row per run, with the per-layer sensitivity)
# Runs land in RUNS_DIR/mnist-VARIANT-sSEED; finished steps are skipped and an interrupted training resumes.
set -euo pipefail
runs=${1:-runs/attribution}
py=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
case ${BUDGET:-full} in
  full)  budget=(--epochs 8 --eps-warmup 2 --eval-steps 10 --eval-limit 500); attacks=clean,fgsm,pgd,cw,autoattack
         seeds=${SEEDS:-0 1} ;;
  pilot) budget=(--epochs 3 --eps-warmup 1 --train-limit 20000 --eval-limit 0); attacks=clean,fgsm,pgd,cw
         seeds=${SEEDS:-0 1} ;;
  *) echo "BUDGET must be full or pilot" >&2; exit 2 ;;
esac
mkdir -p "$runs"

# Each variant's train flags; SEED becomes the run's seed, so each seed draws its own random neurons.
declare -A flags=(
  [pgd_at]="--method pgd_at"
  [sns-all]="--method sns --sns-layers all"
  [sns-hidden]="--method sns --sns-layers hidden"
  [sns-logits]="--method sns --sns-layers logits"
  [sns-hidden-random]="--method sns --sns-layers hidden --sns-select random --sns-seed SEED"
  [sns-hidden-every]="--method sns --sns-layers hidden --sns-select all"
  [alp-l1]="--method alp --alp-distance l1"
  [alp-l2]="--method alp --alp-distance l2"
)

for seed in $seeds; do
  for variant in ${VARIANTS:-pgd_at sns-all sns-hidden sns-logits sns-hidden-random sns-hidden-every alp-l1 alp-l2}; do
    [[ -v flags[$variant] ]] || { echo "unknown variant: $variant" >&2; exit 2; }
    name=mnist-$variant-s$seed
    out=$runs/$name
    if [[ ! -f $out/model.pt ]]; then
      start=$SECONDS
      # shellcheck disable=SC2086  # the variant's flags are split on purpose
      "$py" -m neurosens train --arch small-cnn --data mnist ${flags[$variant]//SEED/$seed} --seed "$seed" --eps 0.3 --alpha 0.1 \
        --steps 5 "${budget[@]}" --batch-size 128 --optimizer adam --lr 1e-3 --weight-decay 0 --threads 1 \
        --no-progress --out "$out" --resume >> "$runs/$name.log" 2>&1
      echo $((SECONDS - start)) > "$runs/$name.train.seconds"
    fi
    if [[ ! -f $out/eval.json ]]; then
      "$py" -m neurosens eval "$out/model.pt" --eps 0.3 --steps 40 --alpha 0.01 --attacks "$attacks" -n 1000 \
        --threads 1 --json "$out/eval.json" >> "$runs/$name.log" 2>&1
    fi
  done
done
