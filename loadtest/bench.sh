#!/usr/bin/env bash
# Benchmark bench: a private Redis, a release tollgate and the release load harness on this
# host, optionally pinned to CPUs, then `loadtest "$@"` against them. Used for the figures in
# docs/PERFORMANCE.md ("## Load test"). Everything it starts it stops; the database it creates
# it drops.
#
#   loadtest/bench.sh --mode both --concurrency 64 --duration 20s
#   BENCH_PIN="0 1 1" loadtest/bench.sh --rate 4000 --duration 20s
#
# Environment:
#   BENCH_PIN      "<redis cpus> <tollgate cpus> <loadtest cpus>" for taskset -c, e.g. "0 1 1"
#                  (default: no pinning; "none" likewise)
#   BENCH_PG_URL   Postgres server URL without a database (default postgres://postgres@127.0.0.1:5432)
#   BENCH_REDIS_PORT  port of the private Redis (default: a free one from 16390)
#   BENCH_TOLLGATE_ENV  extra VAR=value words for tollgate's environment
#   BENCH_NO_BUILD=1  use target/release as it is
#   BENCH_SYNC=after  the measured tollgate runs with TOLLGATE_SYNC_ENABLED=false and a second
#                  tollgate (same namespace, sync on) starts when the load phase ends, to drain
#                  the usage for the checks: it stands for the sync pods on another host, so
#                  no Postgres writes share these cores while the load runs
#   BENCH_SYNC=beside  the same split, but the second tollgate (the sync pod) runs from the
#                  start, on this host: the sync's work on these cores, outside the measured
#                  process
set -euo pipefail
cd "$(dirname "$0")/.."

PG_URL="${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}"
read -r PIN_REDIS PIN_TG PIN_LT <<<"${BENCH_PIN:-none none none}"
SUFFIX="$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
DB="tollgate_bench_${SUFFIX}"
NS="bench${SUFFIX}"
TOKEN="bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
ENC_KEY="$(head -c 32 /dev/urandom | base64 | tr -d '\n')"
WORK="$(mktemp -d)"
TG_PID="" REDIS_PID="" SYNC_PID=""

log() { echo "bench: $*" >&2; }
# The taskset prefix for a CPU list ("none": no prefix). An array, not a function, so that a
# background command's $! is the process itself (taskset and env exec their command).
pin() {
  PIN=()
  if [[ -n "$1" && "$1" != none ]]; then PIN=(taskset -c "$1"); fi
}

# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  local rc=$?
  if [[ -n "$TG_PID" ]] && kill -0 "$TG_PID" 2>/dev/null; then
    kill -TERM "$TG_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$TG_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$TG_PID" 2>/dev/null || true
  fi
  if [[ -n "$SYNC_PID" ]] && kill -0 "$SYNC_PID" 2>/dev/null; then
    kill -TERM "$SYNC_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$SYNC_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$SYNC_PID" 2>/dev/null || true
  fi
  if [[ -n "$REDIS_PID" ]] && kill -0 "$REDIS_PID" 2>/dev/null; then
    kill -TERM "$REDIS_PID" 2>/dev/null || true
  fi
  psql "$PG_URL/postgres" -q -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 || true
  if [[ $rc -ne 0 && -f "$WORK/tollgate.log" ]]; then tail -n 30 "$WORK/tollgate.log" >&2; fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT

if [[ "${BENCH_NO_BUILD:-0}" != "1" ]]; then
  log "building release binaries"
  cargo build -q --release -p tollgate -p loadtest
fi

PORT="${BENCH_REDIS_PORT:-}"
if [[ -z "$PORT" ]]; then
  for p in $(seq 16390 16490); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then PORT=$p; break; fi
  done
fi
[[ -n "$PORT" ]] || { log "no free port for Redis"; exit 1; }
pin "$PIN_REDIS"
"${PIN[@]}" redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --latency-monitor-threshold 2 --slowlog-log-slower-than 1000 --logfile "$WORK/redis.log" &
REDIS_PID=$!
for _ in $(seq 1 50); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$PORT" ping >/dev/null || { log "private Redis did not start"; exit 1; }
REDIS_URL="redis://127.0.0.1:$PORT"

# The settings both tollgates share (the second one's only differ in the sync switch).
TG_ENV=(TOLLGATE_LISTEN=127.0.0.1:0 TOLLGATE_ADMIN_LISTEN=127.0.0.1:0
  TOLLGATE_REDIS_URL="$REDIS_URL" TOLLGATE_DATABASE_URL="$PG_URL/$DB"
  TOLLGATE_REDIS_NAMESPACE="$NS" TOLLGATE_ADMIN_TOKEN="$TOKEN" TOLLGATE_ENCRYPTION_KEY="$ENC_KEY"
  TOLLGATE_CLEANUP_INTERVAL_SECONDS=0 TOLLGATE_LOG_FORMAT=json TOLLGATE_LOG=warn,tollgate::app=info)
SYNC_SWITCH=()
case "${BENCH_SYNC:-here}" in
  here) ;;
  after | beside) SYNC_SWITCH=(TOLLGATE_SYNC_ENABLED=false) ;;
  *) log "BENCH_SYNC must be here, after or beside"; exit 1 ;;
esac
pin "$PIN_TG"
# shellcheck disable=SC2086
"${PIN[@]}" env "${TG_ENV[@]}" "${SYNC_SWITCH[@]}" ${BENCH_TOLLGATE_ENV:-} \
  target/release/tollgate serve >"$WORK/tollgate.log" 2>&1 &
TG_PID=$!
DATA="" ADMIN=""
for _ in $(seq 1 300); do
  kill -0 "$TG_PID" 2>/dev/null || { log "tollgate exited during start-up"; exit 1; }
  line="$(grep -m1 'tollgate serving' "$WORK/tollgate.log" || true)"
  if [[ -n "$line" ]]; then
    DATA="$(grep -o '"listen":"[^"]*"' <<<"$line" | cut -d'"' -f4)"
    ADMIN="$(grep -o '"admin":"[^"]*"' <<<"$line" | cut -d'"' -f4)"
    break
  fi
  sleep 0.2
done
[[ -n "$DATA" ]] || { log "tollgate did not start"; exit 1; }
log "redis $REDIS_URL (pid $REDIS_PID, cpus $PIN_REDIS), tollgate $DATA (pid $TG_PID, cpus $PIN_TG), loadtest cpus $PIN_LT; load $(cut -d' ' -f1-3 /proc/loadavg)"

if [[ "${BENCH_SYNC:-here}" != here ]]; then
  # after: started when the load phase is over (the harness then checks invariants and waits
  # for the streams to drain); until then nothing on this host writes usage to Postgres.
  # beside: started at once.
  (
    until [[ "$BENCH_SYNC" == beside ]] \
      || grep -q 'loadtest: checking invariants' "$WORK/loadtest.err" 2>/dev/null; do
      sleep 0.1
    done
    exec env "${TG_ENV[@]}" TOLLGATE_SYNC_CONSUMER=bench-syncer \
      target/release/tollgate serve >"$WORK/syncer.log" 2>&1
  ) &
  SYNC_PID=$!
fi

set +e
pin "$PIN_LT"
TOLLGATE_ADMIN_TOKEN="$TOKEN" "${PIN[@]}" target/release/loadtest \
  --url "http://$DATA" --admin-url "http://$ADMIN" --redis-url "$REDIS_URL" --namespace "$NS" \
  --pid "$TG_PID" --postgres-db "$DB" "$@" 2> >(tee "$WORK/loadtest.err" >&2)
rc=$?
set -e
# Redis-side stalls: events over 2 ms (LATENCY) and commands over 1 ms (SLOWLOG).
log "redis LATENCY LATEST (event, at, latest ms, max ms): $(redis-cli -p "$PORT" latency latest | paste -sd' ')"
log "redis SLOWLOG: $(redis-cli -p "$PORT" slowlog len) commands over 1 ms; slowest: $(redis-cli -p "$PORT" slowlog get 3 | paste -sd' ' | cut -c1-300)"
log "load after the run $(cut -d' ' -f1-3 /proc/loadavg)"
exit $rc
