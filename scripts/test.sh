#!/usr/bin/env bash
# The README's test command: install what is needed, then run the whole suite
# against real Temporal, PostgreSQL, barman-cloud, moto, kmock, Redis, an SMTP
# server and Prometheus Alertmanager.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/bootstrap.sh" | tail -n 1)

# Alertmanager comes from Debian (no wheel ships it): the alert receiver's end-to-end test needs it.
if ! command -v prometheus-alertmanager >/dev/null 2>&1 && ! command -v alertmanager >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test: installing prometheus-alertmanager from Debian's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q prometheus-alertmanager >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q prometheus-alertmanager >/dev/null; }
  else
    echo "test: prometheus-alertmanager is missing; install it (sudo apt-get install prometheus-alertmanager)" >&2
  fi
fi

cd "$root"
exec "$venv/bin/python" -m pytest "$@"
