#!/usr/bin/env bash
# Benchmarks (not part of the test suite): see BENCHMARKS.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/bootstrap.sh" | tail -n 1)
cd "$root"
exec "$venv/bin/python" -m bench.restore "$@"
