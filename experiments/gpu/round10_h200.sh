#!/usr/bin/env bash
# One command on nvidia-h200 (< 10 min): decode with the matvec kernel now indexing the stacked
# weights in place (batch 1 profiled; beside the XLA path and transformers' generate), and the
# kernel's tilings on the model's decode shapes. Results under $OUT.
set -u
source experiments/gpu/lib.sh
timeout -k 5 "$(cap 100)" python3 -m pytest -q -m gpu tests/test_matvec.py \
  -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "[tests] done at $((SECONDS - t0)) s" >> "$OUT/tests.log"
(
  timeout -k 5 "$(cap 90)" python3 experiments/bench_generate.py --prefill "" --batches 1 \
    --new_tokens 64 --no_hf --profile --out "$OUT/bench_generate_profile.jsonl"
  timeout -k 5 "$(cap 200)" python3 experiments/bench_generate.py --prefill "" \
    --new_tokens 64 --variants default,1:mvxla --out "$OUT/bench_generate.jsonl"
  echo "[generate] done at $((SECONDS - t0)) s"
) > "$OUT/generate.log" 2>&1
timeout -k 5 "$(cap 240)" python3 experiments/bench_matvec.py --batches 1 --sweep \
  --out "$OUT/bench_matvec.jsonl" > "$OUT/matvec.log" 2>&1
echo "all done at $((SECONDS - t0)) s" >> "$OUT/matvec.log"
tail -n 3 "$OUT"/*.log
