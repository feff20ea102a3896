#!/usr/bin/env bash
# Smoke run of the load harness against the real `tollgate serve` binary.
#
# Builds tollgate and loadtest (debug), starts tollgate on free loopback ports with a fresh
# Postgres database, a fresh Redis namespace, a random admin token and encryption key, runs
# every phase of the harness briefly at low concurrency (Redis ceiling, Redis time per script
# against the reference, the HTTP mix, memory per key) and requires it to exit 0 (every invariant held). The limits are set small (a 2 s
# rate window, rate limit 2, concurrency limit 2 with two hot keys) so that rate and
# concurrency denials, and their checks, happen even in a 3-second run. Then stops tollgate with SIGTERM
# (it must exit 0), drops the database and deletes the namespace's keys. Exits non-zero on any
# failure.
#
# tollgate and the harness run in state format 2 (TOLLGATE_STATE_FORMAT, holds in the live set's
# members), so that its HTTP mix of balances, holds and concurrency limits is checked under load
# in the format the default does not exercise (the fault run, .ci/run's last step, keeps the
# default); the script-cost phases then measure held keys in both formats.
#
# Environment: SMOKE_REDIS_URL (default redis://127.0.0.1:6379), SMOKE_PG_URL (a server URL
# without a database, default postgres://postgres@127.0.0.1:5432), SMOKE_DURATION (default 3s),
# SMOKE_SKIP_BUILD=1 to use the binaries already in target/debug.
set -euo pipefail
cd "$(dirname "$0")/.."

REDIS_URL="${SMOKE_REDIS_URL:-redis://127.0.0.1:6379}"
PG_URL="${SMOKE_PG_URL:-postgres://postgres@127.0.0.1:5432}"
DURATION="${SMOKE_DURATION:-3s}"
SUFFIX="$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
DB="tollgate_smoke_${SUFFIX}"
NS="smoke${SUFFIX}"
TOKEN="smoke-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
ENC_KEY="$(head -c 32 /dev/urandom | base64 | tr -d '\n')"
WORK="$(mktemp -d)"
LOG="$WORK/tollgate.log"
PID=""

log() { echo "loadtest-smoke: $*" >&2; }

# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  local rc=$?
  if [[ -n "$PID" ]] && kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$PID" 2>/dev/null || true
  fi
  psql "$PG_URL/postgres" -q -v ON_ERROR_STOP=1 \
    -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 \
    || log "warning: could not drop database $DB"
  redis-cli -u "$REDIS_URL" --scan --pattern "$NS:*" 2>/dev/null \
    | xargs -r -n 500 redis-cli -u "$REDIS_URL" UNLINK >/dev/null 2>&1 \
    || log "warning: could not delete Redis namespace $NS"
  if [[ $rc -ne 0 && -f "$LOG" ]]; then
    log "tollgate's log (last 40 lines):"
    tail -n 40 "$LOG" >&2 || true
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT

for tool in redis-cli psql; do
  command -v "$tool" >/dev/null || { log "$tool is required"; exit 1; }
done
redis-cli -u "$REDIS_URL" ping >/dev/null || { log "Redis at $REDIS_URL does not answer"; exit 1; }
psql "$PG_URL/postgres" -q -c 'select 1' >/dev/null || { log "Postgres at $PG_URL does not answer"; exit 1; }

if [[ "${SMOKE_SKIP_BUILD:-0}" != "1" ]]; then
  log "building tollgate and loadtest (debug)"
  cargo build -q -p tollgate -p loadtest
fi
BIN=target/debug

# Port 0: the kernel picks free ports, and tollgate logs the addresses it bound.
log "starting tollgate (database $DB, namespace $NS)"
TOLLGATE_LISTEN=127.0.0.1:0 \
TOLLGATE_ADMIN_LISTEN=127.0.0.1:0 \
TOLLGATE_REDIS_URL="$REDIS_URL" \
TOLLGATE_DATABASE_URL="$PG_URL/$DB" \
TOLLGATE_REDIS_NAMESPACE="$NS" \
TOLLGATE_ADMIN_TOKEN="$TOKEN" \
TOLLGATE_ENCRYPTION_KEY="$ENC_KEY" \
TOLLGATE_RATE_WINDOW_SECONDS=2 \
TOLLGATE_STATE_FORMAT=2 \
TOLLGATE_CLEANUP_INTERVAL_SECONDS=0 \
TOLLGATE_LOG_FORMAT=json \
TOLLGATE_LOG=info \
  "$BIN/tollgate" serve >"$LOG" 2>&1 &
PID=$!

DATA="" ADMIN=""
for _ in $(seq 1 300); do
  if ! kill -0 "$PID" 2>/dev/null; then
    log "tollgate exited during start-up"
    exit 1
  fi
  line="$(grep -m1 'tollgate serving' "$LOG" || true)"
  if [[ -n "$line" ]]; then
    DATA="$(grep -o '"listen":"[^"]*"' <<<"$line" | cut -d'"' -f4)"
    ADMIN="$(grep -o '"admin":"[^"]*"' <<<"$line" | cut -d'"' -f4)"
    break
  fi
  sleep 0.2
done
if [[ -z "$DATA" || -z "$ADMIN" ]]; then
  log "tollgate did not report its listeners within 60 s"
  exit 1
fi
log "tollgate pid $PID serving on $DATA (admin $ADMIN)"

set +e
TOLLGATE_ADMIN_TOKEN="$TOKEN" "$BIN/loadtest" \
  --url "http://$DATA" --admin-url "http://$ADMIN" \
  --redis-url "$REDIS_URL" --namespace "$NS" \
  --mode both --ceiling-duration 1s --ceiling-connections 2 --ceiling-pipeline 16 --ceiling-keys 100 \
  --script-cost --state-format 2 \
  --duration "$DURATION" --concurrency 6 --keys 200 --invalid-keys 20 \
  --limited-rate-limit 2 --concurrent-limit 2 --hot-keys 2 --hot-share 0.5 --hold 1ms \
  --token-limit 1000 --reserve-tokens 400 --budget-usd 0.003 \
  --memory --pid "$PID" --sync-timeout 30s --threads 2
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
  log "loadtest failed (exit $rc)"
  exit 1
fi

# The per-operation Lua costs (docs/PERFORMANCE.md), briefly, so that the tool keeps working;
# its figures mean nothing here.
"$BIN/loadtest" lua-costs --redis-url "$REDIS_URL" --rounds 1 --calls 2 --iterations 50 >/dev/null \
  || { log "loadtest lua-costs failed"; exit 1; }

log "stopping tollgate (SIGTERM)"
kill -TERM "$PID"
stopped=0
for _ in $(seq 1 150); do
  if ! kill -0 "$PID" 2>/dev/null; then stopped=1; break; fi
  sleep 0.2
done
if [[ $stopped -ne 1 ]]; then
  log "tollgate did not stop within 30 s of SIGTERM"
  exit 1
fi
set +e
wait "$PID"
trc=$?
set -e
PID=""
if [[ $trc -ne 0 ]]; then
  log "tollgate exited with $trc after SIGTERM"
  exit 1
fi
log "passed"
