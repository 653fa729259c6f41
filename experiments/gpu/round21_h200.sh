#!/usr/bin/env bash
# One command on nvidia-h200 (< 3 min): cuDNN flash attention for the softmax layers.
# 1) the GPU tests: the model with attention_impl "cudnn" vs "xla" in bf16 (plain causal, left
#    padding, packed rows), logits and every parameter gradient;
# 2) bench_attention.py: the attention core, xla vs cudnn, fwd and fwd+bwd, at the ANCHORS.md
#    shape and MiniMax-Text-01's softmax-layer shape (plain and packed).
set -u
DEADLINE=150
source experiments/gpu/lib.sh
timeout -k 5 "$(cap 60)" python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_attention_impl.py > "$OUT/pytest_gpu.log" 2>&1
echo "[pytest] rc=$? at $((SECONDS - t0)) s" >> "$OUT/attn.log"
timeout -k 5 "$(cap 85)" python3 experiments/bench_attention.py --reps 3 \
  --out "$OUT/bench_attention.jsonl" >> "$OUT/attn.log" 2>&1
echo "[attention] done at $((SECONDS - t0)) s" >> "$OUT/attn.log"
tail -n 15 "$OUT/pytest_gpu.log"
cut -c 1-400 "$OUT/attn.log" | tail -n 30
