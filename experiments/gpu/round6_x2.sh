#!/usr/bin/env bash
# One command on nvidia-h200-x2 (< 10 min): kernel profiles (experiments/profiling.py).
# EP=2 MoE at 64K tokens on both GPUs (row-bucketed receive FFN, profiles of the layer and of
# the dispatch alone); then, one process per GPU: decode (batch 1, 16) and the 4K MoE layer on
# GPU 0, the vision tower beside transformers on GPU 1. The decode loop's optimised HLO is
# kept (tar) so that the profile's op names can be read. Results and logs under $OUT.
set -u
source experiments/gpu/lib.sh
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  timeout -k 5 "$(cap 200)" python3 experiments/bench_moe.py --tokens 65536 --ep --ep_only \
    --profile --out "$OUT/bench_moe.jsonl"
  echo "[ep] done at $((SECONDS - t0)) s"
} > "$OUT/ep.log" 2>&1
(
  export CUDA_VISIBLE_DEVICES=0
  XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_module_re=.*loop.* --xla_dump_hlo_as_text" \
    timeout -k 5 "$(cap 150)" python3 experiments/bench_generate.py --no_hf --prefill "" \
    --new_tokens 64 --profile --out "$OUT/bench_generate.jsonl"
  (cd /tmp/dump 2>/dev/null && ls | grep -E "after_optimizations.txt$" | head -4 |
    tar czf "$OUT/decode_hlo.tgz" -T -)
  echo "[gpu0] generate done at $((SECONDS - t0)) s"
  timeout -k 5 "$(cap 200)" python3 experiments/bench_moe.py --tokens 4096 --profile \
    --ragged_max_tokens 0 --out "$OUT/bench_moe.jsonl"
  echo "[gpu0] done at $((SECONDS - t0)) s"
) > "$OUT/gpu0.log" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  XLA_FLAGS="--xla_dump_to=/tmp/vdump --xla_dump_hlo_module_re=.*encode.* --xla_dump_hlo_as_text" \
    timeout -k 5 "$(cap 200)" python3 experiments/bench_vision.py --profile \
    --out "$OUT/bench_vision.jsonl" --budget_s 190
  (cd /tmp/vdump 2>/dev/null && ls | grep -E "after_optimizations.txt$" | head -4 |
    tar czf "$OUT/vision_hlo.tgz" -T -)
  echo "[gpu1] done at $((SECONDS - t0)) s"
) > "$OUT/gpu1.log" 2>&1 &
wait
echo "all done at $((SECONDS - t0)) s"
tail -n 3 "$OUT"/*.log
