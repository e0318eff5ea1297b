#!/usr/bin/env bash
# The sweep behind the defaults (one change at a time from the baseline), on the validation split.
#
#     bash bench/quality_sweep.sh [DATA] [OUT]
#
# Every line adds rows to OUT/quality.md / quality.json (see bench/quality.py). DATA defaults to
# the Flickr8k subset. On 2 shared CPU cores the decoder runs took ~85 min of training and scoring
# after a ~5-16 min featurize (--threads 1 keeps a run steady when another torch process shares the
# cores; with 2 threads each, epochs went from 4 s to 60-100 s), and the joint sessions at the end
# ~22 min per seed (2 epochs of 186 batches of 16 at ~3-4 s per batch, 2 threads).
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
"${Q[@]}" --min-word-count 3 --seed 1
"${Q[@]}" --min-word-count 3 --seed 2
for seed in 0 1 2; do "${Q[@]}" --train-arg hidden-size=256 --seed $seed; done
# two joint epochs after seed $1's baseline decoder, in run $2: a copy, which keeps the decoder run
# clean; further arguments go to bench/quality.py. Seed 0's plain run was two 1-epoch sessions
# (--joint-resume), the others one 2-epoch session: resumes are exact
joint() {
  local seed=$1 name=$2
  shift 2
  rm -rf "$OUT/runs/$name" && cp -r "$OUT/runs/decoder-e$EPOCHS-seed$seed" "$OUT/runs/$name"
  "$PY" bench/quality.py "$DATA" --out "$OUT" --epochs "$EPOCHS" --keep-run --name "$name" --seed "$seed" \
        --decode beam=3 --joint-minutes "${JOINT_MINUTES:-30}" --joint-epochs "${JOINT_EPOCHS:-2}" "$@"
}
for seed in 0 1 2; do joint $seed "joint-e$EPOCHS-seed$seed"; done
# the same with a 10x lower decoder lr in the joint phase
for seed in 0 1 2; do joint $seed "joint-lr3e-5-e$EPOCHS-seed$seed" --joint-arg lr=3e-5; done
