#!/usr/bin/env bash
# One H200 (< 8 min): training-step MFU (unpacked rows, 16K tokens per step) and the MoE layer
# at 4K/16K tokens after the gather-only dispatch change. Results and logs under $OUT.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$SECONDS
timeout -k 5 300 python3 experiments/bench_train.py --out "$OUT/bench_train.jsonl" --reps 3 \
  --tokens 16384 --breakdown 4096 > "$OUT/train.log" 2>&1
echo "[train] done at $((SECONDS - t0)) s" >> "$OUT/train.log"
timeout -k 5 $((440 - (SECONDS - t0))) python3 experiments/bench_moe.py --tokens 4096,16384 \
  --ragged_max_tokens 0 --out "$OUT/bench_moe.jsonl" > "$OUT/moe.log" 2>&1
echo "all done at $((SECONDS - t0)) s"
tail -n 3 "$OUT"/*.log
