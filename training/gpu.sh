#!/usr/bin/env bash
# The four embedded models trained again in one call on a GPU machine: the families train side by side on the one
# device (each step is small; drawing examples is the CPU's work, shared out as DataLoader workers), then each is
# evaluated and the comparison drawn. Everything lands in ${OUT:-training/gpu-run}: one checkpoint folder per
# family (with the latest Trainer checkpoint, saved every SAVE_STEPS, under <family>/trainer: a run cut short resumes with
# `vlm-patterns train <family> --output <folder> --resume` and the same options, here or on a CPU), the training
# and evaluation logs, and comparison/ with the README table.
#   bash training/gpu.sh                                  # the shipped recipe: 6000 steps, width 128, 3 layers
#   STEPS=20000 TEXT_WIDTH=256 TEXT_LAYERS=4 bash training/gpu.sh
#   STEPS=4 SAVE_STEPS=2 EVAL_EXAMPLES=8 bash training/gpu.sh fuyu    # a dry run of the script, on any machine
# A family that does not finish within TRAIN_SECONDS keeps its Trainer checkpoints and is left out of the
# comparison. Promote a result by copying its folders over training/checkpoints/ and running
# `python -m vlm_patterns.training.ship` (which adds the code for trust_remote_code).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-training/gpu-run}
STEPS=${STEPS:-6000}
SAVE_STEPS=${SAVE_STEPS:-1000}
TEXT_WIDTH=${TEXT_WIDTH:-128}
TEXT_LAYERS=${TEXT_LAYERS:-3}
EVAL_EXAMPLES=${EVAL_EXAMPLES:-3000}
TRAIN_SECONDS=${TRAIN_SECONDS:-420}
mkdir -p "$OUT"
FAMILIES=("$@")
[ ${#FAMILIES[@]} -eq 0 ] && read -r -a FAMILIES <<< "$(python -c 'from vlm_patterns.families import FAMILIES; print(*FAMILIES)')"
cores=$(nproc)
workers=$(( (cores - 1) / ${#FAMILIES[@]} ))
python -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu only')"
echo "training ${FAMILIES[*]}: $STEPS steps, language model ${TEXT_WIDTH} wide x ${TEXT_LAYERS} layers, $workers data workers each"

start=$(date +%s)
pids=()
for family in "${FAMILIES[@]}"; do
    timeout "$TRAIN_SECONDS" vlm-patterns train "$family" --output "$OUT/$family" --without-code --steps "$STEPS" \
        --text-width "$TEXT_WIDTH" --text-layers "$TEXT_LAYERS" \
        --save_strategy steps --save_steps "$SAVE_STEPS" --save_total_limit 1 --dataloader_num_workers "$workers" --disable_tqdm true > "$OUT/$family.train.log" 2>&1 &
    pids+=($!)
done
finished=()
for i in "${!FAMILIES[@]}"; do
    family=${FAMILIES[$i]}
    if wait "${pids[$i]}"; then
        finished+=("$family")
        echo "$family: trained ($(grep -h 'held-out accuracy' "$OUT/$family.train.log" | tail -1))"
    else
        echo "$family: did not finish (exit $?); last lines of $OUT/$family.train.log:"
        tail -3 "$OUT/$family.train.log"
    fi
done
echo "training took $(( $(date +%s) - start )) s"

for family in "${finished[@]}"; do
    # evaluation.json is what the Space shows beside each column.
    vlm-patterns evaluate "$OUT/$family" --examples "$EVAL_EXAMPLES" --json "$OUT/$family/evaluation.json" \
        > "$OUT/$family.evaluate.log" 2>&1
    echo "$family: $(grep -m1 -i 'accuracy' "$OUT/$family.evaluate.log")"
done
if [ ${#finished[@]} -gt 0 ]; then
    folders=()
    for family in "${finished[@]}"; do folders+=("$OUT/$family"); done
    vlm-patterns compare "${folders[@]}" --output "$OUT/comparison" --examples "$EVAL_EXAMPLES"
fi
