"""The seal on a production data directory, and the one way to lift it.

A runbook that stops a damaged primary to recover it leaves a marker beside
its data directory (`<data_dir>.sealed.json`): who sealed it, when, which
databases it fenced (`ALTER DATABASE ... ALLOW_CONNECTIONS false`, so the row
counts it took were final) and what it recorded. While the marker is there,
nothing starts that directory as production: `drp stack up` leaves it
stopped, a second run reuses the recorded seal instead of treating the
stopped primary as "crashed", and `drp stack status` says who holds it. The
swap moves the marker aside with the damaged directory; `unseal` brings the
damaged primary back as it was (started, databases reopened, marker removed)
when a person decides to abandon the recovery.
"""

import json
import time
from datetime import UTC, datetime
from pathlib import Path

from psycopg import sql

from adapters.pgserver import PgServer


def marker_path(data_dir: Path) -> Path:
    return data_dir.with_name(f"{data_dir.name}.sealed.json")


def read_seal(data_dir: Path) -> dict | None:
    """The marker's content, or None when the directory is not sealed."""
    try:
        return json.loads(marker_path(data_dir).read_text())
    except FileNotFoundError:
        return None
    except ValueError as err:  # a marker cut short by a crash still means "sealed"
        return {"incident_id": "unknown", "state": "unreadable", "error": str(err), "fenced_databases": []}


def write_seal(data_dir: Path, marker: dict) -> None:
    """Write the marker atomically (temp file, then rename): a crash leaves the old one or the new one."""
    path = marker_path(data_dir)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"updated_at": datetime.now(UTC).isoformat(), **marker}, default=str))
    tmp.replace(path)


def describe_seal(marker: dict) -> str:
    """One line for status output: who sealed production, since when."""
    return (
        f"sealed by incident {marker.get('incident_id', 'unknown')} since {marker.get('sealed_at', '?')} "
        f"({marker.get('state', '?')}): a recovery holds it; `drp unseal` gives it back as it was"
    )


def set_allow_connections(server: PgServer, databases: list[str], allow: bool) -> None:
    """ALTER DATABASE ... ALLOW_CONNECTIONS for each database, through template1 (idempotent)."""
    if not databases:
        return
    with server.connect("template1") as conn:
        conn.execute("SET synchronous_commit = local")  # a synchronous standby may be gone or not yet rebuilt
        for name in databases:
            conn.execute(
                sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                    sql.Identifier(name), sql.SQL("true" if allow else "false")
                )
            )


def set_subscriptions(server: PgServer, subscriptions: list[str], enable: bool, timeout: float = 120) -> None:
    """ALTER SUBSCRIPTION ... ENABLE/DISABLE for each 'database/name' (idempotent; one that no longer exists is
    skipped). A fenced database is opened for this one connection and closed again. Disabling waits until
    the apply workers are gone: an apply worker is no client session, so the fence alone never stops it."""
    by_database: dict[str, list[str]] = {}
    for item in subscriptions:
        database, _, name = item.partition("/")
        by_database.setdefault(database, []).append(name)
    if not by_database:
        return
    with server.connect("template1") as ctl:
        ctl.execute("SET synchronous_commit = local")
        for database, names in by_database.items():
            row = ctl.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (database,)).fetchone()
            if row is None:
                continue
            if not row[0]:
                set_allow_connections(server, [database], allow=True)
            try:
                with server.connect(database) as conn:
                    conn.execute("SET synchronous_commit = local")
                    for name in names:
                        if conn.execute(
                            "SELECT 1 FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
                            "WHERE d.datname = current_database() AND s.subname = %s",
                            (name,),
                        ).fetchone():
                            conn.execute(
                                sql.SQL("ALTER SUBSCRIPTION {} {}").format(
                                    sql.Identifier(name), sql.SQL("ENABLE" if enable else "DISABLE")
                                )
                            )
            finally:
                if not row[0]:
                    set_allow_connections(server, [database], allow=False)
        deadline = time.monotonic() + timeout
        while not enable:
            running = ctl.execute(
                "SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL AND subname = ANY(%s)",
                ([n for names in by_database.values() for n in names],),
            ).fetchone()[0]
            if not running:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{running} logical-replication workers still apply after ALTER SUBSCRIPTION "
                    f"... DISABLE ({timeout:.0f}s)"
                )
            time.sleep(0.1)


def unseal(server: PgServer) -> str:
    """Start a sealed primary again as it was, reopen the databases its seal fenced, remove the marker.

    Returns what was done. Raises FileNotFoundError when there is no seal, and
    the PgServer errors when it cannot start.
    """
    marker = read_seal(server.data_dir)
    if marker is None:
        raise FileNotFoundError(f"{server.data_dir} is not sealed ({marker_path(server.data_dir)} does not exist)")
    server.start()
    server.wait_ready(dbname="template1")  # the databases the seal closed open only below
    fenced = list(marker.get("fenced_databases", []))
    set_allow_connections(server, fenced, allow=True)
    subscriptions = list(marker.get("disabled_subscriptions", []))
    set_subscriptions(server, subscriptions, enable=True)
    marker_path(server.data_dir).unlink()
    return (
        f"started {server.data_dir} on port {server.port}; reopened {', '.join(fenced) or 'no databases'}; "
        + (f"enabled subscriptions {', '.join(subscriptions)} again; " if subscriptions else "")
        + f"seal of incident {marker.get('incident_id')} removed"
    )
