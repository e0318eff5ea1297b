#!/usr/bin/env bash
# The GPU check: one prepared script for a machine with an NVIDIA GPU, ~8 minutes, stops by itself.
#
#     bash bench/gpu_check.sh [--cpu] [--flickr DIR]
#     PY=python3 bash bench/gpu_check.sh --flickr ../shared/flickr8k-dev   # no .venv: use this Python
#
# The check is bench/gpu_check.py (its docstring and docs/gpu.md say what it checks, its outputs,
# exit codes and settings); this runs it with PY, else .venv's Python, else python3, which then
# runs `make install` before the steps.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
RUN=${PY:-$REPO/.venv/bin/python}
command -v "$RUN" >/dev/null 2>&1 || RUN=python3
exec "$RUN" "$REPO/bench/gpu_check.py" "$@"
