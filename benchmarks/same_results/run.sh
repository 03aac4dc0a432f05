#!/bin/bash
# usage: run.sh SRC_DIR OUT_DIR
set -e
SRC=$1; OUT=$(realpath -m "$2"); mkdir -p "$OUT"
P=$(command -v "${PYTHON:-python}"); PYBIN="$(cd "$(dirname "$P")" && pwd)/$(basename "$P")"  # absolute, the venv kept
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$SRC
cd $SRC
PY=$PYBIN
start=$(date +%s)
$PY -m nasty train-defended --config configs/digits.toml --deterministic --seed 0 --out $OUT/td > $OUT/td.log 2>&1
echo "td $(( $(date +%s)-start ))s" >> $OUT/times
start=$(date +%s)
$PY -m nasty audit $OUT/td/defended --seeds 2 --deterministic --out $OUT/audit > $OUT/audit.log 2>&1 || echo "audit rc $?" >> $OUT/times
echo "audit $(( $(date +%s)-start ))s" >> $OUT/times
