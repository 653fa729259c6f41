#!/usr/bin/env bash
# One command on nvidia-h200 (< 10 min): the padded expert FFN after its GEMMs store bf16
# directly (no fp32 weight-gradient pass), beside the Mosaic kernels; 4K then 64K tokens.
set -u
DEADLINE=580
source experiments/gpu/lib.sh
timeout -k 5 "$(cap 150)" python3 experiments/bench_moe.py --tokens 4096 --impls gpu,padded \
  --ragged_max_tokens 0 --out "$OUT/bench_moe.jsonl" >> "$OUT/moe.log" 2>&1
echo "[moe 4096] done at $((SECONDS - t0)) s" >> "$OUT/moe.log"
timeout -k 5 "$(cap 420)" python3 experiments/bench_moe.py --tokens 65536 --impls padded,gpu \
  --no_gmm --ragged_max_tokens 0 --out "$OUT/bench_moe.jsonl" >> "$OUT/moe.log" 2>&1
echo "[moe 65536] done at $((SECONDS - t0)) s" >> "$OUT/moe.log"
grep -E "ratio|done|Error|'layer'" "$OUT/moe.log" | tail -n 24
