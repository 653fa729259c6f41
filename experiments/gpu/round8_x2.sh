#!/usr/bin/env bash
# One command on nvidia-h200-x2 (< 10 min), the measurements quoted in the README after round 7's
# fixes: EP=2 MoE at 64K tokens (both GPUs); then GPU 0: the grouped-matmul GPU tests and decode
# beside transformers' generate; GPU 1: the vision tower beside transformers. Results under $OUT.
set -u
source experiments/gpu/lib.sh
timeout -k 5 "$(cap 200)" python3 experiments/bench_moe.py --tokens 65536 --ep --ep_only \
  --out "$OUT/bench_moe.jsonl" > "$OUT/ep.log" 2>&1
echo "[ep] done at $((SECONDS - t0)) s" >> "$OUT/ep.log"
(
  export CUDA_VISIBLE_DEVICES=0
  timeout -k 5 "$(cap 90)" python3 -m pytest -q -m gpu tests/test_grouped_matmul.py \
    -p no:cacheprovider
  echo "[gpu0] tests done at $((SECONDS - t0)) s"
  timeout -k 5 "$(cap 240)" python3 experiments/bench_generate.py --prefill "" \
    --new_tokens 64 --out "$OUT/bench_generate.jsonl"
  echo "[gpu0] done at $((SECONDS - t0)) s"
) > "$OUT/gpu0.log" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout -k 5 "$(cap 300)" python3 experiments/bench_vision.py \
    --out "$OUT/bench_vision.jsonl" --budget_s 290
  echo "[gpu1] done at $((SECONDS - t0)) s"
) > "$OUT/gpu1.log" 2>&1 &
wait
echo "all done at $((SECONDS - t0)) s"
tail -n 3 "$OUT"/*.log
