"""DeletionActivities: contain, identify, extract and re-insert deleted rows.

Production is only ever added to: rows come back with INSERT ... ON CONFLICT
DO NOTHING in one transaction, so a row re-created since the deletion is
reported as a conflict and kept as it is. What the runbook did (privileges
revoked, rows re-inserted) is recorded in production's `drp` schema in the
same transaction as the change, which makes every step safe to re-run.
"""

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlparse

import psycopg
from psycopg import sql
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.barman import BarmanCloud
from activities.pgserver import PgServer
from models.identifiers import TableRef, quote_ident, split_qualified
from models.deletion import (
    Containment,
    ContainRequest,
    DeletionFindings,
    DeletionQuery,
    Extracted,
    ExtractRequest,
    Reinserted,
    ReinsertRequest,
)

BLOCKED_KEYS = "blocked_api_keys"
WRITE_PRIVILEGES = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")
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
KEYS_PER_BATCH = 50  # rows re-inserted per statement: bounds memory with multi-megabyte (TOAST) values
SAMPLE_ROWS, SAMPLE_ROW_CHARS = 3, 200  # what of the evidence travels through Temporal: a glimpse, never the rows
MAX_CONFLICTS_LISTED = 100  # per table; the result keeps the count of the rest

Rel = tuple[str, str]  # (schema, name): how a table travels; it reaches SQL only as sql.Identifier


def _heartbeat(*details) -> None:
    if activity.in_activity():
        activity.heartbeat(*details)


class DeletionActivities:
    def __init__(self, server: PgServer, barman: BarmanCloud, redis, s3, evidence_destination: str):
        self.server = server
        self.barman = barman
        self.redis = redis
        self.s3 = s3
        self.evidence_destination = evidence_destination.rstrip("/")

    # --- identify ---------------------------------------------------------------

    @activity.defn
    def identify_deletions(self, q: DeletionQuery) -> DeletionFindings:
        """Read the audit log: what was deleted, by whom, and which transaction to stop before.

        Read-only, and it validates everything the later steps rely on, so wrong
        input fails here having changed nothing. A deletion is in the window when its
        transaction committed in it (see DeletionQuery / AccidentalDeletionInput.window_start).
        """
        with self._connect(q.database) as conn, _sql_errors(q.database):
            if conn.execute("SELECT to_regclass('public.audit_log')").fetchone()[0] is None:
                raise _bad_input("NoAuditLog", f"{q.database} has no public.audit_log; install it with "
                                                 "`drp audit install` (deletions before that cannot be traced)")
            if conn.execute("SELECT current_setting('track_commit_timestamp')").fetchone()[0] != "on":
                raise _bad_input("NoCommitTimestamps", "commit timestamps are unknown (track_commit_timestamp is "
                                                         "off): neither the window nor the recovery target can be "
                                                         "placed safely; nothing was changed")
            if q.table:
                resolve_table(conn, q.table, q.database)  # UnknownTable / AmbiguousTable
            if q.role and not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (q.role,)).fetchone():
                raise _bad_input("UnknownRole", f"role {q.role!r} does not exist")
            audit = _audit_filter(conn, q)
            rows = conn.execute(sql.SQL(
                "SELECT {schema}, {rel}, count(*), min(\"timestamp\"), array_agg(DISTINCT role_name), "
                "array_agg(DISTINCT txid) FROM public.audit_log WHERE {where} GROUP BY 1, 2").format(
                schema=audit.schema, rel=audit.rel, where=audit.where), audit.params).fetchall()
            if not rows:
                raise _bad_input("NoDeletionsFound", f"no DELETE committed between {q.window_start} and "
                                                       f"{q.window_end}{_filters(q)}; nothing was changed")
            gone = [(r[0], r[1]) for r in rows if conn.execute(
                "SELECT to_regclass(%s)", (_display((r[0], r[1])),)).fetchone()[0] is None]
            if gone:
                raise _bad_input("UnknownTable", f"the audit log names {', '.join(map(_display, gone))}, which no "
                                                   f"longer exists in {q.database}: rows cannot go back to a dropped "
                                                   "table (name the tables to recover with --table); nothing was "
                                                   "changed")
            txids = sorted({t for r in rows for t in r[5]})
            first = conn.execute(
                "SELECT t, pg_xact_commit_timestamp((t %% 4294967296)::text::xid) AS at FROM unnest(%s::bigint[]) t "
                "ORDER BY at NULLS LAST LIMIT 1", (txids,)).fetchone()
        if first[1] is None:
            raise _bad_input("NoCommitTimestamps", "commit timestamps are unknown (track_commit_timestamp is off); "
                                                     "the recovery target cannot be placed safely")
        target_xid, target_at = first
        backups = [b for b in self.barman.list_backups() if datetime.fromisoformat(b["end_time_iso"]) < target_at]
        if not backups:
            raise _bad_input("NoBackupBeforeTarget", f"the first deletion committed at {target_at}, before the oldest "
                                                       f"base backup in {self.barman.destination} ended; point-in-time "
                                                       "recovery cannot reach it. Nothing was changed.")
        return DeletionFindings(
            rows_by_table={_display((r[0], r[1])): r[2] for r in rows},
            roles=sorted({role for r in rows for role in r[4]}),
            first_deleted_at=min(r[3] for r in rows), target_xid=target_xid, target_commit_at=target_at,
            backup_id=backups[-1]["backup_id"])

    # --- containment ---------------------------------------------------------------

    @activity.defn
    def contain(self, req: ContainRequest) -> Containment:
        """Revoke the role's write privileges and block the API key; both recorded for lifting later."""
        revoked: list[tuple[str, str]] = []
        if req.role:
            with self._connect(req.database, autocommit=False) as conn, _sql_errors(req.database):
                conn.execute(BOOKKEEPING_SQL)
                grants = conn.execute(
                    "SELECT table_schema, table_name, privilege_type FROM information_schema.role_table_grants"
                    " WHERE grantee = %s AND privilege_type = ANY(%s) AND table_schema NOT IN ('drp', 'pg_catalog')",
                    (req.role, list(WRITE_PRIVILEGES))).fetchall()
                for schema, table, privilege in grants:
                    conn.execute("INSERT INTO drp.containment (incident_id, role_name, table_name, privilege) "
                                 "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                                 (req.incident_id, req.role, _display((schema, table)), privilege))
                    conn.execute(sql.SQL("REVOKE {} ON {} FROM {}").format(
                        sql.SQL(privilege), _ident((schema, table)), sql.Identifier(req.role)))
                revoked = [tuple(r) for r in conn.execute(
                    "SELECT table_name, privilege FROM drp.containment WHERE incident_id = %s AND role_name = %s "
                    "ORDER BY 1, 2", (req.incident_id, req.role))]
                conn.commit()
        if req.api_key_sha256:
            self._require_redis().sadd(BLOCKED_KEYS, req.api_key_sha256)
        return Containment(role=req.role, revoked=revoked, api_key_sha256=req.api_key_sha256)

    @activity.defn
    def lift_containment(self, req: ContainRequest) -> None:
        """Give back exactly what `contain` took, and unblock the key (re-run safe)."""
        if req.role:
            with self._connect(req.database, autocommit=False) as conn, _sql_errors(req.database):
                conn.execute(BOOKKEEPING_SQL)
                for table, privilege in conn.execute(
                        "SELECT table_name, privilege FROM drp.containment WHERE incident_id = %s AND role_name = %s "
                        "AND restored_at IS NULL", (req.incident_id, req.role)).fetchall():
                    conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(
                        sql.SQL(privilege), _ident(_recorded(table)), sql.Identifier(req.role)))
                conn.execute("UPDATE drp.containment SET restored_at = now() WHERE incident_id = %s AND "
                             "role_name = %s AND restored_at IS NULL", (req.incident_id, req.role))
                conn.commit()
        if req.api_key_sha256:
            self._require_redis().srem(BLOCKED_KEYS, req.api_key_sha256)

    # --- extract ------------------------------------------------------------------

    @activity.defn
    def extract_deleted_rows(self, req: ExtractRequest) -> Extracted:
        """Find the deleted rows (and rows depending on them) in the side instance; CSV evidence to S3.

        The rows go to S3 only; what returns through Temporal is counts, a short sample and the evidence's
        address, whatever the size of the rows."""
        prefix = f"{self._evidence_prefix()}/{req.incident_id}"
        with self._connect(req.query.database) as prod, self._side(req.query.database, req.side_port) as side, \
                _sql_errors(req.query.database):
            recovery = _recovery_set(prod, side, req.query)
            counts, sample = {}, {}
            for table, keys in recovery.keys.items():
                _heartbeat(f"exporting {_display(table)}")
                with _sql_errors(f"{_display(table)} in the side instance"), \
                        tempfile.SpooledTemporaryFile(max_size=8 << 20) as csv_file:
                    _copy_csv(side, table, keys, csv_file)
                    sample[_display(table)] = _sample(side, table, keys)
                    csv_file.seek(0)
                    self.s3.put_object(Bucket=self._evidence_bucket(), Key=f"{prefix}/{_object_name(table)}.csv",
                                       Body=csv_file)
                counts[table] = len(keys)
        return Extracted(
            rows_by_table={_display(t): n for t, n in counts.items() if t in recovery.audit_tables},
            dependent_rows_by_table={_display(t): n for t, n in counts.items() if t not in recovery.audit_tables},
            not_in_side_instance=recovery.not_in_side, sample=sample,
            evidence_uri=f"s3://{self._evidence_bucket()}/{prefix}/")

    # --- re-insert ----------------------------------------------------------------

    @activity.defn
    def reinsert_rows(self, req: ReinsertRequest) -> Reinserted:
        """Put the rows back into production in one transaction; never overwrite.

        Only the columns that can be inserted are (generated columns are computed again; identity
        columns keep their values with OVERRIDING SYSTEM VALUE); rows are copied in batches, side
        instance to production, through this worker only."""
        with self._connect(req.query.database, autocommit=False) as prod, \
                self._side(req.query.database, req.side_port) as side, _sql_errors(req.query.database):
            prod.execute(BOOKKEEPING_SQL)
            done = prod.execute("SELECT result FROM drp.reinsertions WHERE incident_id = %s",
                                (req.incident_id,)).fetchone()
            if done:  # committed by an earlier attempt
                prod.rollback()
                return Reinserted.model_validate(done[0])
            recovery = _recovery_set(prod, side, req.query)
            inserted, conflicts, conflict_counts = {}, {}, {}
            for table in _parents_first(prod, list(recovery.keys)):
                name = _display(table)
                _heartbeat(f"re-inserting {name}")
                with _sql_errors(f"re-inserting into {name}"):
                    pk = _primary_key(prod, table)
                    cols = _cols(_columns(prod, table, insertable=True))
                    inserted[name], lost = 0, []
                    for start in range(0, len(recovery.keys[table]), KEYS_PER_BATCH):
                        batch = recovery.keys[table][start:start + KEYS_PER_BATCH]
                        # As JSON text from server to server: values are never re-typed in Python.
                        rows_json = side.execute(sql.SQL(
                            "SELECT coalesce(jsonb_agg(to_jsonb(t)), '[]')::text FROM {} t WHERE ({}) IN "
                            "(SELECT {} FROM jsonb_populate_recordset(NULL::{}, %s))").format(
                            _ident(table), _cols(pk), _cols(pk), _ident(table)), (json.dumps(batch),)).fetchone()[0]
                        back = prod.execute(sql.SQL(
                            "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM "
                            "jsonb_populate_recordset(NULL::{}, %s::jsonb) ON CONFLICT DO NOTHING RETURNING {}").format(
                            _ident(table), cols, cols, _ident(table), _cols(pk)), (rows_json,)).fetchall()
                        rows = [{c: r[c] for c in pk} for r in json.loads(rows_json)]
                        inserted[name] += len(back)
                        got = {tuple(str(v) for v in r) for r in back}
                        lost += [_key_text(row, pk) for row in rows if tuple(str(row[c]) for c in pk) not in got]
                        _heartbeat(f"re-inserting {name}: {start + len(batch)} of {len(recovery.keys[table])}")
                    if lost:
                        conflicts[name] = lost[:MAX_CONFLICTS_LISTED]
                        conflict_counts[name] = len(lost)
            missing = _count_missing(prod, recovery)
            result = Reinserted(inserted_by_table=inserted, conflicts_by_table=conflicts,
                                conflict_count_by_table=conflict_counts, missing_after_insert=missing)
            prod.execute("INSERT INTO drp.reinsertions (incident_id, result) VALUES (%s, %s)",
                         (req.incident_id, result.model_dump_json()))
            prod.commit()
        return result

    @activity.defn
    def verify_reinserted(self, req: ReinsertRequest) -> int:
        """Every key of the recovery set is in production again; returns how many are present."""
        with self._connect(req.query.database) as prod, self._side(req.query.database, req.side_port) as side, \
                _sql_errors(req.query.database):
            recovery = _recovery_set(prod, side, req.query)
            missing = _count_missing(prod, recovery)
        if missing:
            raise ApplicationError(f"{missing} recovered rows are not in production after the re-insert",
                                   type="ReinsertIncomplete", non_retryable=True)
        return sum(len(keys) for keys in recovery.keys.values())

    # --- helpers --------------------------------------------------------------------

    def _connect(self, database: str, autocommit: bool = True) -> psycopg.Connection:
        try:
            return self.server.connect(database, autocommit=autocommit)
        except psycopg.OperationalError as err:
            if "does not exist" in str(err):
                raise _bad_input("UnknownDatabase", f"database {database!r} does not exist; nothing was changed")
            raise

    def _require_redis(self):
        if self.redis is None:
            raise _bad_input("NoRedis", "an API key was given but the worker has no redis_url to block it in")
        return self.redis

    def _side(self, database: str, port: int) -> psycopg.Connection:
        return self.server.at(self.server.data_dir, port=port).connect(database)

    def _evidence_bucket(self) -> str:
        return urlparse(self.evidence_destination).netloc

    def _evidence_prefix(self) -> str:
        return urlparse(self.evidence_destination).path.strip("/")


def _bad_input(kind: str, message: str) -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=True)


# SQL errors that no retry can fix: the same statement on the same catalog fails the same way.
_DETERMINISTIC = {
    psycopg.errors.UndefinedTable: "UndefinedTable", psycopg.errors.UndefinedColumn: "UndefinedColumn",
    psycopg.errors.InsufficientPrivilege: "PermissionDenied", psycopg.errors.GeneratedAlways: "SqlRefused",
    psycopg.errors.WrongObjectType: "SqlRefused", psycopg.errors.FeatureNotSupported: "SqlRefused",
    psycopg.errors.DataException: "SqlRefused", psycopg.errors.IntegrityConstraintViolation: "SqlRefused",
    psycopg.errors.SyntaxErrorOrAccessRuleViolation: "SqlRefused",
}


@contextmanager
def _sql_errors(what: str) -> Iterator[None]:
    """Classify where raised: an SQL error retrying cannot fix becomes non-retryable, naming the table."""
    try:
        yield
    except psycopg.Error as err:
        kind = next((k for cls, k in _DETERMINISTIC.items() if isinstance(err, cls)), None)
        if kind is None:
            raise  # connection lost, serialization failure, lock timeout ...: a retry may succeed
        diag = err.diag
        table = f" (table {_display((diag.schema_name, diag.table_name))})" if diag.table_name and diag.schema_name \
            else ""
        raise ApplicationError(f"{what}: {diag.message_primary or err}{table}", type=kind,
                               non_retryable=True) from err


def _display(table: Rel) -> str:
    """A table as PostgreSQL prints it: public.companies, public."Orders", "Sales EU"."Q1 raw"."""
    return f"{quote_ident(table[0])}.{quote_ident(table[1])}"


def _recorded(text: str) -> Rel:
    """A table name the runbook recorded (as printed by _display; older records as schema.name unquoted)."""
    parts, _ = split_qualified(text)
    return (parts[0], parts[1]) if len(parts) == 2 else ("public", parts[0])


def _ident(table: Rel) -> sql.Composable:
    return sql.Identifier(*table)


def _object_name(table: Rel) -> str:
    """An S3 key segment for a table: readable, and never a path separator."""
    return _display(table).replace("/", "%2F")


def _fold(name: str) -> str:
    """What PostgreSQL makes of an unquoted name: ASCII letters in lower case (UTF-8 databases)."""
    return "".join(c.lower() if "A" <= c <= "Z" else c for c in name)


def resolve_table(conn: psycopg.Connection, ref: TableRef, database: str) -> tuple[Rel, int]:
    """The one table `ref` names, and its OID. Quoted parts match exactly; unquoted ones as typed, else as
    PostgreSQL folds them. Without a schema, the schema holding such a table (public first)."""
    names = [ref.name] if ref.as_typed else sorted({ref.name, _fold(ref.name)})
    schemas = None if ref.schema_name is None else (
        [ref.schema_name] if ref.as_typed else sorted({ref.schema_name, _fold(ref.schema_name)}))
    rows = conn.execute(
        "SELECT n.nspname, c.relname, c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND c.relname = ANY(%s) AND (%s::text[] IS NULL OR n.nspname = ANY(%s)) "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'drp') AND n.nspname NOT LIKE 'pg\\_%%'",
        (names, schemas, schemas)).fetchall()
    if not rows:
        raise _bad_input("UnknownTable", f"table {str(ref)!r} does not exist in {database}; nothing was changed")

    def rank(row):  # as typed beats folded; public beats other schemas when none was given
        return (row[1] == ref.name, ref.schema_name is None or row[0] == ref.schema_name, row[0] == "public")

    best = max(rank(r) for r in rows)
    found = [r for r in rows if rank(r) == best]
    if len(found) > 1:
        raise _bad_input("AmbiguousTable", f"table {str(ref)!r} could be any of "
                                           f"{', '.join(_display((r[0], r[1])) for r in found)} in {database}: "
                                           "name the schema, or quote the name as PostgreSQL prints it")
    return (found[0][0], found[0][1]), found[0][2]


def _cols(columns: list[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(c) for c in columns)


def _filters(q: DeletionQuery) -> str:
    return "".join(f" {k} {v}" for k, v in (("on table", q.table and str(q.table)),
                                             ("by role", q.role and repr(q.role))) if v)


@dataclass
class AuditFilter:
    schema: sql.Composable  # the audited table's schema and name, per audit row
    rel: sql.Composable
    where: sql.Composable
    params: list


def _audit_filter(conn: psycopg.Connection, q: DeletionQuery) -> AuditFilter:
    """The audit rows of the deletions the query is about.

    The window is matched on the deleting transaction's commit time: that is when the rows disappeared
    for everyone. The statement time ("timestamp") is never later than the commit, so it only narrows
    the scan from above. Older audit logs have no schema_name/relation_name columns: their table_name
    is schema.name unquoted."""
    have = {r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'public.audit_log'::regclass AND NOT attisdropped")}
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
        where = sql.SQL("{} AND ({}, {}) IN (SELECT n.nspname::text, c.relname::text FROM "
                        "(SELECT relid FROM pg_partition_tree(%s::oid::regclass) UNION SELECT %s::oid::regclass) t "
                        "JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace)").format(
            where, schema, rel)
        params += [oid, oid]
    if q.role:
        where = sql.SQL("{} AND role_name = %s").format(where)
        params.append(q.role)
    return AuditFilter(schema=schema, rel=rel, where=where, params=params)


def _primary_key(conn: psycopg.Connection, table: Rel) -> list[str]:
    cols = [r[0] for r in conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)",
        (_display(table),))]
    if not cols:
        raise _bad_input("NoPrimaryKey", f"{_display(table)} has no primary key: deleted rows cannot be matched "
                                         "exactly")
    return cols


def _columns(conn: psycopg.Connection, table: Rel, insertable: bool = False) -> list[str]:
    """The table's columns; `insertable`: all but generated ones (PostgreSQL computes those again)."""
    return [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
        "AND (NOT %s OR attgenerated = '') ORDER BY attnum", (_display(table), insertable))]


@dataclass
class RecoverySet:
    keys: dict[Rel, list[dict]]  # table -> primary keys present in the side instance
    audit_tables: set[Rel]  # tables whose deletions the audit log names (the rest are dependents)
    not_in_side: int  # deleted keys the side instance does not hold (created after the target)


def _recovery_set(prod: psycopg.Connection, side: psycopg.Connection, q: DeletionQuery) -> RecoverySet:
    """Keys to bring back: the audit log's deletions, plus rows in the side instance that reference
    them through foreign keys and are missing from production (followed a few levels deep)."""
    f = _audit_filter(prod, q)
    audit: dict[Rel, list[dict]] = {}
    pks: dict[Rel, list[str]] = {}
    for schema, rel, row in prod.execute(sql.SQL(
            "SELECT {}, {}, row_data FROM public.audit_log WHERE {} ORDER BY id").format(f.schema, f.rel, f.where),
            f.params):
        table = (schema, rel)
        if table not in pks:
            with _sql_errors(f"{_display(table)} (named by the audit log) in {q.database}"):
                pks[table] = _primary_key(prod, table)
        audit.setdefault(table, []).append({c: row[c] for c in pks[table]})
    recovery, not_in_side = {}, 0
    for table, keys in audit.items():
        keys = _unique(keys)
        with _sql_errors(f"{_display(table)} in the side instance"):
            present = _present_in(side, table, _primary_key(side, table), keys)
        not_in_side += len(keys) - len(present)
        recovery[table] = present
    frontier = dict(recovery)
    for _ in range(MAX_FK_DEPTH):
        found: dict[Rel, list[dict]] = {}
        for parent, keys in frontier.items():
            for child, child_cols, parent_cols in _foreign_keys_to(side, parent):
                pk = _primary_key(side, child)
                refs = [{pc: k[pc] for pc in parent_cols} for k in keys if all(pc in k for pc in parent_cols)]
                if not refs:
                    continue
                rows = side.execute(sql.SQL(
                    "SELECT coalesce(jsonb_agg(jsonb_build_object({})), '[]') FROM {} c WHERE ({}) IN "
                    "(SELECT {} FROM jsonb_populate_recordset(NULL::{}, %s))").format(
                    sql.SQL(", ").join(sql.SQL("{}, c.{}").format(sql.Literal(c), sql.Identifier(c)) for c in pk),
                    _ident(child), _cols(child_cols), _cols(parent_cols), _ident(parent)),
                    (json.dumps(refs),)).fetchone()[0]
                absent = _absent_in(prod, child, pk, rows)
                known = {_token(k) for k in recovery.get(child, [])}
                new = [k for k in absent if _token(k) not in known]
                if new:
                    found.setdefault(child, []).extend(new)
        if not found:
            break
        for table, keys in found.items():
            recovery[table] = _unique(recovery.get(table, []) + keys)
        frontier = {t: _unique(k) for t, k in found.items()}
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
            "WHERE k.contype = 'f' AND k.confrelid = %s::regclass", (_display(parent),)):
        out.append(((schema, child), list(child_cols), list(parent_cols)))
    return out


def _present_in(conn: psycopg.Connection, table: Rel, pk: list[str], keys: list[dict]) -> list[dict]:
    """The keys (as given) that have a row in table on this server."""
    if not keys:
        return []
    present = conn.execute(sql.SQL(
        "SELECT coalesce(jsonb_agg(jsonb_build_object({})), '[]') FROM {} t WHERE ({}) IN "
        "(SELECT {} FROM jsonb_populate_recordset(NULL::{}, %s))").format(
        sql.SQL(", ").join(sql.SQL("{}, t.{}").format(sql.Literal(c), sql.Identifier(c)) for c in pk),
        _ident(table), _cols(pk), _cols(pk), _ident(table)), (json.dumps(keys),)).fetchone()[0]
    have = {_token({c: k[c] for c in pk}) for k in present}
    return [k for k in keys if _token({c: k[c] for c in pk}) in have]


def _absent_in(conn: psycopg.Connection, table: Rel, pk: list[str], keys: list[dict]) -> list[dict]:
    present = {_token(k) for k in _present_in(conn, table, pk, keys)}
    return [k for k in keys if _token(k) not in present]


def _count_missing(prod: psycopg.Connection, recovery: RecoverySet) -> int:
    return sum(len(_absent_in(prod, table, _primary_key(prod, table), keys)) for table, keys in recovery.keys.items())


def _parents_first(conn: psycopg.Connection, tables: list[Rel]) -> list[Rel]:
    remaining, ordered = set(tables), []
    while remaining:
        ready = sorted(t for t in remaining if not any(
            p in remaining and p != t for p in _parents_of(conn, t)))
        if not ready:  # a cycle: keep a stable order and let the transaction decide
            ready = sorted(remaining)
        ordered += ready
        remaining -= set(ready)
    return ordered


def _parents_of(conn: psycopg.Connection, table: Rel) -> list[Rel]:
    return [(r[0], r[1]) for r in conn.execute(
        "SELECT n.nspname, c.relname FROM pg_constraint k JOIN pg_class c ON c.oid = k.confrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE k.contype = 'f' AND k.conrelid = %s::regclass",
        (_display(table),))]


def _copy_csv(conn: psycopg.Connection, table: Rel, keys: list[dict], out) -> None:
    """The rows as CSV (with a header) into a file: streamed, never held whole in memory."""
    pk = _primary_key(conn, table)
    query = sql.SQL("COPY (SELECT * FROM {} WHERE ({}) IN (SELECT {} FROM jsonb_populate_recordset(NULL::{}, {})) "
                    "ORDER BY {}) TO STDOUT WITH (FORMAT csv, HEADER)").format(
        _ident(table), _cols(pk), _cols(pk), _ident(table), sql.Literal(json.dumps(keys)), _cols(pk))
    with conn.cursor().copy(query) as copy:
        for chunk in copy:
            out.write(chunk)


def _sample(conn: psycopg.Connection, table: Rel, keys: list[dict]) -> list[str]:
    """The column names and the first rows, each cut short: what the approver sees in the Web UI."""
    pk = _primary_key(conn, table)
    rows = conn.execute(sql.SQL(
        "SELECT CASE WHEN length(t::text) > %s THEN left(t::text, %s) || '… (' || length(t::text) || ' chars)' "
        "ELSE t::text END FROM {} t WHERE ({}) IN (SELECT {} FROM jsonb_populate_recordset(NULL::{}, %s)) "
        "ORDER BY {} LIMIT %s").format(_ident(table), _cols(pk), _cols(pk), _ident(table), _cols(pk)),
        (SAMPLE_ROW_CHARS, SAMPLE_ROW_CHARS, json.dumps(keys[:SAMPLE_ROWS * 10]), SAMPLE_ROWS)).fetchall()
    return [",".join(_columns(conn, table))] + [r[0] for r in rows]


def _key_text(row: dict, pk: list[str]) -> str:
    return ",".join(f"{c}={row[c]}" for c in pk)


def _token(key: dict) -> str:
    """A key as comparable text: JSON numbers and Python values of one key compare equal."""
    return json.dumps({c: str(v) for c, v in key.items()}, sort_keys=True)


def _unique(keys: list[dict]) -> list[dict]:
    seen, out = set(), []
    for k in keys:
        if _token(k) not in seen:
            seen.add(_token(k))
            out.append(k)
    return out
