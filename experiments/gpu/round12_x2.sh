#!/usr/bin/env bash
# One command on nvidia-h200-x2 (< 5 min): EP=2 MoE at 64K tokens after bucketing the padded
# all-to-all's chunk size (and the fix of the forward+backward's type error of round 11).
set -u
DEADLINE=290
source experiments/gpu/lib.sh
timeout -k 5 "$(cap 280)" python3 experiments/bench_moe.py --tokens 65536 --ep --ep_only \
  --out "$OUT/bench_moe.jsonl" > "$OUT/ep.log" 2>&1
echo "[ep] done at $((SECONDS - t0)) s" >> "$OUT/ep.log"
tail -n 12 "$OUT"/ep.log
