#!/usr/bin/env bash
# Regenerates docs/openapi.json (what the binary serves at /admin/openapi.json) from
# docs/openapi.yaml (what people edit); tests/it/openapi.rs fails while the two disagree.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/install-test-deps.sh" >/dev/null
VENV="${TOLLGATE_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tollgate-test-tools}"
"$VENV/bin/python" - "$ROOT/docs/openapi.yaml" "$ROOT/docs/openapi.json" <<'PYEOF'
import json, sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
with open(sys.argv[2], "w") as f:
    f.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
PYEOF
"$VENV/bin/openapi-spec-validator" "$ROOT/docs/openapi.json"
