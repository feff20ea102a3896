#!/usr/bin/env python3
"""A/B of script versions: Redis's own time per admit.lua and per settle.lua call, in one sitting.

For each `ADMIT.lua:SETTLE.lua` pair given, in turn and for several rounds: a private
redis-server (no persistence) on a free port, one key hydrated with a balance by this checkout's
hydrate.lua, 20,000 admissions (timed), then the 20,000 settlements of those leases (timed
alone). The figure is `cmdstat_evalsha` `usec_per_call` after `CONFIG RESETSTAT`: Redis's time
running the script, without the network or the client. Rounds interleave the versions, so a busy
host slows them alike; the medians are what docs/PERFORMANCE.md quotes.

    git show 116e544:lua/settle.lua > /tmp/settle_old.lua   # and so on
    ROUNDS=7 python3 loadtest/script_ab.py /tmp/admit_old.lua:/tmp/settle_old.lua lua/admit.lua:lua/settle.lua

Needs redis-server on PATH and redis-py (`pip install redis`).
"""
import os
import socket
import subprocess
import sys
import time
import uuid

import redis

HERE = os.path.dirname(os.path.abspath(__file__))
HYDRATE = os.path.join(HERE, "..", "lua", "hydrate.lua")
N = int(os.environ.get("CALLS", "20000"))
ROUNDS = int(os.environ.get("ROUNDS", "5"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def usec_per_call(r):
    return r.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]


def run_pipelined(r, calls, check):
    pipe = r.pipeline(transaction=False)
    for c in calls:
        pipe.evalsha(*c)
        if len(pipe) >= 500:
            for reply in pipe.execute():
                check(reply)
    for reply in pipe.execute():
        check(reply)


def one_round(r, admit_sha, settle_sha, hydrate_sha):
    r.flushall()
    prefix = "ab:{ab.0}:"
    sid = "0" * 32
    state, rate, live = prefix + "k:" + sid, prefix + "r:" + sid, prefix + "a:" + sid
    holds, tokens, stream = prefix + "h:" + sid, prefix + "t:" + sid, prefix + "u"
    # key, version, id, user, active, expires, providers, formats, models, rate limit,
    # concurrency limit, standalone, balance, used, token limit, budget, period, spend, start
    hydrate = ["key", 1, "kid", "uid", 1, "", "", "", "", -1, -1, 1, 10**15, 0, -1, -1, "", 0, ""]
    assert r.evalsha(hydrate_sha, 1, state, *hydrate) == b"written"
    nonces = [uuid.uuid4().hex[:22] for _ in range(N)]
    lease = lambda n: prefix + "l:" + n
    r.config_resetstat()
    run_pipelined(
        r,
        [(admit_sha, 6, state, rate, live, holds, lease(n), tokens, 60000, 600000, 4200000, n,
          "openai", "chat", "gpt-4o", 0, 0) for n in nonces],
        lambda reply: reply[0] == b"ok" or sys.exit(f"admit answered {reply}"),
    )
    admit = usec_per_call(r)
    r.config_resetstat()
    run_pipelined(
        r,
        [(settle_sha, 6, state, live, holds, lease(n), stream, tokens, 12345, 100, 200, 300, 840,
          200, "", "", "", 600000, sid + "." + n, "any", 60000) for n in nonces],
        lambda reply: reply[0] == b"settled" or sys.exit(f"settle answered {reply}"),
    )
    return admit, usec_per_call(r)


def main():
    pairs = [a.split(":") for a in sys.argv[1:]]
    if not pairs or any(len(p) != 2 for p in pairs):
        sys.exit(__doc__)
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        r = redis.Redis(port=port)
        for _ in range(50):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        hydrate_sha = r.script_load(open(HYDRATE).read())
        shas = [(r.script_load(open(a).read()), r.script_load(open(s).read())) for a, s in pairs]
        results = {i: ([], []) for i in range(len(pairs))}
        for _ in range(ROUNDS):
            for i, (a, s) in enumerate(shas):
                admit, settle = one_round(r, a, s, hydrate_sha)
                results[i][0].append(admit)
                results[i][1].append(settle)
        median = lambda xs: sorted(xs)[len(xs) // 2]
        for (a, s), (admits, settles) in zip(pairs, results.values()):
            print(f"{a} : {s}")
            print(f"  admit  µs/call median {median(admits):6.1f}  rounds {[round(x, 1) for x in admits]}")
            print(f"  settle µs/call median {median(settles):6.1f}  rounds {[round(x, 1) for x in settles]}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
