#!/usr/bin/env bash
# Benchmarks (not part of the test suite): see BENCHMARKS.md.
#   bash scripts/bench.sh [restore] [--gb 1.0 --wal-mb 256]
#   bash scripts/bench.sh deletion [--gb 1.0 --companies 200]
#   bash scripts/bench.sh failover [--runs 3]
#   bash scripts/bench.sh region_failover [--runs 3]
#   bash scripts/bench.sh alerts [--rate 50 --seconds 10 --latency-runs 20]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/bootstrap.sh" | tail -n 1)
cd "$root"
which=restore
case "${1:-}" in restore|deletion|failover|region_failover|alerts) which=$1; shift ;; esac
exec "$venv/bin/python" -m "bench.$which" "$@"
