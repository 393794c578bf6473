"""A PostgreSQL pair's replication state: timelines, divergence, and the standby's primary_conninfo."""

import re
import subprocess
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from adapters.pgserver import PgServer, one, run_as
from adapters.timelines import diverged, history_file_name, parse_history
from models.postgres import TimelineBranch

# Replicas are read through template1: a seal closes every other database (ALLOW_CONNECTIONS false),
# a standby replays that, and CREATE DATABASE (which needs template1 unused) cannot run on a replica.
REPLICA_DB = "template1"


def wal_position(conn: psycopg.Connection) -> dict:
    segment, lsn = one(conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn()), pg_current_wal_lsn()::text"))
    return {"timeline": int(segment[:8], 16), "promoted_at_lsn": lsn}


def current_timeline(server: PgServer) -> int | None:
    """A server's current timeline: from its WAL position when it answers as a primary, else its control file."""
    try:
        with server.connect(timeout=3) as conn:
            if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                return int(conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0][:8], 16)
    except psycopg.OperationalError:
        pass
    return server.control_timeline()


def timeline_history(server: PgServer, timeline: int) -> list[TimelineBranch]:
    """A timeline's history from the server's own pg_wal ([] for timeline 1 or when unreadable)."""
    if timeline <= 1:
        return []
    try:
        return parse_history((server.data_dir / "pg_wal" / history_file_name(timeline)).read_text())
    except OSError:
        return []


def has_diverged(replica: PgServer, source: PgServer) -> bool:
    """True when a replica that is not streaming holds WAL its source's history never had (see
    adapters.timelines.diverged); False when it streams, is not a replica, or cannot be read."""
    try:
        with replica.connect(REPLICA_DB, timeout=3) as conn:
            in_recovery, replay, streaming, checkpoint_tli = one(
                conn.execute(
                    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, EXISTS (SELECT 1 FROM "
                    "pg_stat_wal_receiver WHERE status = 'streaming'), "
                    "(SELECT timeline_id FROM pg_control_checkpoint())"
                )
            )
    except psycopg.OperationalError:
        return False
    source_tli = current_timeline(source)
    if not in_recovery or streaming or not replay or not source_tli:
        return False
    return diverged(checkpoint_tli, replay, source_tli, timeline_history(source, source_tli))


def standby_application_name(data_dir: Path) -> str | None:
    """The application_name in a standby's last primary_conninfo (postgresql.auto.conf), or None."""
    try:
        lines = (data_dir / "postgresql.auto.conf").read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        match = re.match(r"\s*primary_conninfo\s*=\s*'((?:[^']|'')*)'", line)
        if match:
            name = conninfo_to_dict(match.group(1).replace("''", "'")).get("application_name")
            return str(name) if name else None
    return None


def single_synchronous_name(source: PgServer) -> str | None:
    """The standby name the source's synchronous_standby_names expects, when it names exactly one."""
    try:
        with source.connect(timeout=3) as conn:
            names = conn.execute("SHOW synchronous_standby_names").fetchone()[0].strip()
    except psycopg.OperationalError:
        return None
    return names.strip('"') if re.fullmatch(r'"?[A-Za-z0-9_.-]+"?', names) else None


def set_application_name(server: PgServer, name: str) -> None:
    """Append primary_conninfo again with `name` as application_name (a later line wins)."""
    auto = server.data_dir / "postgresql.auto.conf"
    text = auto.read_text()
    current = next(
        (
            m.group(1).replace("''", "'")
            for line in reversed(text.splitlines())
            if (m := re.match(r"\s*primary_conninfo\s*=\s*'((?:[^']|'')*)'", line))
        ),
        "",
    )
    conninfo = make_conninfo(current, application_name=name).replace("'", "''")
    subprocess.run(
        run_as(server.os_user, ["sh", "-c", 'cat >> "$0"', str(auto)]),
        input=f"primary_conninfo = '{conninfo}'\n".encode(),
        check=True,
    )
