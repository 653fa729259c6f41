#!/usr/bin/env bash
# One command on nvidia-h200 (< 10 min): GPU tests of the grouped matmuls (incl. the new
# "padded" backend), the batched-GEMM probe (capacity-padded groups vs dense and the Mosaic
# kernels), and the MoE layer at 4K/16K/64K tokens with the Mosaic kernels and "padded".
set -u
DEADLINE=580
source experiments/gpu/lib.sh
timeout -k 5 "$(cap 120)" python3 -m pytest -q -m gpu tests/test_grouped_matmul.py \
  -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "[tests] done at $((SECONDS - t0)) s" >> "$OUT/tests.log"
timeout -k 5 "$(cap 120)" python3 experiments/probe_bmm.py --out "$OUT/probe_bmm.jsonl" \
  > "$OUT/probe.log" 2>&1
echo "[probe] done at $((SECONDS - t0)) s" >> "$OUT/probe.log"
timeout -k 5 "$(cap 330)" python3 experiments/bench_moe.py --tokens 4096,65536,16384 \
  --impls gpu,padded --ragged_max_tokens 4096 --out "$OUT/bench_moe.jsonl" > "$OUT/moe.log" 2>&1
echo "all done at $((SECONDS - t0)) s" >> "$OUT/moe.log"
tail -n 3 "$OUT"/*.log
