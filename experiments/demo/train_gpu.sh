#!/usr/bin/env bash
# Trains and exports the demo model in one device call (one GPU, < 9 minutes; issue #25).
#
#   # here (CPU): corpus, tokenizer (held-out files excluded from both), packed for the trip
#   python experiments/demo/build_corpus.py --out /tmp/demo_corpus
#   python -m minimax_jax.tokenizer_train --input /tmp/demo_corpus/train --glob '**/*.py' \
#     --exclude __pycache__ --vocab_size 8192 --output /tmp/demo/tokenizer
#   echo /.demo_data/ >> .git/info/exclude   # and grain's wheels in .whl (device README)
#   mkdir -p .demo_data && cp -r /tmp/demo/tokenizer .demo_data/ && tar --sort=name --mtime=@0 \
#     --owner=0 --group=0 --numeric-owner -C /tmp -cf - demo_corpus/train | xz -6 -T2 \
#     > .demo_data/corpus.tar.xz
#   # on the GPU machine (device tool, carry [".whl", ".demo_data"]):
#   OUT=$OUT bash experiments/demo/train_gpu.sh
#   # back here: held-out bits per byte of old and new (each at its training length)
#   python experiments/demo/eval_bpb.py --checkpoint OLD --window 256
#   python experiments/demo/eval_bpb.py --checkpoint NEW --window 2048
#
# 1) a timing run of PROBE_STEPS steps of configs/train/demo_gpu.yaml (also exercises eval,
#    checkpoint and export, so a broken install fails here, in the first minutes);
# 2) train.steps chosen so the real run, started afresh, ends DEADLINE - EXPORT_S seconds after
#    this script started (measured step time and start-up cost, 10% margin, within
#    [MIN_STEPS, MAX_STEPS]); it runs under `timeout`, and SIGTERM makes it save a checkpoint;
# 3) export of the newest checkpoint in bfloat16 to $OUT/demo_model, with metrics.jsonl and
#    the logs in $OUT.
# NO_PROBE=1 DECAY=N (for a short lease): no timing run; the cosine ends at step N, later steps
# run at the final rate, and the deadline stops the run (checked on CPU: SIGTERM saves, export).
# DRY=1 runs the same steps on CPU with a tiny batch (the pipeline check before a GPU call).
set -u
OUT=${OUT:-/tmp/out}
DATA=${DATA:-.demo_data}
CFG=${CFG:-configs/train/demo_gpu.yaml}
DEADLINE=${DEADLINE:-500}
EXPORT_S=${EXPORT_S:-50}
PROBE_STEPS=${PROBE_STEPS:-40}
MIN_STEPS=${MIN_STEPS:-300}
MAX_STEPS=${MAX_STEPS:-8000}
PY=${PY:-python3}
t0=$SECONDS
mkdir -p "$OUT"
LOG="$OUT/train.log"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
SET=()
if [[ -n "${DRY:-}" ]]; then
  SET=(--set data.batch_size=2 --set data.seq_len=256 --set train.log_every=1
       --set checkpoint.every=2)
  PROBE_STEPS=3 MIN_STEPS=4 MAX_STEPS=4 DEADLINE=${DRY_DEADLINE:-900} STEPS=${STEPS:-6}
fi
say() { echo "[train_gpu $((SECONDS - t0)) s] $*" | tee -a "$LOG"; }

if [[ -z "${DRY:-}" ]] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { say "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG" 2>&1
if [[ ! -d /tmp/demo_corpus/train ]]; then
  tar -xJf "$DATA/corpus.tar.xz" -C /tmp || { say "corpus unpack failed"; exit 1; }
fi
mkdir -p /tmp/demo && rm -rf /tmp/demo/tokenizer && cp -r "$DATA/tokenizer" /tmp/demo/tokenizer
say "corpus: $(find /tmp/demo_corpus/train -name '*.py' | wc -l) files"

if [[ -n "${NO_PROBE:-}" ]]; then
  # No timing run (a short device lease): train.steps stays out of reach, the cosine ends at
  # optim.decay_steps and later steps run at the final rate; `timeout` ends the run.
  STEPS=${STEPS:-100000}
  SET+=(--set optim.decay_steps="${DECAY:?NO_PROBE=1 needs DECAY, the cosine length in steps}")
  say "no timing run: --steps $STEPS, cosine over $DECAY steps, stopped by the deadline"
else
# 1) timing run (eval at its last step, one checkpoint, one export)
rm -rf /tmp/probe /tmp/probe_export
p0=$SECONDS
timeout -k 10 240 "$PY" -m minimax_jax.train --config "$CFG" --workdir /tmp/probe \
  --steps "$PROBE_STEPS" --set train.eval_every=0 --set checkpoint.every="$PROBE_STEPS" \
  --set train.log_every=1 \
  "${SET[@]}" > "$OUT/probe.log" 2>&1
rc=$?
probe_s=$((SECONDS - p0))
"$PY" -m minimax_jax.train --export /tmp/probe_export --workdir /tmp/probe \
  --export_dtype bfloat16 >> "$OUT/probe.log" 2>&1
erc=$?
say "probe: rc=$rc export rc=$erc in ${probe_s} s"
if ((rc != 0 || erc != 0)); then tail -n 30 "$OUT/probe.log"; exit 1; fi

# 2) steps that fit: median step time over the second half of the probe's logged steps
STEPS=$("$PY" - "$probe_s" "$PROBE_STEPS" "$((DEADLINE - EXPORT_S - (SECONDS - t0)))" \
  "$MIN_STEPS" "$MAX_STEPS" "$CFG" "${SET[@]}" <<'EOF'
import json, statistics, sys
from minimax_jax.training import run_config as train_config
probe_s, n, left, lo, hi = (float(a) for a in sys.argv[1:6])
cfg = train_config.load(sys.argv[6], [a for a in sys.argv[7:] if a != "--set"])
rows = [json.loads(l) for l in open("/tmp/probe/metrics.jsonl") if "tokens_per_s" in l]
step_s = statistics.median(cfg.data.batch_size * cfg.data.seq_len / r["tokens_per_s"]
                           for r in rows if r["step"] > n / 2)
startup = max(probe_s - n * step_s, 0.0)
steps = int(0.9 * (left - startup) / step_s)
print(max(int(lo), min(int(hi), steps)), f"step_s={step_s:.4f} startup_s={startup:.0f}",
      f"left_s={left:.0f}")
EOF
)
say "plan: $STEPS"
STEPS=${STEPS%% *}
fi

# 3) the run, ending by the deadline whatever the estimate said (SIGTERM saves a checkpoint)
rm -rf /tmp/run
left=$((DEADLINE - EXPORT_S - (SECONDS - t0)))
timeout -k 20 "$left" "$PY" -m minimax_jax.train --config "$CFG" --workdir /tmp/run \
  --steps "$STEPS" "${SET[@]}" >> "$LOG" 2>&1
say "train rc=$?"
"$PY" -m minimax_jax.train --export "$OUT/demo_model" --workdir /tmp/run \
  --export_dtype bfloat16 >> "$LOG" 2>&1
say "export rc=$?"
cp /tmp/run/metrics.jsonl "$OUT/metrics.jsonl"
grep eval_loss /tmp/run/metrics.jsonl | tail -n 3
tail -n 5 "$LOG"
