#!/bin/bash
# usage: extra.sh SRC_DIR OUT_DIR   (more runs for the before/after comparison)
SRC=$1; OUT=$(realpath -m "$2"); mkdir -p "$OUT"
P=$(command -v "${PYTHON:-python}"); PYBIN="$(cd "$(dirname "$P")" && pwd)/$(basename "$P")"  # absolute, the venv kept
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$SRC
cd $SRC
N="$PYBIN -m nasty"
$N train-defended --dataset digits --deterministic --lock none --defense budget --max-accuracy-drop 2 --epochs 4 --no-probe --out $OUT/budget > $OUT/budget.log 2>&1; echo "budget $?" >> $OUT/rc
$N train-defended --dataset digits --deterministic --lock none --defense class-selective --protect-classes 3,5 --epochs 3 --probe-students mlp --out $OUT/sel > $OUT/sel.log 2>&1; echo "sel $?" >> $OUT/rc
$N train-defended --dataset digits --deterministic --lock two-net --omega 0.3 --epochs 3 --no-probe --out $OUT/twonet > $OUT/twonet.log 2>&1; echo "twonet $?" >> $OUT/rc
for m in kd tllm skeptical rehead hint; do
  $N attack --teacher $OUT/td/defended --method $m --deterministic --epochs 3 --out $OUT/att-$m > $OUT/att-$m.log 2>&1; echo "att-$m $?" >> $OUT/rc
done
$N attack --teacher $OUT/td/defended --method kd --deterministic --epochs 3 --output-defense topk:2 --surrogate digits --queries 500 --out $OUT/att-sur > $OUT/att-sur.log 2>&1; echo "att-sur $?" >> $OUT/rc
$N train-teacher --dataset digits --deterministic --epochs 3 --model resnet20:width=0.25 --out $OUT/tt > $OUT/tt.log 2>&1; echo "tt $?" >> $OUT/rc
$N attack --teacher $OUT/td/defended --method tllm --mode online --deterministic --epochs 4 --out $OUT/att-tllm-online > $OUT/att-tllm-online.log 2>&1; echo "att-tllm-online $?" >> $OUT/rc
