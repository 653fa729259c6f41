#!/usr/bin/env bash
# One command on nvidia-h200-x2 (< 10 min), after round 6's profiles: EP=2 at 64K tokens with
# the bucketed receive FFN (custom VJP) on both GPUs; then GPU 0: decode-sized matmul
# formulations (bench_matvec.py) and decode with the profile; GPU 1: the vision tower profile
# (ours first, then transformers). Results and logs under $OUT.
set -u
source experiments/gpu/lib.sh
timeout -k 5 "$(cap 220)" python3 experiments/bench_moe.py --tokens 65536 --ep --ep_only \
  --profile --out "$OUT/bench_moe.jsonl" > "$OUT/ep.log" 2>&1
echo "[ep] done at $((SECONDS - t0)) s" >> "$OUT/ep.log"
(
  export CUDA_VISIBLE_DEVICES=0
  timeout -k 5 "$(cap 120)" python3 experiments/bench_matvec.py --out "$OUT/bench_matvec.jsonl"
  echo "[gpu0] matvec done at $((SECONDS - t0)) s"
  timeout -k 5 "$(cap 150)" python3 experiments/bench_generate.py --no_hf --prefill "" \
    --new_tokens 64 --profile --variants default,16:gather32 --out "$OUT/bench_generate.jsonl"
  echo "[gpu0] done at $((SECONDS - t0)) s"
) > "$OUT/gpu0.log" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout -k 5 "$(cap 200)" python3 experiments/bench_vision.py --profile \
    --out "$OUT/bench_vision.jsonl" --budget_s 190
  echo "[gpu1] done at $((SECONDS - t0)) s"
) > "$OUT/gpu1.log" 2>&1 &
wait
echo "all done at $((SECONDS - t0)) s"
tail -n 3 "$OUT"/*.log
