#!/usr/bin/env bash
# The README's test command: install what is needed, then run the whole suite
# against real Temporal, PostgreSQL, barman-cloud, moto and kmock.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/bootstrap.sh" | tail -n 1)
cd "$root"
exec "$venv/bin/python" -m pytest "$@"
