#!/usr/bin/env bash
# One command on nvidia-h200-x2 (< 10 min), issue 9: the first 20 layers of MiniMax-Text-01 at
# full width (inference: decode b1/b16, prefill 8K/32K) and then a training step of a 2-layer
# full-width slice (lightning + softmax, seq 4K and 8K), both EP=2 with the ep_fold rules.
# Each part runs under `timeout` with a --budget_s below it (rows that would not fit are skipped
# with a row saying so); the training part runs whatever the inference part did. A part that
# measured nothing is retried once with the tp_ep rules (attention replicated, the Pallas lightning
# kernel, one compile at a time) if time is left. DEADLINE (s) bounds the whole script.
# Results (fullscale.jsonl, train.jsonl), logs and summary.txt under $OUT.
#   OUT=/tmp/out bash experiments/fullscale/x2.sh
#   SMOKE=1 OUT=/tmp/x2 bash experiments/fullscale/x2.sh   # CPU: tiny configs on 2 devices
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# JAX caps its GPU allocator at 75% of the memory by default: the 20-layer slice needs ~116 GiB
export XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.95}
PY=${PY:-python3}
DEADLINE=${DEADLINE:-540}
t0=$SECONDS
EXTRA=()
[[ -n "${SMOKE:-}" ]] && EXTRA=(--tiny --cpu_devices 2)
left() { echo $((DEADLINE - (SECONDS - t0))); }
# part NAME MAX_S RESERVE_S KEYS SCRIPT ARGS...: run SCRIPT for at most MAX_S seconds, leaving
# RESERVE_S for what follows; budget_s 30 s below the timeout. Returns 0 if a row has one of
# KEYS (a|b: a measurement).
part() {
  local name=$1 max=$2 reserve=$3 key=$4 script=$5 cap
  shift 5
  cap=$(($(left) - reserve))
  ((cap > max)) && cap=$max
  if ((cap < 60)); then echo "[$name] skipped: ${cap} s left" | tee -a "$OUT/$name.log"; return 1; fi
  timeout -k 10 "$cap" "$PY" "experiments/fullscale/$script" --budget_s $((cap - 30)) "$@" \
    "${EXTRA[@]}" >> "$OUT/$name.log" 2>&1
  echo "[$name] exit $? at $((SECONDS - t0)) s (cap $cap s)" | tee -a "$OUT/$name.log"
  grep -qE "\"($key)\"" "$OUT/$name.jsonl" 2>/dev/null
}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv > "$OUT/env.log" 2>&1

INF=(run_fullscale.py --layers 20 --mesh expert=2 --out "$OUT/inference.jsonl")
MEASURED="decode_tok_per_s|prefill_tok_per_s"
part inference 330 180 "$MEASURED" "${INF[@]}" --rules ep_fold ||
  part inference 300 170 "$MEASURED" "${INF[@]}" --rules tp_ep --lightning_impl auto \
    --compile_workers 1
TRAIN=(train_slice.py --mesh expert=2 --out "$OUT/train.jsonl")
part train 210 0 tokens_per_s "${TRAIN[@]}" --rules ep_fold ||
  part train 150 0 tokens_per_s "${TRAIN[@]}" --rules tp_ep --shapes 1x4096 --compile_workers 1
"$PY" experiments/fullscale/common.py "$OUT/inference.jsonl" "$OUT/train.jsonl" |
  tee "$OUT/summary.txt"
echo "all done at $((SECONDS - t0)) s"
