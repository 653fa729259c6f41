#!/usr/bin/env bash
# One command on nvidia-h200-x2 (< 10 min): the EP=2 MoE rows on both GPUs, then single-GPU
# benchmarks on both GPUs at once (each process sees one GPU). Every part has a time cap and
# the whole script a deadline. Results and logs under $OUT (at most 8 files).
#   bash experiments/gpu/round1_x2.sh
set -u
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
DEADLINE=${DEADLINE:-565}
source experiments/gpu/lib.sh
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  python3 -c "import jax, flax; print(jax.__version__, flax.__version__, jax.devices())"
  timeout -k 5 "$(cap 170)" python3 experiments/bench_moe.py --tokens 65536 --ep \
    --out "$OUT/bench_moe.jsonl"
  echo "[ep] done at $((SECONDS - t0)) s"
} > "$OUT/ep.log" 2>&1
(
  export CUDA_VISIBLE_DEVICES=0
  timeout -k 5 "$(cap 60)" python3 -m pytest -q -m gpu tests/test_grouped_matmul.py -x \
    -p no:cacheprovider
  timeout -k 5 "$(cap 200)" python3 experiments/bench_moe.py --tokens 4096,16384 --sweep \
    --out "$OUT/bench_moe.jsonl"
  echo "[gpu0] moe done at $((SECONDS - t0)) s"
  timeout -k 5 "$(cap 150)" python3 experiments/bench_vision.py --out "$OUT/bench_vision.jsonl"
  echo "[gpu0] done at $((SECONDS - t0)) s"
) > "$OUT/gpu0.log" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout -k 5 "$(cap 200)" python3 experiments/bench_generate.py \
    --out "$OUT/bench_generate.jsonl" --new_tokens 64 --prefill 16384,131072 --chunk 4096 \
    --variants base,sync16+unroll,sync16+unroll+gather32
  echo "[gpu1] generate done at $((SECONDS - t0)) s"
  timeout -k 5 "$(cap 150)" python3 experiments/bench_train.py --out "$OUT/bench_train.jsonl" \
    --reps 3
  echo "[gpu1] train done at $((SECONDS - t0)) s"
  XLA_FLAGS="$CB" timeout -k 5 "$(cap 90)" python3 experiments/bench_generate.py --no_hf \
    --prefill "" --out "$OUT/bench_generate.jsonl" --new_tokens 64 \
    --variants base,sync16+unroll+gather32
  echo "[gpu1] done at $((SECONDS - t0)) s"
) > "$OUT/gpu1.log" 2>&1 &
wait
echo "all done at $((SECONDS - t0)) s"
tail -n 4 "$OUT"/*.log
