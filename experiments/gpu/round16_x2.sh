#!/usr/bin/env bash
# One command on nvidia-h200-x2 (< 10 min): EP=2 MoE at 64K tokens with the padded expert FFN
# (receive buffer straight into per-expert blocks) and finer buffer buckets, then the same with
# the Mosaic grouped kernels.
set -u
DEADLINE=570
source experiments/gpu/lib.sh
for impl in padded gpu; do
  timeout -k 5 "$(cap 300)" python3 experiments/bench_moe.py --tokens 65536 --ep --ep_only \
    --impls $impl --out "$OUT/bench_moe.jsonl" >> "$OUT/ep.log" 2>&1
  echo "[ep $impl] done at $((SECONDS - t0)) s" >> "$OUT/ep.log"
done
grep -E "layer_ep|done|Error|'layer'" "$OUT/ep.log" | tail -n 20
