#!/usr/bin/env bash
# The sweep behind the defaults (one change at a time from the baseline), on the validation split.
#
#     bash bench/quality_sweep.sh [DATA] [OUT]
#
# Every line adds rows to OUT/quality.md / quality.json (see bench/quality.py). DATA defaults to
# the Flickr8k subset. On 2 shared CPU cores this took ~70 min of training and scoring after a
# ~5-16 min featurize (--threads 1 keeps a run steady when another torch process shares the cores;
# with 2 threads each, epochs went from 4 s to 60-100 s). The joint session runs once, at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/flickr8k-dev}
OUT=${2:-data/flickr}
PY=${PY:-.venv/bin/python}
EPOCHS=${EPOCHS:-20}
Q=("$PY" bench/quality.py "$DATA" --out "$OUT" --epochs "$EPOCHS" --threads "${THREADS:-1}" --joint-minutes 0)
G=(--decode beam=1 --decode beam=3 --decode beam=5 --decode beam=5,alpha=0.7 --decode beam=3,tta --decode beam=5,alpha=0.7,tta)

# baseline (image as first input, hidden 512, dropout 0.2, min word count 5), three seeds, every decoding
"${Q[@]}" --seed 0 "${G[@]}" --decode beam=3,alpha=0.7 --decode beam=3,alpha=1 --decode beam=5,alpha=1 \
          --decode beam=5,tta --decode beam=3,alpha=0.7,tta
"${Q[@]}" --seed 1 "${G[@]}"
"${Q[@]}" --seed 2 "${G[@]}"
# one change at a time (seed 0), scored with beam 3
"${Q[@]}" --train-arg image-as=state
"${Q[@]}" --train-arg hidden-size=1024
"${Q[@]}" --train-arg hidden-size=1024 --seed 1
"${Q[@]}" --train-arg hidden-size=1024 --seed 2
"${Q[@]}" --train-arg dropout=0.5
"${Q[@]}" --min-word-count 3      # its manifest equals the baseline's: the feature store is reused
[ -n "${WITH_256:-}" ] && "${Q[@]}" --train-arg hidden-size=256
# a joint session after the chosen decoder (reuses the seed-0 baseline run; its own copy keeps that run clean)
rm -rf "$OUT/runs/joint-e$EPOCHS" && cp -r "$OUT/runs/decoder-e$EPOCHS-seed0" "$OUT/runs/joint-e$EPOCHS"
"$PY" bench/quality.py "$DATA" --out "$OUT" --epochs "$EPOCHS" --keep-run --name "joint-e$EPOCHS" --seed 0 \
      --decode beam=3 --joint-minutes "${JOINT_MINUTES:-8}"
