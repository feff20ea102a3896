#!/usr/bin/env python3
"""Checks deploy/grafana/tollgate.json: importable, every panel's PromQL as a rules file for promtool, every metric it names present in a real scrape.

    check_dashboard.py DASHBOARD [--rules OUT.yml] [--scrape METRICS.txt]

--rules writes each panel query (Grafana variables replaced by values Prometheus accepts) as a
recording rule, so `promtool check rules OUT.yml` parses every expression. --scrape compares the
metric names the queries use with the sample names of a /metrics scrape of a running tollgate
and fails naming those that do not exist. Standard library only.
"""
import json
import re
import sys

# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${datasource}": "prometheus",
    "$job": ".*",
    "$instance": ".*",
}
# Words of PromQL that are not metric names where they appear outside `(`.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "atan2",
}


def fail(message):
    print(message)
    sys.exit(1)


def targets(dashboard):
    """(panel title, expression) of every query of every panel, rows' nested panels included."""
    out = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))

    walk(dashboard.get("panels", []))
    return out


def substitute(expr):
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    if "$" in expr:
        fail(f"unknown Grafana variable left in {expr!r}")
    return expr


def metric_names(expr):
    """The metric names an expression selects."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range and subquery selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        before = e[m.start() - 1] if m.start() > 0 else " "
        rest = e[m.end():].lstrip()
        if before.isdigit() or before == ".":  # the tail of a number such as 1e-9
            continue
        if rest.startswith("(") or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def check_importable(d):
    vars_ = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    ds = vars_.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        fail("no Prometheus data-source variable named `datasource`")
    if not d.get("title") or not d.get("uid") or d.get("id") is not None:
        fail("a dashboard to import has a title and a uid, and a null id")
    ids = set()
    for p in d.get("panels", []):
        if p.get("id") in ids:
            fail(f"duplicate panel id {p.get('id')}")
        ids.add(p.get("id"))
        if p.get("type") == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${datasource}":
            fail(f"panel {p.get('title')!r} does not use the data-source variable")
        for t in p.get("targets", []):
            if t.get("datasource", {}).get("uid") != "${datasource}":
                fail(f"a query of panel {p.get('title')!r} does not use the data-source variable")
        if not p.get("targets"):
            fail(f"panel {p.get('title')!r} has no query")


def scrape_names(text):
    names = set()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def main(argv):
    if not argv or argv[0].startswith("-"):
        fail(__doc__)
    dashboard = json.load(open(argv[0]))
    args = dict(zip(argv[1::2], argv[2::2]))
    check_importable(dashboard)
    queries = targets(dashboard)
    if not queries:
        fail("the dashboard has no queries")
    if "--rules" in args:
        with open(args["--rules"], "w") as f:
            f.write("groups:\n  - name: dashboard\n    rules:\n")
            for i, (_, expr) in enumerate(queries):
                f.write(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(substitute(expr))}\n")
    if "--scrape" in args:
        exposed = scrape_names(open(args["--scrape"]).read())
        missing = []
        for title, expr in queries:
            for name in sorted(metric_names(substitute(expr))):
                if name not in exposed:
                    missing.append(f"panel {title!r}: {name} is not in the scrape")
        if missing:
            fail("\n".join(missing))
    used = sorted({n for _, e in queries for n in metric_names(substitute(e))})
    print(f"{len(queries)} queries, metrics: {' '.join(used)}")


if __name__ == "__main__":
    main(sys.argv[1:])
