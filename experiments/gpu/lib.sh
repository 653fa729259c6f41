# Shared by the round drivers (source it): output folder, environment, and `cap MAX`, the seconds
# a part may take: at most MAX and what is left before $DEADLINE (seconds from sourcing).
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
DEADLINE=${DEADLINE:-560}
t0=$SECONDS
cap() {
  local left=$((DEADLINE - (SECONDS - t0)))
  ((left < $1)) && echo $((left > 1 ? left : 1)) || echo "$1"
}
