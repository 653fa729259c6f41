#!/usr/bin/env bash
# One command on nvidia-h200 (< 10 min): the fused capacity-padded expert FFN ("padded") beside
# the Mosaic grouped kernels ("gpu") and the dense FFN, 4K/16K/64K tokens, one process each.
set -u
DEADLINE=580
source experiments/gpu/lib.sh
timeout -k 5 "$(cap 90)" python3 -m pytest -q -m gpu tests/test_moe_padded.py \
  -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "[tests] done at $((SECONDS - t0)) s" >> "$OUT/tests.log"
for t in 4096 16384 65536; do
  timeout -k 5 "$(cap 200)" python3 experiments/bench_moe.py --tokens $t --impls gpu,padded \
    --ragged_max_tokens 0 --out "$OUT/bench_moe.jsonl" >> "$OUT/moe.log" 2>&1
  echo "[moe $t] done at $((SECONDS - t0)) s" >> "$OUT/moe.log"
done
grep -E "ratio|done|Error" "$OUT/moe.log" | tail -n 20
