#!/usr/bin/env bash
# Issue 2's real-data check, as a new user would run it: train on ISBI 2012 slices 0-24 with a
# 10-minute budget, predict slices 25-29, evaluate them. Usage:
#   benchmarks/isbi2012_cli.sh [DATA=../shared/datasets/isbi2012] [OUT=runs/isbi2012-cli] [MINUTES=10]
set -euo pipefail
DATA=${1:-../shared/datasets/isbi2012}
OUT=${2:-runs/isbi2012-cli}
MINUTES=${3:-10}
USEG=${USEG:-.venv/bin/useg}
mkdir -p "$OUT"
"$USEG" check "$DATA"
"$USEG" train "$DATA" --out "$OUT/run" --exclude 25-29 --time-budget "$MINUTES" --overwrite
"$USEG" predict "$OUT/run" "$DATA"/images/{25,26,27,28,29}.png --out "$OUT/pred" --overwrite
"$USEG" evaluate "$OUT/pred" "$DATA/masks" --run "$OUT/run" | tee "$OUT/evaluate.txt"
