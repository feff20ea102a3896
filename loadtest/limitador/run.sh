#!/usr/bin/env bash
# run.sh: limitador's `check_and_report` against tollgate's `/v1/admit`, driven by the same wrk
# in the same sitting against one private Redis (issue #15's comparison; not part of CI).
#
# limitador is built from its public source (github.com/Kuadrant/limitador) at commit
# 2981b2bd389d42cf668519f9aa981a53541c4278 (2026-05-07, "Merge pull request #486"), with its own
# release profile (LTO, one codegen unit), outside this repository:
#
#   git clone https://github.com/Kuadrant/limitador /tmp/limitador
#   git -C /tmp/limitador checkout 2981b2bd389d42cf668519f9aa981a53541c4278
#   apt-get install -y protobuf-compiler libclang-dev wrk   # its build needs protoc and libclang
#   (cd /tmp/limitador && cargo build --release -p limitador-server)
#
# The figures in docs/PERFORMANCE.md were taken with a shortcut that spares the hour of
# compiling RocksDB on two shared vCPUs: RocksDB, which only limitador's disk storage uses (the
# Redis storage measured here never touches it), linked from Debian's librocksdb-dev 7.8.3, and
# the one RocksDB 8.x function it lacks, reachable only through a write buffer manager that
# limitador never creates, stubbed to abort:
#
#   apt-get install -y librocksdb-dev libsnappy-dev
#   printf '#include <stdlib.h>\nvoid rocksdb_write_buffer_manager_destroy(void *p) { (void)p; abort(); }\n' >/tmp/stub.c
#   cc -O2 -fPIC -c /tmp/stub.c -o /tmp/stub.o
#   cd /tmp/limitador && ROCKSDB_LIB_DIR=/usr/lib/x86_64-linux-gnu SNAPPY_LIB_DIR=/usr/lib/x86_64-linux-gnu \
#     cargo rustc --release -p limitador-server --bin limitador-server -- -C link-arg=/tmp/stub.o
#
# then, from this repository (tollgate built with `cargo build --release -p tollgate`):
#
#   LIMITADOR_BIN=/tmp/limitador/target/release/limitador-server loadtest/limitador/run.sh
#
# What it does: starts a private redis-server on a free port; runs limitador-server with its
# Redis storage (`redis` subcommand) and limits.yaml (1,000 keys, each its own fixed-window
# counter); warms up, then `wrk -t1 -c32 -d10s --latency -s limitador.lua`; stops it. Then
# starts tollgate (release, fresh Postgres database, its own namespace) on the same Redis,
# creates 1,000 plain keys through the admin API (a rate limit that is never reached, no
# concurrency limit, no balance), and runs the same wrk with tollgate.lua: admit only, then
# admit + settle. For each run it prints requests/s, p50/p99, non-2xx replies, the server's
# CPU per request (/proc), Redis's CPU per request (`INFO cpu` used_cpu_sys + used_cpu_user,
# after minus before, divided by wrk's requests) and `INFO commandstats` after a
# `CONFIG RESETSTAT` (calls and usec_per_call of each command; the commands scripts run are
# counted there too). Everything it starts it stops; the database it creates it drops.
#
# Environment: LIMITADOR_BIN (required), TOLLGATE_BIN (default target/release/tollgate),
# RUN_DURATION (10s), RUN_WARMUP (3s), RUN_CONNECTIONS (32), RUN_KEYS (1000),
# RUN_PG_URL (postgres://postgres@127.0.0.1:5432), RUN_ONLY ("limitador", "tollgate" or both).
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=loadtest/limitador

LIMITADOR_BIN="${LIMITADOR_BIN:?set LIMITADOR_BIN to a limitador-server release binary}"
TOLLGATE_BIN="${TOLLGATE_BIN:-target/release/tollgate}"
DURATION="${RUN_DURATION:-10s}"
WARMUP="${RUN_WARMUP:-3s}"
CONNS="${RUN_CONNECTIONS:-32}"
KEYS="${RUN_KEYS:-1000}"
PG_URL="${RUN_PG_URL:-postgres://postgres@127.0.0.1:5432}"
ONLY="${RUN_ONLY:-both}"
SUFFIX="$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
DB="tollgate_wrk_${SUFFIX}"
NS="wrk${SUFFIX}"
TOKEN="wrk-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
WORK="$(mktemp -d)"
REDIS_PID="" SERVER_PID=""

log() { echo "run.sh: $*" >&2; }

# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  local rc=$?
  stop_server
  if [[ -n "$REDIS_PID" ]] && kill -0 "$REDIS_PID" 2>/dev/null; then kill -TERM "$REDIS_PID"; fi
  psql "$PG_URL/postgres" -q -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 || true
  if [[ $rc -ne 0 ]]; then tail -n 20 "$WORK"/*.log >&2 2>/dev/null || true; fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT

stop_server() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}

free_port() {
  for p in $(seq "$1" "$(($1 + 100))"); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  log "no free port from $1"
  exit 1
}

rcli() { redis-cli -p "$REDIS_PORT" "$@"; }

# Waits up to 60 s for the server just started to answer 2xx at URL.
wait_http() {
  for _ in $(seq 1 300); do
    kill -0 "$SERVER_PID" 2>/dev/null || { log "the server exited during start-up"; exit 1; }
    curl -sf -o /dev/null "$1" && return
    sleep 0.2
  done
  log "no answer from $1"
  exit 1
}

# Redis's CPU seconds so far (user + sys).
redis_cpu() {
  rcli info cpu | tr -d '\r' | awk -F: '/^used_cpu_(sys|user):/ { s += $2 } END { printf "%.6f", s }'
}

# A process's CPU seconds so far (utime + stime of /proc/<pid>/stat).
proc_cpu() {
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.6f", ($12 + $13) / hz }' "/proc/$1/stat"
}

# measure NAME URL SCRIPT [ARGS…]: warm-up, then the measured wrk run, with the CPU and
# commandstats around it.
measure() {
  local name=$1 url=$2 script=$3
  shift 3
  wrk -t1 -c"$CONNS" -d"$WARMUP" -s "$script" "$url" -- "$@" >/dev/null
  rcli config resetstat >/dev/null
  local r0 p0 r1 p1
  r0=$(redis_cpu)
  p0=$(proc_cpu "$SERVER_PID")
  wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s "$script" "$url" -- "$@" >"$WORK/wrk.txt"
  r1=$(redis_cpu)
  p1=$(proc_cpu "$SERVER_PID")
  local requests rps p50 p99 bad
  requests=$(awk '/requests in/ { print $1 }' "$WORK/wrk.txt")
  rps=$(awk '/^Requests\/sec:/ { print $2 }' "$WORK/wrk.txt")
  p50=$(awk '$1 == "50%" { print $2 }' "$WORK/wrk.txt")
  p99=$(awk '$1 == "99%" { print $2 }' "$WORK/wrk.txt")
  bad=$(awk '/Non-2xx/ { print $NF }' "$WORK/wrk.txt")
  echo "== $name"
  echo "   requests $requests in $DURATION: ${rps} req/s, p50 $p50, p99 $p99, non-2xx ${bad:-0}"
  awk -v r0="$r0" -v r1="$r1" -v p0="$p0" -v p1="$p1" -v n="$requests" 'BEGIN {
    printf "   server CPU %.1f us/request, Redis CPU %.1f us/request (Redis %.2f CPU s)\n",
      (p1 - p0) * 1e6 / n, (r1 - r0) * 1e6 / n, r1 - r0 }'
  echo "   Redis INFO commandstats (calls, usec_per_call):"
  rcli info commandstats | tr -d '\r' | grep '^cmdstat_' \
    | grep -v -e '^cmdstat_info:' -e '^cmdstat_config' \
    | sed -E 's/^cmdstat_([^:]+):calls=([0-9]+),usec=[0-9]+,usec_per_call=([0-9.]+).*/     \1 \2 \3/' \
    | sort -k2,2nr
}

REDIS_PORT=$(free_port 16500)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --logfile "$WORK/redis.log" &
REDIS_PID=$!
for _ in $(seq 1 50); do rcli ping >/dev/null 2>&1 && break; sleep 0.1; done
rcli ping >/dev/null
log "redis-server $(redis-server --version | awk '{ print $3 }') on port $REDIS_PORT; load $(cut -d' ' -f1-3 /proc/loadavg)"

if [[ "$ONLY" != tollgate ]]; then
  HTTP_PORT=$(free_port 18080)
  RLS_PORT=$(free_port 18180)
  "$LIMITADOR_BIN" --http-port "$HTTP_PORT" --rls-port "$RLS_PORT" "$HERE/limits.yaml" \
    redis "redis://127.0.0.1:$REDIS_PORT" >"$WORK/limitador.log" 2>&1 &
  SERVER_PID=$!
  wait_http "http://127.0.0.1:$HTTP_PORT/status"
  log "limitador-server $("$LIMITADOR_BIN" --version 2>/dev/null | head -n1) pid $SERVER_PID"
  measure "limitador check_and_report (redis storage)" "http://127.0.0.1:$HTTP_PORT" \
    "$HERE/limitador.lua"
  stop_server
fi

if [[ "$ONLY" != limitador ]]; then
  DATA="127.0.0.1:$(free_port 18280)"
  ADMIN="127.0.0.1:$(free_port 18380)"
  env TOLLGATE_LISTEN="$DATA" TOLLGATE_ADMIN_LISTEN="$ADMIN" \
    TOLLGATE_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" TOLLGATE_DATABASE_URL="$PG_URL/$DB" \
    TOLLGATE_REDIS_NAMESPACE="$NS" TOLLGATE_ADMIN_TOKEN="$TOKEN" \
    TOLLGATE_ENCRYPTION_KEY="$(head -c 32 /dev/urandom | base64 | tr -d '\n')" \
    TOLLGATE_CLEANUP_INTERVAL_SECONDS=0 TOLLGATE_LOG_FORMAT=json TOLLGATE_LOG=warn \
    "$TOLLGATE_BIN" serve >"$WORK/tollgate.log" 2>&1 &
  SERVER_PID=$!
  # strict: keys are created through the admin API, which needs Postgres.
  wait_http "http://$DATA/readyz?strict=true"
  log "tollgate pid $SERVER_PID on $DATA; creating $KEYS plain keys"
  seq 1 "$KEYS" | xargs -P 4 -I{} curl -sf -X POST "http://$ADMIN/admin/keys" \
    -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
    -d '{"user_id":"wrk","name":"wrk {}","rate_limit":1000000,"concurrent_limit":null}' \
    | grep -o '"key":"[^"]*"' | cut -d'"' -f4 >"$WORK/keys.txt"
  [[ $(wc -l <"$WORK/keys.txt") -eq $KEYS ]] || { log "created $(wc -l <"$WORK/keys.txt") keys"; exit 1; }
  measure "tollgate /v1/admit only (plain keys)" "http://$DATA" "$HERE/tollgate.lua" \
    "$WORK/keys.txt" admit
  measure "tollgate /v1/admit + /v1/settle (plain keys; flows/s = requests/s / 2)" \
    "http://$DATA" "$HERE/tollgate.lua" "$WORK/keys.txt" flow
  stop_server
fi
log "load after the runs $(cut -d' ' -f1-3 /proc/loadavg)"
