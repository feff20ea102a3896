#!/usr/bin/env bash
# Installs what the integration tests start themselves, when missing: nginx and Caddy (proxy
# end-to-end tests), redis-server/redis-cli (private Redis and Redis Cluster), and Postgres's
# initdb/pg_ctl (a private Postgres for outage tests). The test harness calls this too, so
# `cargo test` works on a fresh machine. Idempotent and quiet when all is there.
# Also the Python tools of the OpenAPI tests (openapi-spec-validator, Schemathesis), pinned in
# scripts/test-tools-requirements.txt, in a virtualenv at $TOLLGATE_TEST_VENV (default
# ~/.cache/tollgate-test-tools); tests find it there (tests/it/common/tools.rs).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="${TOLLGATE_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tollgate-test-tools}"
REQS="$ROOT/scripts/test-tools-requirements.txt"

# The virtualenv is current when it was built from exactly this requirements file.
venv_current() {
  [ -x "$VENV/bin/schemathesis" ] && [ -x "$VENV/bin/openapi-spec-validator" ] \
    && cmp -s "$REQS" "$VENV/.requirements"
}

install_python_tools() {
  venv_current && return 0
  mkdir -p "$(dirname "$VENV")"
  # Test binaries run in parallel and each may call this script: one builds, the others wait.
  exec 9>"$VENV.lock"
  flock 9
  venv_current && return 0
  rm -rf "$VENV"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    apt_install python3-venv python3-pip
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQS"
  cp "$REQS" "$VENV/.requirements"
  echo "installed: Python test tools in $VENV"
}

APT_UPDATED=0
apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing $*: run as root, or install them (apt-get install $*)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Install without starting the packages' own services (nginx on :80 and the like).
  local cleanup_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    cleanup_policy=1
  fi
  if [ "$APT_UPDATED" = 0 ]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  if [ $cleanup_policy -eq 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  echo "installed: $*"
}

need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v caddy >/dev/null 2>&1 || need+=(caddy)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-venv)
command -v flock >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  apt_install "${need[@]}"
fi
install_python_tools
