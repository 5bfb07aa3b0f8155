#!/usr/bin/env bash
# Issue 26's per-minute levers, paired at a fixed 12 minutes of KD (the demo's budget), 4x from the fitted start,
# on one quiet machine, one variant per process (torch.compile is paid inside each variant's own minutes, as a user
# pays it), the conversion shared. Held-out instrument: chat KL / top-1 / ppl and BoolQ-passage text KL / ppl
# (`ecomla eval --tasks none --max-tokens 8192`, text = boolq: read by no training stream).
# On one quiet machine, from the repository root (about 3 hours; the CPU goes in the record):
#   bash benchmarks/levers.sh            # OUT=out/levers by default; LEVERS="..." runs a subset
set -euo pipefail
OUT=${OUT:-out/levers}
CONVERT="--kv-rank 64 --rope-dim 32 --init fitted"
Q="--cache-bits 4"  # the demo trains for its 4-bit latent cache
BASE="--stage kd --ild-tokens 0 --max-minutes 12 --seq-len 256 --batch-size 4 --save-every 20 $Q"
EVAL="--tasks none --max-tokens 8192 --text boolq"
declare -A V=(
  [base]="$BASE"
  [every-token]="$BASE --no-mask-prompt"
  [mla-lr3e-4]="$BASE --trainable mla --lr 3e-4"
  [mla-lr1e-3]="$BASE --trainable mla --lr 1e-3"
  [seq512-bs2]="--stage kd --ild-tokens 0 --max-minutes 12 --seq-len 512 --batch-size 2 --save-every 20 $Q"
  [bs2]="--stage kd --ild-tokens 0 --max-minutes 12 --seq-len 256 --batch-size 2 --save-every 20 $Q"
  [bs8]="--stage kd --ild-tokens 0 --max-minutes 12 --seq-len 256 --batch-size 8 --save-every 20 $Q"
  [bs4-ga2]="$BASE --grad-accum 2"
  [text25]="$BASE --text-data lambada --text-share 0.25"
  [ild16k]="--stage both --ild-tokens 16384 --ild-lr 1e-3 --max-minutes 12 --seq-len 256 --batch-size 4 --save-every 20 $Q"
  [topk64]="$BASE --teacher-topk 64"
)
ORDER=(base every-token mla-lr3e-4 mla-lr1e-3 seq512-bs2 bs2 bs8 bs4-ga2 text25 ild16k topk64)
# a subset, in this order (base first: topk64 sizes its fill from it): LEVERS="base every-token bs2" bash benchmarks/levers.sh
if [ -n "${LEVERS:-}" ]; then read -r -a ORDER <<< "$LEVERS"; fi
one() { python benchmarks/study.py --out "$OUT" --work "$OUT/models" --eval "$EVAL" --variant "$1" "$CONVERT" "${V[$1]}"; }
for name in "${ORDER[@]}"; do
  if [ "$name" = topk64 ]; then
    # fill the top-k cache first, outside any measured minutes (its key: teacher, data, seq 256, seed 0, k 64, the
    # assistant mask); --max-tokens bounds the fill, at least 1.5x the tokens `base` trained (ecomla_train.json)
    student=$(ls -d "$OUT"/models/convert-* | head -1)
    fill=$(python -c "import json,glob;print(int(1.5*max(json.load(open(f))['tokens'] for f in glob.glob('$OUT/models/distill-*/ecomla_train.json'))))")
    python -m ecomla distill "$student" --out "$OUT/topk-fill" --stage kd --teacher-topk 64 --max-tokens "$fill" \
        --max-minutes 0.05 --eval-tokens 0 --no-progress
  fi
  one "$name"
done
ARGS=(); for name in "${ORDER[@]}"; do ARGS+=(--variant "$name" "$CONVERT" "${V[$name]}"); done
python benchmarks/study.py --out "$OUT" --work "$OUT/models" --eval "$EVAL" "${ARGS[@]}" --record "$OUT/levers-record.json"
# each variant's steps, minutes and what ended it:
for f in "$OUT"/models/distill-*/ecomla_train.json; do
  python -c "import json,sys;d=json.load(open('$f'));print('$f', d['stopped'], d['steps'], d['tokens'], d['minutes'], d['kd_length'])"
done
