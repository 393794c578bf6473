"""SQL the database runbooks run on production: row counts, fencing (connections and sessions), and reading
pg_amcheck's report.
"""

import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet

import psycopg
from psycopg import sql
from temporalio.exceptions import ApplicationError

from models.errors import ErrorKind

# Tables that hold rows (partitions, not their partitioned parents, so an UNLOGGED partition is not
# counted through a logged parent) outside the system schemas: the quoted name (as PostgreSQL prints
# it, e.g. public."Orders"), whether it is UNLOGGED, and the schema and name for sql.Identifier.
USER_TABLES = """
    SELECT format('%I.%I', n.nspname, c.relname), c.relpersistence = 'u', n.nspname, c.relname
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind = 'r' AND c.relpersistence <> 't'
      AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1
"""


def row_counts(conn: psycopg.Connection, skip: AbstractSet[str] = frozenset()) -> tuple[dict[str, int], list[str]]:
    """Row counts of the readable, WAL-logged user tables, and the UNLOGGED tables (not counted)."""
    counts, unlogged = {}, []
    for table, is_unlogged, schema, name in conn.execute(USER_TABLES).fetchall():
        if table in skip or table.split(".", 1)[-1] in skip:
            continue
        if is_unlogged:
            unlogged.append(table)
            continue
        try:
            with conn.transaction():
                counts[table] = conn.execute(
                    sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(name))
                ).fetchone()[0]
        except psycopg.Error:
            continue  # unreadable (corrupted) tables have no trustworthy count
    return counts, unlogged


def allow_connections(conn: psycopg.Connection, databases: list[str], allow: bool) -> None:
    for name in databases:
        conn.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                sql.Identifier(name), sql.SQL("true" if allow else "false")
            )
        )


def terminate_others(
    conn: psycopg.Connection, keep: list[int], timeout: float = 60, progress: Callable[[str], None] = lambda _: None
) -> None:
    """Terminate every client backend but this one and `keep`, and wait until they are gone (`timeout` in
    seconds; FenceIncomplete, retryable, past it). `progress` hears how many are left while it waits."""
    deadline = time.monotonic() + timeout
    while True:
        left = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND pid <> pg_backend_pid() AND NOT pid = ANY(%s)",
            (keep,),
        ).fetchone()[0]
        if left == 0:
            return
        if time.monotonic() > deadline:
            raise ApplicationError(
                f"{left} sessions did not end after pg_terminate_backend within {timeout:.0f}s",
                type=ErrorKind.FenceIncomplete,
            )
        progress(f"fencing: waiting for {left} sessions to end")
        time.sleep(0.2)


def amcheck_reports(output: str) -> list[tuple[str, str]]:
    """pg_amcheck prints a header line per damaged relation and indented details below it."""
    reports: list[tuple[str, str]] = []
    for line in output.splitlines():
        if line.startswith(("heap table", "btree index")):
            reports.append((line.rstrip(":").strip(), ""))
        elif line.startswith((" ", "\t")) and reports and not reports[-1][1]:
            reports[-1] = (reports[-1][0], line.strip())
    return reports


def qualified(table: str) -> str:
    return table if "." in table else f"public.{table}"


def table_of(header: str, database: str, rows: list[tuple]) -> str | None:
    """The user table a pg_amcheck report header names, as `format('%I.%I')`, or None (an index).

    pg_amcheck names a relation `"<database>.<schema>.<relation>"` with the names as stored, not
    quoted (PostgreSQL's src/bin/amcheck/pg_amcheck.c), so the header is matched against each
    table's stored names rather than split on dots: names may hold dots, quotes and spaces.
    `rows` are USER_TABLES rows: (quoted name, unlogged, schema, relation)."""
    named = [r for r in rows if f'"{database}.{r[2]}.{r[3]}"' in header]
    return max(named, key=lambda r: len(r[2]) + len(r[3]))[0] if named else None


def first_error(stderr: str) -> str:
    for line in stderr.splitlines():
        if "error" in line.lower():
            return line.strip()
    return stderr.strip().splitlines()[0] if stderr.strip() else "(no output)"
