#!/usr/bin/env bash
# One command on nvidia-h200-x2 (< 10 min): EP=2 MoE at 64K tokens with 1 and 2 micro-batches
# (independent exchanges that can overlap the other's expert matmuls), then with XLA's latency
# hiding scheduler forced on; then in parallel, GPU 0: decode beside transformers' generate;
# GPU 1: the one-GPU MoE layer at 4K tokens (profiled). Results under $OUT.
set -u
DEADLINE=580
source experiments/gpu/lib.sh
timeout -k 5 "$(cap 210)" python3 experiments/bench_moe.py --tokens 65536 --ep --ep_only \
  --ep_microbatches 1,2 --out "$OUT/bench_moe.jsonl" > "$OUT/ep.log" 2>&1
echo "[ep] done at $((SECONDS - t0)) s" >> "$OUT/ep.log"
XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true" timeout -k 5 "$(cap 120)" \
  python3 experiments/bench_moe.py --tokens 65536 --ep --ep_only --ep_microbatches 2 \
  --out "$OUT/bench_moe.jsonl" > "$OUT/ep_lhs.log" 2>&1
echo "[ep_lhs] done at $((SECONDS - t0)) s" >> "$OUT/ep_lhs.log"
(
  export CUDA_VISIBLE_DEVICES=0
  timeout -k 5 "$(cap 230)" python3 experiments/bench_generate.py --prefill "" \
    --new_tokens 64 --out "$OUT/bench_generate.jsonl"
  echo "[gpu0] done at $((SECONDS - t0)) s"
) > "$OUT/gpu0.log" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout -k 5 "$(cap 200)" python3 experiments/bench_moe.py --tokens 4096 \
    --ragged_max_tokens 0 --profile --out "$OUT/bench_moe_4k.jsonl"
  echo "[gpu1] done at $((SECONDS - t0)) s"
) > "$OUT/gpu1.log" 2>&1 &
wait
echo "all done at $((SECONDS - t0)) s"
tail -n 3 "$OUT"/*.log
