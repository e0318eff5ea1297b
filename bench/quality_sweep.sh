#!/usr/bin/env bash
# The sweep behind the defaults (one change at a time from the baseline), on the validation split.
#
#     bash bench/quality_sweep.sh [DATA] [OUT]      # ~60 min on 2 CPU cores, featurizing included
#
# Every line adds rows to OUT/quality.md / quality.json (see bench/quality.py). DATA defaults to
# the Flickr8k subset; the joint session runs once, on the chosen configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/flickr8k-dev}
OUT=${2:-data/flickr}
PY=${PY:-.venv/bin/python}
EPOCHS=${EPOCHS:-30}
Q=("$PY" bench/quality.py "$DATA" --out "$OUT" --epochs "$EPOCHS" --joint-minutes 0)

# baseline (image as first input, hidden 512, dropout 0.2), scored under every decoding setting
"${Q[@]}" --decode beam=1 --decode beam=3 --decode beam=5 \
          --decode beam=3,alpha=0.7 --decode beam=3,alpha=1 --decode beam=5,alpha=0.7 --decode beam=5,alpha=1 \
          --decode beam=3,tta --decode beam=5,tta
# one change at a time
"${Q[@]}" --train-arg image-as=state
"${Q[@]}" --train-arg hidden-size=256
"${Q[@]}" --train-arg hidden-size=1024
"${Q[@]}" --train-arg dropout=0.5
"${Q[@]}" --min-word-count 3
# seed spread of the chosen configuration (the baseline)
"${Q[@]}" --seed 1
"${Q[@]}" --seed 2
# a joint session after the chosen decoder (reuses the seed-0 baseline run)
"$PY" bench/quality.py "$DATA" --out "$OUT" --epochs "$EPOCHS" --keep-run --joint-minutes "${JOINT_MINUTES:-8}"
