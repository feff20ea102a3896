#!/usr/bin/env bash
# Installs what the integration tests start themselves, when missing: nginx and Caddy (proxy
# end-to-end tests), redis-server/redis-cli (private Redis and Redis Cluster), and Postgres's
# initdb/pg_ctl (a private Postgres for outage tests). The test harness calls this too, so
# `cargo test` works on a fresh machine. Idempotent and quiet when all is there.
set -euo pipefail
need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v caddy >/dev/null 2>&1 || need+=(caddy)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing ${need[*]}: run as root, or install them (apt-get install ${need[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Install without starting the packages' own services (nginx on :80 and the like).
cleanup_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  cleanup_policy=1
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
if [ $cleanup_policy -eq 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
echo "installed: ${need[*]}"
