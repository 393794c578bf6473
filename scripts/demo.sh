#!/usr/bin/env bash
# The README's first command: install what is needed, then run a database
# corruption drill on the embedded stack and leave the Web UI up to look at it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/bootstrap.sh" | tail -n 1)
cd "$root"
exec "$venv/bin/drp" demo "$@"
