#!/usr/bin/env bash
# The four embedded models trained again, evaluated and compared, by a call that can be repeated until it is done. The
# families train side by side. On a GPU machine they share the one device (each step is small; drawing examples is the
# CPU's work, shared out as DataLoader workers). On a CPU each run gets its share of the cores as threads
# (OMP_NUM_THREADS, at least one each): these small models gain little from a second thread (on 2 cores, two Fuyu runs
# of one thread each made 1.3 times the steps of one run of two threads, and four made as many as two). Each run saves a
# Trainer checkpoint every SAVE_STEPS under its folder's trainer/ and the next call resumes it with the same options, so
# a CPU retrains over several sittings, TRAIN_SECONDS of training per call. Everything lands in ${OUT:-training/runs}:
# one checkpoint folder per family, the training and evaluation logs, and comparison/ with the README table once every
# family asked for has finished. By default this is the shipped models' recipe, in seven steps, with two changes made
# after its first steps had run (position replies from the first run on, where the shipped models' first two runs
# answered with the word alone; the stage also names each token's place). With VISION_STEPS (2000; 0: no stage), a
# family with a vision encoder first trains it alone for that many steps (`vlm-patterns pretrain-vision`, into
# $OUT/<family>.vision, kept across calls) and learns the task from there; Fuyu has no encoder. VISION_PICTURES picks
# the stage's pictures (one-shape or mixed) and AFTER_VISION adds options to the task's first run of a family that had
# the stage (--freeze vision by default; --vision-learning-rate R lets the encoder adapt at its own rate; empty: trained
# with the rest). The first run has STEPS. With SECOND_STEPS (1500; 0: none), a second run of that many steps follows
# from its weights, at SECOND_RATE after 50 warm-up steps; SECOND_VISION adds options to it for a family that had the
# stage (--vision-learning-rate 1e-4 by default: the encoder the first run kept frozen thaws at a fifth of the rate).
# With LATER_STEPS (5000; 0: none), LATER_RUNS (1 to 4; 2 by default) later runs of that many steps follow, each from
# the one before: the whole model at LATER_RATE, each on a stream of examples of its own (seeds 3, 4, ...). POSITIONS
# says where the learned positions start (training/vit_positions.py): LLaVA's and Flamingo's ViT positions, and the
# table resampled to each image that the recipes give Qwen2-VL and Fuyu (as Qwen3-VL and Mono-InternVL have one): reset,
# the default, replaces them with 2D sin-cos of each patch's place at the first later run, after the encoder has learned
# shapes with small ones (measured: Flamingo then answers the position question; a reset from scratch slows the stage's
# naming of shapes); places starts a new model's positions so (--positions-as-places from scratch); small keeps the
# usual small random start throughout. With POSITION_STEPS (1000; 0: none), a run on the left/right question alone
# (--kinds position) follows, then LAST_STEPS (6000) of every kind, both at LATER_RATE after 100 warm-up steps, each on
# a stream of its own: in the mixed stream left/right is one question in six, and LLaVA's answers to it stayed near
# chance over 10000 steps; a stretch of it alone moved them, and the mixed run after it kept the other kinds (measured;
# 6000 steps of it gave every family 2 to 5 points more than 3000). Each run lands in $OUT/<family>.<first, second, ...>
# (the stretch in $OUT/<family>.position), the last in $OUT/<family>. Fuyu gets the same steps and rates. The shipped
# Qwen2-VL and Fuyu got their tables later than this: added, as places, to the models shipped before them (trained to
# the end without one), then 2500 steps of the stretch and 6000 of every kind; this recipe's path for them (the table
# from scratch, reset with the others) has not been run to the end.
#   bash training/retrain.sh                            # the shipped recipe: stage, 6000 frozen, 1500 thawed, 2 x 5000,
#                                                       #   1000 on left/right alone, 6000
#   TRAIN_SECONDS=3600 bash training/retrain.sh         # a CPU: an hour now, more later
#   STEPS=20000 TEXT_WIDTH=256 TEXT_LAYERS=4 bash training/retrain.sh   # a larger language model, longer
#   VISION_STEPS=0 SECOND_STEPS=0 LATER_STEPS=0 bash training/retrain.sh   # one run of the whole model, no stage
#   POSITIONS=small OUT=training/runs/small bash training/retrain.sh       # ViT positions never reset
#   LATER_RUNS=1 bash training/retrain.sh                                  # 5000 steps fewer (the README measures it)
#   STEPS=4 SAVE_STEPS=2 VISION_STEPS=2 SECOND_STEPS=2 LATER_STEPS=2 POSITION_STEPS=2 LAST_STEPS=2 EVAL_EXAMPLES=8 \
#       bash training/retrain.sh fuyu llava                                # a dry run
# TRAIN_SECONDS bounds the call's training (420 s by default on a GPU, no bound on a CPU); a run stopped by it keeps its
# latest checkpoint. Promote a result by copying its folders over training/checkpoints/ and running `python -m
# vlm_patterns.training.ship` (which adds the code for trust_remote_code).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-training/runs}
STEPS=${STEPS:-6000}
SAVE_STEPS=${SAVE_STEPS:-250}
TEXT_WIDTH=${TEXT_WIDTH:-128}
TEXT_LAYERS=${TEXT_LAYERS:-3}
VISION_STEPS=${VISION_STEPS:-2000}
VISION_PICTURES=${VISION_PICTURES:-one-shape}
POSITIONS=${POSITIONS:-reset}
position_start=() position_reset=()
case $POSITIONS in
    reset) position_reset=(--positions-as-places) ;;
    places) position_start=(--positions-as-places) ;;
    small) ;;
    *) echo "POSITIONS must be reset, places or small, not $POSITIONS" >&2; exit 2 ;;
esac
read -r -a AFTER_VISION <<< "${AFTER_VISION---freeze vision}"
SECOND_STEPS=${SECOND_STEPS:-1500}
SECOND_RATE=${SECOND_RATE:-2.5e-4}
read -r -a SECOND_VISION <<< "${SECOND_VISION---vision-learning-rate 1e-4}"
LATER_STEPS=${LATER_STEPS:-5000}
LATER_RUNS=${LATER_RUNS:-2}
LATER_RATE=${LATER_RATE:-2.5e-4}
POSITION_STEPS=${POSITION_STEPS:-1000}
LAST_STEPS=${LAST_STEPS:-6000}
ORDINALS=(first second third fourth fifth sixth)
if [ "$LATER_STEPS" -gt 0 ] && ! [[ $LATER_RUNS =~ ^[1-4]$ ]]; then
    echo "LATER_RUNS must be 1 to 4, not $LATER_RUNS" >&2; exit 2
fi
if [ "$POSITION_STEPS" -gt 0 ] && [ "$LAST_STEPS" -le 0 ]; then  # trained on left/right alone, a model forgets the rest
    echo "LAST_STEPS must be above 0 with POSITION_STEPS: a run of every kind follows the stretch" >&2; exit 2
fi
EVAL_EXAMPLES=${EVAL_EXAMPLES:-3000}
mkdir -p "$OUT"
FAMILIES=("$@")
[ ${#FAMILIES[@]} -eq 0 ] && read -r -a FAMILIES <<< "$(python -c 'from vlm_patterns.families import FAMILIES; print(*FAMILIES)')"
device=$(python -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")
trained() { [ -f "$OUT/$1/training_log.json" ]; }  # written when a run reaches its last step
untrained=0
for family in "${FAMILIES[@]}"; do trained "$family" || untrained=$(( untrained + 1 )); done
side_by_side=$(( untrained > 0 ? untrained : 1 ))
if [ "$device" = cpu ]; then
    TRAIN_SECONDS=${TRAIN_SECONDS:-0}  # 0: no bound
    workers=0  # on a CPU, workers would take cores from the steps themselves
    share=$(( $(nproc) / side_by_side ))
    threads=${OMP_NUM_THREADS:-$(( share > 0 ? share : 1 ))}
else
    TRAIN_SECONDS=${TRAIN_SECONDS:-420}
    workers=$(( ($(nproc) - 1) / side_by_side ))
    threads=${OMP_NUM_THREADS:-$(nproc)}
fi
# The families with a vision encoder, and those whose ViT has learned positions (one Python start for both).
vision=$(python -c 'from vlm_patterns.training import pretrain_vision as p, recipes as r
print(*(f for f in r.recipe_names() if p.encoder_of(f)))
print(*(f for f in r.recipe_names() if hasattr(r.recipe(f), "start_positions_as_places")))')
encoders=" ${vision%%$'\n'*} " learned_positions=" ${vision#*$'\n'} "
stage=$( [ "$VISION_STEPS" -gt 0 ] && echo "; vision encoders first trained alone for $VISION_STEPS steps \
($VISION_PICTURES pictures)${AFTER_VISION[*]:+, then trained on with ${AFTER_VISION[*]}}" || true)
second=$( [ "$SECOND_STEPS" -gt 0 ] && echo "; then $SECOND_STEPS steps at $SECOND_RATE\
${SECOND_VISION[*]:+ (${SECOND_VISION[*]} after the stage)}" || true)
places=$( [ "$POSITIONS" = places ] && echo ", learned positions that start as places" || true)
later=$( [ "$LATER_STEPS" -gt 0 ] && echo "; then $LATER_RUNS x $LATER_STEPS steps at $LATER_RATE, the whole model\
$( [ "$POSITIONS" = reset ] && echo ", learned positions reset to places first" )" || true)
position=$( [ "$POSITION_STEPS" -gt 0 ] && echo "; then $POSITION_STEPS steps on the position question alone and \
$LAST_STEPS of every kind, at $LATER_RATE" || true)
echo "device: $device; ${FAMILIES[*]}: $STEPS steps, language model ${TEXT_WIDTH} wide x ${TEXT_LAYERS} layers\
$places$stage$second$later$position"
if [ "$device" = cpu ] && [ "$untrained" -gt 0 ]; then
    echo "$untrained to train side by side, $threads thread(s) each"
fi

train() {  # family, deadline (0: no bound)
    local family=$1 deadline=$2 second=() runs=(first) later=0 from="" output options k
    local start=(--text-width "$TEXT_WIDTH" --text-layers "$TEXT_LAYERS")
    [[ $learned_positions == *" $family "* ]] && start+=("${position_start[@]}")
    if [ "$VISION_STEPS" -gt 0 ] && [[ $encoders == *" $family "* ]]; then
        if [ ! -f "$OUT/$family.vision/vision_pretraining.json" ]; then  # written when the stage is done
            echo "$family: training the vision encoder alone"
            OMP_NUM_THREADS=$threads vlm-patterns pretrain-vision "$family" --output "$OUT/$family.vision" \
                --without-code --steps "$VISION_STEPS" --pictures "$VISION_PICTURES" "${start[@]}" \
                >> "$OUT/$family.train.log" 2>&1
        fi
        start=(--from "$OUT/$family.vision" "${AFTER_VISION[@]}")  # the language model's size comes with it
        second=("${SECOND_VISION[@]}")
    fi
    [ "$SECOND_STEPS" -gt 0 ] && runs+=(second)
    [ "$LATER_STEPS" -gt 0 ] && runs+=("${ORDINALS[@]:${#runs[@]}:$LATER_RUNS}")
    [ "$POSITION_STEPS" -gt 0 ] && runs+=(position last)
    for k in "${!runs[@]}"; do
        output=$OUT/$family.${runs[$k]}
        [ "$k" -eq $(( ${#runs[@]} - 1 )) ] && output=$OUT/$family  # the last run lands in the family's folder
        if [ "$k" -eq 0 ]; then
            options=(--steps "$STEPS" "${start[@]}")
        elif [ "$k" -eq 1 ] && [ "$SECOND_STEPS" -gt 0 ]; then
            options=(--from "$from" --steps "$SECOND_STEPS" --learning-rate "$SECOND_RATE" --warmup-steps 50 \
                "${second[@]}")
        elif [ "${runs[$k]}" = position ]; then  # the left/right question alone, for a while (see the header)
            options=(--from "$from" --steps "$POSITION_STEPS" --learning-rate "$LATER_RATE" --warmup-steps 100 \
                --seed $(( 3 + later )) --kinds position --eval-every 250)
        elif [ "${runs[$k]}" = last ]; then  # every kind again, on a stream of its own
            options=(--from "$from" --steps "$LAST_STEPS" --learning-rate "$LATER_RATE" --warmup-steps 100 \
                --seed $(( 4 + later )))
        else  # a later run: the whole model, a stream of its own (seeds 3, 4, ...: the first two runs drew seed 0's)
            later=$(( later + 1 ))
            options=(--from "$from" --steps "$LATER_STEPS" --learning-rate "$LATER_RATE" --seed $(( 2 + later )))
            [ "$later" -eq 1 ] && [[ $learned_positions == *" $family "* ]] && options+=("${position_reset[@]}")
        fi
        if [ ! -f "$output/training_log.json" ]; then
            run "$family" "$output" "$deadline" "the ${runs[$k]} run" "${options[@]}" || return
        fi
        from=$output
    done
}
run() {  # family, output folder, deadline (0: no bound), what, train options...
    local family=$1 output=$2 deadline=$3 what=" ($4)" resume=() bound=0
    shift 4
    [ "$SECOND_STEPS" -gt 0 ] || [ "$LATER_STEPS" -gt 0 ] || [ "$POSITION_STEPS" -gt 0 ] || what=""  # one run: nothing to tell apart
    if [ "$deadline" -gt 0 ]; then
        bound=$(( deadline - $(date +%s) ))
        [ "$bound" -gt 0 ] || return 124
    fi
    compgen -G "$output/trainer/checkpoint-*" > /dev/null && resume=(--resume)
    echo "$family: ${resume[*]:+resuming, }training$what$( [ "$bound" -gt 0 ] && echo " for at most $bound s")"
    OMP_NUM_THREADS=$threads timeout "${bound}s" vlm-patterns train "$family" --output "$output" --without-code \
        "$@" "${resume[@]}" \
        --save_strategy steps --save_steps "$SAVE_STEPS" --save_total_limit 1 --dataloader_num_workers "$workers" \
        --disable_tqdm true >> "$OUT/$family.train.log" 2>&1
}
start=$(date +%s)
deadline=$(( TRAIN_SECONDS > 0 ? start + TRAIN_SECONDS : 0 ))
pids=()
for family in "${FAMILIES[@]}"; do
    trained "$family" && continue
    { train "$family" "$deadline" || echo "$family: stopped (exit $?); call again to resume"; } &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
echo "training took $(( $(date +%s) - start )) s"

finished=()
for family in "${FAMILIES[@]}"; do
    if ! trained "$family"; then
        echo "$family: not finished; last lines of $OUT/$family.train.log:"
        tail -3 "$OUT/$family.train.log" || true
        continue
    fi
    finished+=("$family")
    echo "$family: trained ($(grep -h 'held-out accuracy' "$OUT/$family.train.log" | tail -1))"
    if [ ! -f "$OUT/$family/evaluation.json" ]; then
        # evaluation.json is what the Space shows beside each column.
        vlm-patterns evaluate "$OUT/$family" --examples "$EVAL_EXAMPLES" --json "$OUT/$family/evaluation.json" \
            > "$OUT/$family.evaluate.log" 2>&1
    fi
    echo "$family: $(grep -m1 -i 'accuracy' "$OUT/$family.evaluate.log")"
done
if [ ${#finished[@]} -eq ${#FAMILIES[@]} ]; then
    folders=()
    for family in "${finished[@]}"; do folders+=("$OUT/$family"); done
    vlm-patterns compare "${folders[@]}" --output "$OUT/comparison" --examples "$EVAL_EXAMPLES"
else
    echo "the comparison waits for every family: call again to go on"
fi
