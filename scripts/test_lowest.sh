#!/usr/bin/env bash
# Install the lowest versions pyproject.toml allows for the core and the given extras
# (uv's lowest-direct resolution, into a fresh venv), add the test tools without moving
# them, print what was installed, then run the given tests there.
#   scripts/test_lowest.sh VENV EXTRAS TEST_TOOLS TESTS...
# e.g. scripts/test_lowest.sh .venv-lowest convert "pytest pytest-timeout" tests/test_engine.py
set -euo pipefail
venv=$1 extras=$2 tools=$3
shift 3
uv=${UV:-.venv/bin/uv}
rm -rf "$venv"
"$uv" venv -q --python "${PYTHON_FOR_LOWEST:-.venv/bin/python}" "$venv"
VIRTUAL_ENV=$venv "$uv" pip install -q --resolution lowest-direct ".[$extras]"
VIRTUAL_ENV=$venv "$uv" pip freeze | grep -v '^gpu-mdf' > "$venv/lowest.txt"
# shellcheck disable=SC2086
VIRTUAL_ENV=$venv "$uv" pip install -q -c "$venv/lowest.txt" $tools
direct=$(python3 - "$extras" <<'PY'
import re, sys, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = list(p["dependencies"])
for e in sys.argv[1].split(","):
    reqs += [r for r in p["optional-dependencies"][e] if not r.startswith("gpu-mdf")]
print(" ".join(sorted({re.split(r"[\[<>=! ;]", r)[0].lower() for r in reqs})))
PY
)
echo "lowest direct versions for the core + [$extras]:"
for name in $direct; do grep -i "^${name}==" "$venv/lowest.txt" || echo "$name: not installed"; done | tr '\n' ' '
echo
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
