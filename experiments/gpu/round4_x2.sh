#!/usr/bin/env bash
# One command on nvidia-h200-x2 (< 10 min): the EP=2 MoE layer at 64K tokens with the padded
# all_to_all (the GPU default since round 1), then issue 9's full-width slices
# (experiments/fullscale/x2.sh) in the time left. Results and logs under $OUT.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
t0=$SECONDS
timeout -k 5 130 python3 experiments/bench_moe.py --tokens 65536 --ep --ep_only \
  --out "$OUT/bench_moe.jsonl" > "$OUT/ep.log" 2>&1
echo "[ep] done at $((SECONDS - t0)) s" | tee -a "$OUT/ep.log"
DEADLINE=$((565 - (SECONDS - t0))) bash experiments/fullscale/x2.sh
echo "round4 done at $((SECONDS - t0)) s"
