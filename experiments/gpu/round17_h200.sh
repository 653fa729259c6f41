#!/usr/bin/env bash
# One command on nvidia-h200 (< 10 min): the GPU tests of the padded FFN (now what "auto" runs
# on GPU for bf16), then the acceptance table at 4K and 16K tokens: the layer with "auto"
# (padded) and the Mosaic kernels ("gpu"), beside the dense FFN and jax.lax.ragged_dot.
set -u
DEADLINE=575
source experiments/gpu/lib.sh
timeout -k 5 "$(cap 120)" python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_moe_padded.py tests/test_grouped_matmul.py > "$OUT/pytest_gpu.log" 2>&1
echo "[pytest] rc=$? at $((SECONDS - t0)) s" >> "$OUT/moe.log"
for m in 4096 16384; do
  timeout -k 5 "$(cap 240)" python3 experiments/bench_moe.py --tokens $m --impls auto,gpu \
    --out "$OUT/bench_moe.jsonl" >> "$OUT/moe.log" 2>&1
  echo "[moe $m] done at $((SECONDS - t0)) s" >> "$OUT/moe.log"
done
tail -n 3 "$OUT/pytest_gpu.log"
grep -E "ratio|done|rc=|Error|'layer'" "$OUT/moe.log" | tail -n 30
