#!/usr/bin/env bash
# One command on nvidia-h200 (< 10 min): the GPU lightning kernel with segment_ids (packed rows).
# 1) the GPU tests of the lightning kernels (the packed ones compare against the fp32 recurrence);
# 2) kernel with / without segment ids and XLA with them (what "auto" runs for packed rows), fwd
#    and fwd+bwd at B2 N16 H128 T 8K and 32K, documents of ~2K tokens;
# 3) the training step on packed rows at 4K with lightning_impl gpu, then auto (XLA lightning).
# If the kernel holds up, "auto" in pallas_kernels/lightning/api.py can take it for packed rows.
set -u
DEADLINE=575
source experiments/gpu/lib.sh
timeout -k 5 "$(cap 120)" python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_lightning_gpu.py > "$OUT/pytest_gpu.log" 2>&1
echo "[pytest] rc=$? at $((SECONDS - t0)) s" >> "$OUT/packed.log"
timeout -k 5 "$(cap 150)" python3 experiments/bench_lightning.py --packed 2048 --shapes 0,1 \
  --no-fla --out "$OUT/bench_lightning.jsonl" >> "$OUT/packed.log" 2>&1
echo "[lightning packed] done at $((SECONDS - t0)) s" >> "$OUT/packed.log"
for impl in gpu auto; do
  timeout -k 5 "$(cap 150)" python3 experiments/bench_train.py --seq 4096 --tokens 16384 --reps 3 \
    --packed --lightning_impl $impl --out "$OUT/bench_train.jsonl" >> "$OUT/packed.log" 2>&1
  echo "[train packed $impl] done at $((SECONDS - t0)) s" >> "$OUT/packed.log"
done
tail -n 3 "$OUT/pytest_gpu.log"
grep -E "summary|done|rc=|Error|failed|tokens_per_s" "$OUT/packed.log" | tail -n 30
