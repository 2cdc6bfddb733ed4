#!/usr/bin/env bash
# Every GPU preset at its published shape (random weights, bf16, batch 1), one after another, in one call:
# the fast path against transformers' generate (dynamic cache; static cache + torch.compile) and against the
# weight-reading floor. Tables go to stdout, JSON reports to ${OUT:-benchmarks/results}.
#   bash benchmarks/gpu.sh                 # all four families
#   NEW_TOKENS=32 REPEATS=2 bash benchmarks/gpu.sh llava
# A dry run on a CPU-only machine (DEVICE=cpu PRESET=cpu) checks the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
NEW_TOKENS=${NEW_TOKENS:-64}
REPEATS=${REPEATS:-3}
mkdir -p "$OUT"
FAMILIES=("$@")
# The families come from the registry, each one's published shape from its benchmark module (GPU_PRESET).
[ ${#FAMILIES[@]} -eq 0 ] && read -r -a FAMILIES <<< "$(python -c 'from vlm_patterns.families import FAMILIES; print(*FAMILIES)')"
for family in "${FAMILIES[@]}"; do
    preset=${PRESET:-$(cd benchmarks && python -c "import $family; print($family.GPU_PRESET)")}
    echo "== $family, preset $preset, $DEVICE, $DTYPE"
    start=$(date +%s)
    python benchmarks/run.py "$family" --preset "$preset" --device "$DEVICE" --dtype "$DTYPE" \
        --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" --json "$OUT/$family-$preset-$DEVICE.json" \
        | sed -n '/^{/,$!p'
    echo "($(( $(date +%s) - start )) s)"
done
