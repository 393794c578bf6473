"""Row recovery in SQL: which deleted rows (the audit log, followed through foreign keys) a side instance
still holds, exported as CSV and compared by primary key. Tables travel as (schema, name) and reach SQL
only as `sql.Identifier`; SQL errors retrying cannot fix are classified where raised (`sql_errors`).
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql
from temporalio.exceptions import ApplicationError

from adapters.errors import refused
from models.deletion import (
    DeletionQuery,
)
from models.errors import ErrorKind
from models.identifiers import TableRef, quote_ident, split_qualified

BOOKKEEPING_SQL = """
CREATE SCHEMA IF NOT EXISTS drp;
CREATE TABLE IF NOT EXISTS drp.containment (
    incident_id text NOT NULL, role_name text NOT NULL, table_name text NOT NULL, privilege text NOT NULL,
    revoked_at timestamptz NOT NULL DEFAULT now(), restored_at timestamptz,
    PRIMARY KEY (incident_id, role_name, table_name, privilege));
CREATE TABLE IF NOT EXISTS drp.reinsertions (
    incident_id text PRIMARY KEY, result jsonb NOT NULL, at timestamptz NOT NULL DEFAULT now());
"""


MAX_FK_DEPTH = 5


# what of the evidence travels through Temporal: a glimpse, never the rows
SAMPLE_ROWS = 3


SAMPLE_ROW_CHARS = 200


Rel = tuple[str, str]  # (schema, name): how a table travels; it reaches SQL only as sql.Identifier


# SQL errors that no retry can fix: the same statement on the same catalog fails the same way.
_DETERMINISTIC = {
    psycopg.errors.UndefinedTable: ErrorKind.UndefinedTable,
    psycopg.errors.UndefinedColumn: ErrorKind.UndefinedColumn,
    psycopg.errors.InsufficientPrivilege: ErrorKind.PermissionDenied,
    psycopg.errors.GeneratedAlways: ErrorKind.SqlRefused,
    psycopg.errors.WrongObjectType: ErrorKind.SqlRefused,
    psycopg.errors.FeatureNotSupported: ErrorKind.SqlRefused,
    psycopg.errors.DataException: ErrorKind.SqlRefused,
    psycopg.errors.IntegrityConstraintViolation: ErrorKind.SqlRefused,
    psycopg.errors.SyntaxErrorOrAccessRuleViolation: ErrorKind.SqlRefused,
}


@contextmanager
def sql_errors(what: str) -> Iterator[None]:
    """Classify where raised: an SQL error retrying cannot fix becomes non-retryable, naming the table."""
    try:
        yield
    except psycopg.Error as err:
        kind = next((k for cls, k in _DETERMINISTIC.items() if isinstance(err, cls)), None)
        if kind is None:
            raise  # connection lost, serialization failure, lock timeout ...: a retry may succeed
        diag = err.diag
        table = (
            f" (table {display((diag.schema_name, diag.table_name))})" if diag.table_name and diag.schema_name else ""
        )
        raise ApplicationError(f"{what}: {diag.message_primary or err}{table}", type=kind, non_retryable=True) from err


def display(table: Rel) -> str:
    """A table as PostgreSQL prints it: public.companies, public."Orders", "Sales EU"."Q1 raw"."""
    return f"{quote_ident(table[0])}.{quote_ident(table[1])}"


def recorded(text: str) -> Rel:
    """A table name the runbook recorded (as printed by display; older records as schema.name unquoted)."""
    parts, _ = split_qualified(text)
    return (parts[0], parts[1]) if len(parts) == 2 else ("public", parts[0])


def ident(table: Rel) -> sql.Composable:
    return sql.Identifier(*table)


def object_name(table: Rel) -> str:
    """An S3 key segment for a table: readable, and never a path separator."""
    return display(table).replace("/", "%2F")


def _fold(name: str) -> str:
    """What PostgreSQL makes of an unquoted name: ASCII letters in lower case (UTF-8 databases)."""
    return "".join(c.lower() if "A" <= c <= "Z" else c for c in name)


def resolve_table(conn: psycopg.Connection, ref: TableRef, database: str) -> tuple[Rel, int]:
    """The one table `ref` names, and its OID. Quoted parts match exactly; unquoted ones as typed, else as
    PostgreSQL folds them. Without a schema, the schema holding such a table (public first)."""
    names = [ref.name] if ref.as_typed else sorted({ref.name, _fold(ref.name)})
    schemas = (
        None
        if ref.schema_name is None
        else ([ref.schema_name] if ref.as_typed else sorted({ref.schema_name, _fold(ref.schema_name)}))
    )
    rows = conn.execute(
        "SELECT n.nspname, c.relname, c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND c.relname = ANY(%s) AND (%s::text[] IS NULL OR n.nspname = ANY(%s)) "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'drp') AND n.nspname NOT LIKE 'pg\\_%%'",
        (names, schemas, schemas),
    ).fetchall()
    if not rows:
        raise refused(ErrorKind.UnknownTable, f"table {str(ref)!r} does not exist in {database}; nothing was changed")

    def rank(row):  # as typed beats folded; public beats other schemas when none was given
        return (row[1] == ref.name, ref.schema_name is None or row[0] == ref.schema_name, row[0] == "public")

    best = max(rank(r) for r in rows)
    found = [r for r in rows if rank(r) == best]
    if len(found) > 1:
        raise refused(
            ErrorKind.AmbiguousTable,
            f"table {str(ref)!r} could be any of "
            f"{', '.join(display((r[0], r[1])) for r in found)} in {database}: "
            "name the schema, or quote the name as PostgreSQL prints it",
        )
    return (found[0][0], found[0][1]), found[0][2]


def column_list(columns: list[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(c) for c in columns)


@dataclass
class AuditFilter:
    schema: sql.Composable  # the audited table's schema and name, per audit row
    rel: sql.Composable
    where: sql.Composable
    params: list


def audit_filter(conn: psycopg.Connection, q: DeletionQuery) -> AuditFilter:
    """The audit rows of the deletions the query is about.

    The window is matched on the deleting transaction's commit time: that is when the rows disappeared
    for everyone. The statement time ("timestamp") is never later than the commit, so it only narrows
    the scan from above. Older audit logs have no schema_name/relation_name columns: their table_name
    is schema.name unquoted."""
    have = {
        r[0]
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'public.audit_log'::regclass AND NOT attisdropped"
        )
    }
    if {"schema_name", "relation_name"} <= have:
        schema = sql.SQL("coalesce(schema_name, split_part(table_name, '.', 1))")
        rel = sql.SQL("coalesce(relation_name, substr(table_name, strpos(table_name, '.') + 1))")
    else:
        schema = sql.SQL("split_part(table_name, '.', 1)")
        rel = sql.SQL("substr(table_name, strpos(table_name, '.') + 1)")
    committed = sql.SQL("pg_xact_commit_timestamp((txid %% 4294967296)::text::xid)")
    where = sql.SQL("action = 'DELETE' AND \"timestamp\" < %s AND {c} >= %s AND {c} < %s").format(c=committed)
    params: list = [q.window_end, q.window_start, q.window_end]
    if q.table:
        _, oid = resolve_table(conn, q.table, q.database)
        # A partitioned table's deletions are recorded under its partitions: name either and find them.
        # (pg_partition_tree returns nothing for a table that is not partitioned: the table itself is added.)
        where = sql.SQL(
            "{} AND ({}, {}) IN (SELECT n.nspname::text, c.relname::text FROM "
            "(SELECT relid FROM pg_partition_tree(%s::oid::regclass) UNION SELECT %s::oid::regclass) t "
            "JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace)"
        ).format(where, schema, rel)
        params += [oid, oid]
    if q.role:
        where = sql.SQL("{} AND role_name = %s").format(where)
        params.append(q.role)
    return AuditFilter(schema=schema, rel=rel, where=where, params=params)


def primary_key(conn: psycopg.Connection, table: Rel) -> list[str]:
    cols = [
        r[0]
        for r in conn.execute(
            "SELECT a.attname FROM pg_index i "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)",
            (display(table),),
        )
    ]
    if not cols:
        raise refused(
            ErrorKind.NoPrimaryKey, f"{display(table)} has no primary key: deleted rows cannot be matched exactly"
        )
    return cols


def columns(conn: psycopg.Connection, table: Rel, insertable: bool = False) -> list[str]:
    """The table's columns; `insertable`: all but generated ones (PostgreSQL computes those again)."""
    return [
        r[0]
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
            "AND (NOT %s OR attgenerated = '') ORDER BY attnum",
            (display(table), insertable),
        )
    ]


@dataclass
class RecoverySet:
    keys: dict[Rel, list[dict]]  # table -> primary keys present in the side instance
    audit_tables: set[Rel]  # tables whose deletions the audit log names (the rest are dependents)
    not_in_side: int  # deleted keys the side instance does not hold (created after the target)


def recovery_set(prod: psycopg.Connection, side: psycopg.Connection, q: DeletionQuery) -> RecoverySet:
    """Keys to bring back: the audit log's deletions, plus rows in the side instance that reference
    them through foreign keys and are missing from production (followed a few levels deep)."""
    f = audit_filter(prod, q)
    audit: dict[Rel, list[dict]] = {}
    pks: dict[Rel, list[str]] = {}
    for schema, rel, row in prod.execute(
        sql.SQL("SELECT {}, {}, row_data FROM public.audit_log WHERE {} ORDER BY id").format(f.schema, f.rel, f.where),
        f.params,
    ):
        table = (schema, rel)
        if table not in pks:
            with sql_errors(f"{display(table)} (named by the audit log) in {q.database}"):
                pks[table] = primary_key(prod, table)
        audit.setdefault(table, []).append({c: row[c] for c in pks[table]})
    recovery, not_in_side = {}, 0
    for table, keys in audit.items():
        keys = unique(keys)
        with sql_errors(f"{display(table)} in the side instance"):
            present = present_in(side, table, primary_key(side, table), keys)
        not_in_side += len(keys) - len(present)
        recovery[table] = present
    frontier = dict(recovery)
    for _ in range(MAX_FK_DEPTH):
        found: dict[Rel, list[dict]] = {}
        for parent, keys in frontier.items():
            for child, child_cols, parent_cols in _foreign_keys_to(side, parent):
                pk = primary_key(side, child)
                refs = [{pc: k[pc] for pc in parent_cols} for k in keys if all(pc in k for pc in parent_cols)]
                if not refs:
                    continue
                rows = side.execute(
                    sql.SQL(
                        "SELECT coalesce(jsonb_agg(jsonb_build_object({})), '[]') FROM {} c WHERE ({}) IN "
                        "(SELECT {} FROM jsonb_populate_recordset(NULL::{}, %s))"
                    ).format(
                        sql.SQL(", ").join(sql.SQL("{}, c.{}").format(sql.Literal(c), sql.Identifier(c)) for c in pk),
                        ident(child),
                        column_list(child_cols),
                        column_list(parent_cols),
                        ident(parent),
                    ),
                    (json.dumps(refs),),
                ).fetchone()[0]
                absent = absent_in(prod, child, pk, rows)
                known = {token(k) for k in recovery.get(child, [])}
                new = [k for k in absent if token(k) not in known]
                if new:
                    found.setdefault(child, []).extend(new)
        if not found:
            break
        for table, keys in found.items():
            recovery[table] = unique(recovery.get(table, []) + keys)
        frontier = {t: unique(k) for t, k in found.items()}
    return RecoverySet(keys=recovery, audit_tables=set(audit), not_in_side=not_in_side)


def _foreign_keys_to(conn: psycopg.Connection, parent: Rel) -> list[tuple[Rel, list[str], list[str]]]:
    """(child table, child columns, parent columns) of every foreign key that references parent."""
    out = []
    for schema, child, child_cols, parent_cols in conn.execute(
        "SELECT n.nspname, c.relname, "
        "       array(SELECT attname FROM unnest(k.conkey) WITH ORDINALITY u(n, o) JOIN pg_attribute "
        "             ON attrelid = k.conrelid AND attnum = u.n ORDER BY o), "
        "       array(SELECT attname FROM unnest(k.confkey) WITH ORDINALITY u(n, o) JOIN pg_attribute "
        "             ON attrelid = k.confrelid AND attnum = u.n ORDER BY o) "
        "FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE k.contype = 'f' AND k.confrelid = %s::regclass",
        (display(parent),),
    ):
        out.append(((schema, child), list(child_cols), list(parent_cols)))
    return out


def present_in(conn: psycopg.Connection, table: Rel, pk: list[str], keys: list[dict]) -> list[dict]:
    """The keys (as given) that have a row in table on this server."""
    if not keys:
        return []
    present = conn.execute(
        sql.SQL(
            "SELECT coalesce(jsonb_agg(jsonb_build_object({})), '[]') FROM {} t WHERE ({}) IN "
            "(SELECT {} FROM jsonb_populate_recordset(NULL::{}, %s))"
        ).format(
            sql.SQL(", ").join(sql.SQL("{}, t.{}").format(sql.Literal(c), sql.Identifier(c)) for c in pk),
            ident(table),
            column_list(pk),
            column_list(pk),
            ident(table),
        ),
        (json.dumps(keys),),
    ).fetchone()[0]
    have = {token({c: k[c] for c in pk}) for k in present}
    return [k for k in keys if token({c: k[c] for c in pk}) in have]


def absent_in(conn: psycopg.Connection, table: Rel, pk: list[str], keys: list[dict]) -> list[dict]:
    present = {token(k) for k in present_in(conn, table, pk, keys)}
    return [k for k in keys if token(k) not in present]


def count_missing(prod: psycopg.Connection, recovery: RecoverySet) -> int:
    return sum(len(absent_in(prod, table, primary_key(prod, table), keys)) for table, keys in recovery.keys.items())


def parents_first(conn: psycopg.Connection, tables: list[Rel]) -> list[Rel]:
    remaining, ordered = set(tables), []
    while remaining:
        ready = sorted(t for t in remaining if not any(p in remaining and p != t for p in _parents_of(conn, t)))
        if not ready:  # a cycle: keep a stable order and let the transaction decide
            ready = sorted(remaining)
        ordered += ready
        remaining -= set(ready)
    return ordered


def _parents_of(conn: psycopg.Connection, table: Rel) -> list[Rel]:
    return [
        (r[0], r[1])
        for r in conn.execute(
            "SELECT n.nspname, c.relname FROM pg_constraint k JOIN pg_class c ON c.oid = k.confrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE k.contype = 'f' AND k.conrelid = %s::regclass",
            (display(table),),
        )
    ]


def copy_csv(conn: psycopg.Connection, table: Rel, keys: list[dict], out) -> None:
    """The rows as CSV (with a header) into a file: streamed, never held whole in memory."""
    pk = primary_key(conn, table)
    query = sql.SQL(
        "COPY (SELECT * FROM {} WHERE ({}) IN (SELECT {} FROM jsonb_populate_recordset(NULL::{}, {})) "
        "ORDER BY {}) TO STDOUT WITH (FORMAT csv, HEADER)"
    ).format(
        ident(table), column_list(pk), column_list(pk), ident(table), sql.Literal(json.dumps(keys)), column_list(pk)
    )
    with conn.cursor().copy(query) as copy:
        for chunk in copy:
            out.write(chunk)


def sample_rows(conn: psycopg.Connection, table: Rel, keys: list[dict]) -> list[str]:
    """The column names and the first rows, each cut short: what the approver sees in the Web UI."""
    pk = primary_key(conn, table)
    rows = conn.execute(
        sql.SQL(
            "SELECT CASE WHEN length(t::text) > %s THEN left(t::text, %s) || '… (' || length(t::text) || ' chars)' "
            "ELSE t::text END FROM {} t WHERE ({}) IN (SELECT {} FROM jsonb_populate_recordset(NULL::{}, %s)) "
            "ORDER BY {} LIMIT %s"
        ).format(ident(table), column_list(pk), column_list(pk), ident(table), column_list(pk)),
        (SAMPLE_ROW_CHARS, SAMPLE_ROW_CHARS, json.dumps(keys[: SAMPLE_ROWS * 10]), SAMPLE_ROWS),
    ).fetchall()
    return [",".join(columns(conn, table))] + [r[0] for r in rows]


def key_text(row: dict, pk: list[str]) -> str:
    return ",".join(f"{c}={row[c]}" for c in pk)


def token(key: dict) -> str:
    """A key as comparable text: JSON numbers and Python values of one key compare equal."""
    return json.dumps({c: str(v) for c, v in key.items()}, sort_keys=True)


def unique(keys: list[dict]) -> list[dict]:
    seen, out = set(), []
    for k in keys:
        if token(k) not in seen:
            seen.add(token(k))
            out.append(k)
    return out
