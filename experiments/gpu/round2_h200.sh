#!/usr/bin/env bash
# One command on one H200 (< 10 min): decode at batch 1 and 16 (+ transformers) and prefill
# scaling, the training-step MFU benchmark, the vision tower. Results and logs under $OUT.
#   bash experiments/gpu/round2_h200.sh
set -u
DEADLINE=${DEADLINE:-570}
source experiments/gpu/lib.sh
{
  nvidia-smi --query-gpu=name,memory.total --format=csv
  timeout -k 5 "$(cap 240)" python3 experiments/bench_generate.py \
    --out "$OUT/bench_generate.jsonl" --new_tokens 64 --prefill 16384,131072 --chunk 4096 \
    --variants default,16:gather32
  echo "[generate] done at $((SECONDS - t0)) s"
} > "$OUT/generate.log" 2>&1
{
  timeout -k 5 "$(cap 170)" python3 experiments/bench_train.py --out "$OUT/bench_train.jsonl" \
    --reps 3
  echo "[train] done at $((SECONDS - t0)) s"
} > "$OUT/train.log" 2>&1
{
  timeout -k 5 "$(cap 165)" python3 experiments/bench_vision.py --out "$OUT/bench_vision.jsonl"
  echo "[vision] done at $((SECONDS - t0)) s"
} > "$OUT/vision.log" 2>&1
echo "all done at $((SECONDS - t0)) s"
tail -n 3 "$OUT"/*.log
