#!/usr/bin/env bash
# SNS against the published MNIST results, at the published budget, on a GPU:
#
#   scripts/published_mnist.sh train OUT [MINUTES]   train or continue PGD-AT, TRADES and SNS side by side
#   scripts/published_mnist.sh sweep OUT [MINUTES]   SNS lambda/k sweep, judged on 5,000 held-out training images
#   scripts/published_mnist.sh eval OUT [MINUTES]    every finished model on all 10,000 test images
#
# The budget is the TRADES paper's for its MNIST CNN (arch trades-cnn): SGD, lr 0.01, momentum 0.9,
# no weight decay, constant rate, 100 epochs, batch 128, the training attack 40 PGD steps of 0.01
# at eps 0.3, TRADES beta 1. PGD-AT and SNS (package defaults) get the same optimizer, attack and
# epochs. Every run checkpoints each epoch and continues with --resume, so each command runs at
# most MINUTES (default 9) and the next one picks up where it stopped: the runs are killed at the
# limit and lose at most the epoch in progress. The sweep trains on 55,000 images and evaluates
# each epoch on the 5,000 it holds out (--val), never on the test set. Evaluation: clean, PGD-40
# (step 0.01, random start), PGD-100 with 10 restarts and AutoAttack (needs torchattacks), plus
# the per-layer sensitivity under PGD-40: OUT/<run>/eval_pgd40.json, eval_strong.json, sensitivity/.
# EPOCHS, EVAL_SAMPLES (0: all) and EXTRA (train flags appended last) shrink it for a trial run.
set -uo pipefail

usage() { sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
phase=${1:-}
out=${2:-}
minutes=${3:-9}
case "$phase" in train | sweep | eval) ;; *) usage; exit 2 ;; esac
[[ -n $out && $minutes =~ ^[0-9]+$ && $minutes -gt 0 ]] || { usage; exit 2; }
mkdir -p "$out" || exit 2
py=${PYTHON:-python3}
limit=$((minutes * 60))

budget=(--data mnist --arch trades-cnn --optimizer sgd --lr 0.01 --momentum 0.9 --weight-decay 0 --schedule constant
  --epochs "${EPOCHS:-100}" --batch-size 128 --eps 0.3 --steps 40 --alpha 0.01 --eval-steps 20 --no-progress
  ${EXTRA:-})
n=${EVAL_SAMPLES:-0}

# run NAME ARGS...: one training process, continued when its folder holds a checkpoint.
run() {
  local name=$1
  shift
  local resume=()
  [[ -f $out/$name/checkpoint.pt ]] && resume=(--resume)
  [[ -f $out/$name/model.pt ]] && { echo "$name: finished"; return; }
  echo "$name: $( ((${#resume[@]})) && echo continuing || echo starting)"
  timeout -s KILL "$limit" "$py" -m neurosens train "${budget[@]}" "$@" --out "$out/$name" "${resume[@]}" \
    >>"$out/$name.log" 2>&1
  echo "$name: rc $?, $(grep -c '"epoch"' "$out/$name/metrics.jsonl" 2>/dev/null || echo 0) epochs done"
}

case "$phase" in
train)
  run pgd_at --method pgd_at &
  run trades --method trades --beta 1 &
  run sns --method sns &
  wait
  ;;
sweep)
  for lam in 0.3 1 3; do
    for k in 0.1 0.3; do
      run "sweep_lam${lam}_k${k}" --method sns --sns-lam "$lam" --sns-k "$k" --val 5000 &
    done
  done
  wait
  ;;
eval)
  done_mark=sensitivity/report.json  # the last of the three steps
  for model in "$out"/*/model.pt; do
    [[ -f $model ]] || { echo "no finished model under $out"; exit 1; }
    dir=$(dirname "$model")
    [[ -f $dir/$done_mark ]] && continue
    (timeout -s KILL "$limit" "$py" -m neurosens eval "$model" -n "$n" --eps 0.3 --attacks clean,pgd --steps 40 \
      --alpha 0.01 --json "$dir/eval_pgd40.json" &&
      timeout -s KILL "$limit" "$py" -m neurosens eval "$model" -n "$n" --eps 0.3 --attacks pgd,autoattack --steps 100 \
        --alpha 0.01 --restarts 10 --json "$dir/eval_strong.json" &&
      timeout -s KILL "$limit" "$py" -m neurosens sensitivity "$model" -n "$n" --eps 0.3 --steps 40 --alpha 0.01 \
        --no-progress --out "$dir/sensitivity") >>"$dir/eval.log" 2>&1 &
  done
  wait
  for dir in "$out"/*/; do
    [[ -f $dir/model.pt ]] || continue
    [[ -f $dir/$done_mark ]] && echo "$(basename "$dir"): evaluated" || echo "$(basename "$dir"): not evaluated (see eval.log)"
  done
  ;;
esac
