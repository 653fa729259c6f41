#!/usr/bin/env bash
# One command on nvidia-h200 (< 10 min): the decode matvec kernel (GPU tests, formulations,
# block sweep), decode beside transformers' generate with and without it (batch 1 profiled),
# and the MoE layer at 4K/64K tokens after dropping tgmm's masking pass. Results under $OUT.
set -u
source experiments/gpu/lib.sh
timeout -k 5 "$(cap 150)" python3 -m pytest -q -m gpu tests/test_matvec.py \
  tests/test_grouped_matmul.py -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "[tests] done at $((SECONDS - t0)) s" >> "$OUT/tests.log"
timeout -k 5 "$(cap 100)" python3 experiments/bench_matvec.py --batches 1 --sweep \
  --out "$OUT/bench_matvec.jsonl" > "$OUT/matvec.log" 2>&1
echo "[matvec] done at $((SECONDS - t0)) s" >> "$OUT/matvec.log"
(
  timeout -k 5 "$(cap 90)" python3 experiments/bench_generate.py --prefill "" --batches 1 \
    --new_tokens 64 --no_hf --profile --out "$OUT/bench_generate_profile.jsonl"
  timeout -k 5 "$(cap 200)" python3 experiments/bench_generate.py --prefill "" \
    --new_tokens 64 --variants default,1:mvxla --out "$OUT/bench_generate.jsonl"
  echo "[generate] done at $((SECONDS - t0)) s"
) > "$OUT/generate.log" 2>&1
timeout -k 5 "$(cap 150)" python3 experiments/bench_moe.py --tokens 4096,65536 \
  --ragged_max_tokens 0 --out "$OUT/bench_moe.jsonl" > "$OUT/moe.log" 2>&1
echo "all done at $((SECONDS - t0)) s" >> "$OUT/moe.log"
tail -n 3 "$OUT"/*.log
