#!/usr/bin/env bash
# Dev-only runs behind the TKRE settings of docs/ablation.md ("Choosing settings on dev"): FewRel
# val_wiki 16-way K = 8, training seed 42 (and 13, 87 for some settings), one launch/ablation.py output
# folder per setting. Each table gives the DEV scores at the best dev epoch (the model-selection
# score); test is not read.
# Resumable like the ablation itself (finished stages are skipped).
#   bash launch/dev_selection.sh [OUT]        # OUT defaults to runs/devsel
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/devsel}"
PY="${PYTHON:-.venv/bin/python}"
A="$PY launch/ablation.py --datasets=fewrel --ks=8 --keep_going --report_split=dev --doc="
LR="--set=config.mslm.optim.learning_rate=1e-4 --set=config.scl.optim.learning_rate=1e-4"
# setting                    seeds        variants                    its flags
$A --out="$OUT/default" --seeds=42    --variants=tkre,augment,baseline
$A --out="$OUT/default" --seeds=13,87 --variants=tkre,augment
$A --out="$OUT/steps2x" --seeds=42,13 --variants=tkre --mslm_steps=128 --scl_steps=96
$A --out="$OUT/scl4x"   --seeds=42    --variants=tkre --scl_steps=192
$A --out="$OUT/lr1e-4"  --seeds=42    --variants=tkre $LR
$A --out="$OUT/augk16"  --seeds=42    --variants=tkre,augment --augment_k=16
for s in default steps2x scl4x lr1e-4 augk16; do
  for seed in 42 13 87; do
    echo "== $s, seed $seed (dev accuracy at the best dev epoch)"
    $A --out="$OUT/$s" --seeds=$seed --report_only \
      --variants=baseline,augment,tkre | sed -n '/^| variant/,/^$/p' | grep -v "| 0 () |"
  done
done
