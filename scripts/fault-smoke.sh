#!/usr/bin/env bash
# Short seeded fault-injection run (issue 14): `loadtest faults` starts its own Redis (no
# persistence, on a free port), a debug `tollgate serve` on free ports behind a TCP relay to the
# local Postgres (a fresh database), drives traffic while it kills and restarts tollgate, restarts
# Redis empty, cuts and silences Postgres, flushes the scripts and fills the connection table,
# then heals, drains and audits. Every kind of fault comes once first, then they are drawn at
# random. Everything it starts it stops; the database it creates it drops.
# Exits non-zero on any unexplained difference or any fault tollgate did not recover from.
#
# Environment: FAULT_SMOKE_DURATION (default 75s of faults), FAULT_SMOKE_SEED (default 14),
# FAULT_SMOKE_PG_URL (a server URL without a database, default postgres://postgres@127.0.0.1:5432),
# FAULT_SMOKE_SKIP_BUILD=1 to use the binaries already in target/debug.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_URL="${FAULT_SMOKE_PG_URL:-postgres://postgres@127.0.0.1:5432}"
DURATION="${FAULT_SMOKE_DURATION:-75s}"
SEED="${FAULT_SMOKE_SEED:-14}"

log() { echo "fault-smoke: $*" >&2; }

for tool in redis-server psql; do
  command -v "$tool" >/dev/null || { log "$tool is required (scripts/install-test-deps.sh installs it)"; exit 1; }
done
psql "$PG_URL/postgres" -q -c 'select 1' >/dev/null || { log "Postgres at $PG_URL does not answer"; exit 1; }

if [[ "${FAULT_SMOKE_SKIP_BUILD:-0}" != "1" ]]; then
  log "building tollgate and loadtest (debug)"
  cargo build -q -p tollgate -p loadtest
fi

started=$SECONDS
target/debug/loadtest faults --seed "$SEED" --duration "$DURATION" --pg-url "$PG_URL" \
  --rate 100 --concurrency 4 --keys 24 --max-connections 24 --gap-min 1s --gap-max 4s \
  --each-kind-first
log "passed in $((SECONDS - started)) s"
