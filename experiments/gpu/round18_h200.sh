#!/usr/bin/env bash
# One command on nvidia-h200 (< 10 min): the acceptance table at 64K tokens (auto = padded, and
# the Mosaic kernels, beside the dense FFN; ragged_dot is left out at 64K: ~1 s per forward).
set -u
DEADLINE=575
source experiments/gpu/lib.sh
timeout -k 5 "$(cap 500)" python3 experiments/bench_moe.py --tokens 65536 --impls auto,gpu \
  --no_gmm --ragged_max_tokens 0 --out "$OUT/bench_moe.jsonl" >> "$OUT/moe.log" 2>&1
echo "[moe 65536] done at $((SECONDS - t0)) s" >> "$OUT/moe.log"
grep -E "ratio|done|Error|'layer'" "$OUT/moe.log" | tail -n 24
