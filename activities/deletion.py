"""DeletionActivities: contain, identify, extract and re-insert deleted rows.

Production is only ever added to: rows come back with INSERT ... ON CONFLICT
DO NOTHING in one transaction, so a row re-created since the deletion is
reported as a conflict and kept as it is. What the runbook did (privileges
revoked, rows re-inserted) is recorded in production's `drp` schema in the
same transaction as the change, which makes every step safe to re-run.
"""

import io
import json
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlparse

import psycopg
from psycopg import sql
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.barman import BarmanCloud
from activities.pgserver import PgServer
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
        input fails here having changed nothing.
        """
        with self._connect(q.database) as conn:
            if conn.execute("SELECT to_regclass('public.audit_log')").fetchone()[0] is None:
                raise _bad_input("NoAuditLog", f"{q.database} has no public.audit_log; install it with "
                                                 "`drp audit install` (deletions before that cannot be traced)")
            if q.table and conn.execute("SELECT to_regclass(%s)", (_qualified(q.table),)).fetchone()[0] is None:
                raise _bad_input("UnknownTable", f"table {q.table!r} does not exist in {q.database}")
            if q.role and not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (q.role,)).fetchone():
                raise _bad_input("UnknownRole", f"role {q.role!r} does not exist")
            where, params = _deletion_filter(q)
            rows = conn.execute(
                f"SELECT table_name, count(*), min(\"timestamp\"), array_agg(DISTINCT role_name), "
                f"array_agg(DISTINCT txid) FROM public.audit_log WHERE {where} GROUP BY table_name",
                params).fetchall()
            if not rows:
                raise _bad_input("NoDeletionsFound", f"no DELETE in the audit log between {q.window_start} and "
                                                       f"{q.window_end}{_filters(q)}; nothing was changed")
            txids = sorted({t for r in rows for t in r[4]})
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
            rows_by_table={r[0]: r[1] for r in rows}, roles=sorted({role for r in rows for role in r[3]}),
            first_deleted_at=min(r[2] for r in rows), target_xid=target_xid, target_commit_at=target_at,
            backup_id=backups[-1]["backup_id"])

    # --- containment ---------------------------------------------------------------

    @activity.defn
    def contain(self, req: ContainRequest) -> Containment:
        """Revoke the role's write privileges and block the API key; both recorded for lifting later."""
        revoked: list[tuple[str, str]] = []
        if req.role:
            with self._connect(req.database, autocommit=False) as conn:
                conn.execute(BOOKKEEPING_SQL)
                grants = conn.execute(
                    "SELECT table_schema || '.' || table_name, privilege_type FROM information_schema.role_table_grants"
                    " WHERE grantee = %s AND privilege_type = ANY(%s) AND table_schema NOT IN ('drp', 'pg_catalog')",
                    (req.role, list(WRITE_PRIVILEGES))).fetchall()
                for table, privilege in grants:
                    conn.execute("INSERT INTO drp.containment (incident_id, role_name, table_name, privilege) "
                                 "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                                 (req.incident_id, req.role, table, privilege))
                    conn.execute(sql.SQL("REVOKE {} ON {} FROM {}").format(
                        sql.SQL(privilege), _ident(table), sql.Identifier(req.role)))
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
            with self._connect(req.database, autocommit=False) as conn:
                conn.execute(BOOKKEEPING_SQL)
                for table, privilege in conn.execute(
                        "SELECT table_name, privilege FROM drp.containment WHERE incident_id = %s AND role_name = %s "
                        "AND restored_at IS NULL", (req.incident_id, req.role)).fetchall():
                    conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(
                        sql.SQL(privilege), _ident(table), sql.Identifier(req.role)))
                conn.execute("UPDATE drp.containment SET restored_at = now() WHERE incident_id = %s AND "
                             "role_name = %s AND restored_at IS NULL", (req.incident_id, req.role))
                conn.commit()
        if req.api_key_sha256:
            self._require_redis().srem(BLOCKED_KEYS, req.api_key_sha256)

    # --- extract ------------------------------------------------------------------

    @activity.defn
    def extract_deleted_rows(self, req: ExtractRequest) -> Extracted:
        """Find the deleted rows (and rows depending on them) in the side instance; CSV evidence to S3."""
        prefix = f"{self._evidence_prefix()}/{req.incident_id}"
        with self._connect(req.query.database) as prod, self._side(req.query.database, req.side_port) as side:
            recovery = _recovery_set(prod, side, req.query)
            counts, sample = {}, {}
            for table, keys in recovery.keys.items():
                _heartbeat(f"exporting {table}")
                csv = _copy_csv(side, table, keys)
                self.s3.put_object(Bucket=self._evidence_bucket(), Key=f"{prefix}/{table}.csv", Body=csv)
                lines = csv.decode().splitlines()
                counts[table] = max(len(lines) - 1, 0)
                sample[table] = lines[:4]
        return Extracted(
            rows_by_table={t: n for t, n in counts.items() if t in recovery.audit_tables},
            dependent_rows_by_table={t: n for t, n in counts.items() if t not in recovery.audit_tables},
            not_in_side_instance=recovery.not_in_side, sample=sample,
            evidence_uri=f"s3://{self._evidence_bucket()}/{prefix}/")

    # --- re-insert ----------------------------------------------------------------

    @activity.defn
    def reinsert_rows(self, req: ReinsertRequest) -> Reinserted:
        """Put the rows back into production in one transaction; never overwrite."""
        with self._connect(req.query.database, autocommit=False) as prod, \
                self._side(req.query.database, req.side_port) as side:
            prod.execute(BOOKKEEPING_SQL)
            done = prod.execute("SELECT result FROM drp.reinsertions WHERE incident_id = %s",
                                (req.incident_id,)).fetchone()
            if done:  # committed by an earlier attempt
                prod.rollback()
                return Reinserted.model_validate(done[0])
            recovery = _recovery_set(prod, side, req.query)
            inserted, conflicts = {}, {}
            for table in _parents_first(prod, list(recovery.keys)):
                _heartbeat(f"re-inserting {table}")
                pk = _primary_key(prod, table)
                rows = side.execute(sql.SQL("SELECT coalesce(jsonb_agg(to_jsonb(t)), '[]') FROM {} t WHERE ({}) IN "
                                            "(SELECT {} FROM jsonb_populate_recordset(NULL::{}, %s))").format(
                    _ident(table), _cols(pk), _cols(pk), _ident(table)),
                    (json.dumps(recovery.keys[table]),)).fetchone()[0]
                back = prod.execute(sql.SQL(
                    "INSERT INTO {} OVERRIDING SYSTEM VALUE SELECT * FROM jsonb_populate_recordset(NULL::{}, %s) "
                    "ON CONFLICT DO NOTHING RETURNING {}").format(_ident(table), _ident(table), _cols(pk)),
                    (json.dumps(rows),)).fetchall()
                inserted[table] = len(back)
                got = {tuple(str(v) for v in r) for r in back}
                lost = [_key_text(row, pk) for row in rows if tuple(str(row[c]) for c in pk) not in got]
                if lost:
                    conflicts[table] = lost
            missing = _count_missing(prod, recovery)
            result = Reinserted(inserted_by_table=inserted, conflicts_by_table=conflicts,
                                missing_after_insert=missing)
            prod.execute("INSERT INTO drp.reinsertions (incident_id, result) VALUES (%s, %s)",
                         (req.incident_id, result.model_dump_json()))
            prod.commit()
        return result

    @activity.defn
    def verify_reinserted(self, req: ReinsertRequest) -> int:
        """Every key of the recovery set is in production again; returns how many are present."""
        with self._connect(req.query.database) as prod, self._side(req.query.database, req.side_port) as side:
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


def _qualified(table: str) -> str:
    return table if "." in table else f"public.{table}"


def _ident(table: str) -> sql.Composable:
    schema, name = _qualified(table).split(".", 1)
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def _cols(columns: list[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(c) for c in columns)


def _filters(q: DeletionQuery) -> str:
    return "".join(f" {k} {v!r}" for k, v in (("on table", q.table), ("by role", q.role)) if v)


def _deletion_filter(q: DeletionQuery) -> tuple[str, list]:
    where, params = "action = 'DELETE' AND \"timestamp\" >= %s AND \"timestamp\" < %s", [q.window_start, q.window_end]
    if q.table:
        where, params = where + " AND table_name = %s", params + [_qualified(q.table)]
    if q.role:
        where, params = where + " AND role_name = %s", params + [q.role]
    return where, params


def _primary_key(conn: psycopg.Connection, table: str) -> list[str]:
    cols = [r[0] for r in conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)",
        (_qualified(table),))]
    if not cols:
        raise _bad_input("NoPrimaryKey", f"{table} has no primary key: deleted rows cannot be matched exactly")
    return cols


@dataclass
class RecoverySet:
    keys: dict[str, list[dict]]  # table -> primary keys present in the side instance
    audit_tables: set[str]  # tables whose deletions the audit log names (the rest are dependents)
    not_in_side: int  # deleted keys the side instance does not hold (created after the target)


def _recovery_set(prod: psycopg.Connection, side: psycopg.Connection, q: DeletionQuery) -> RecoverySet:
    """Keys to bring back: the audit log's deletions, plus rows in the side instance that reference
    them through foreign keys and are missing from production (followed a few levels deep)."""
    where, params = _deletion_filter(q)
    audit: dict[str, list[dict]] = {}
    for table, row in prod.execute(f"SELECT table_name, row_data FROM public.audit_log WHERE {where} ORDER BY id",
                                   params):
        audit.setdefault(table, []).append({c: row[c] for c in _primary_key(prod, table)})
    recovery, not_in_side = {}, 0
    for table, keys in audit.items():
        keys = _unique(keys)
        present = _present_in(side, table, _primary_key(side, table), keys)
        not_in_side += len(keys) - len(present)
        recovery[table] = present
    frontier = dict(recovery)
    for _ in range(MAX_FK_DEPTH):
        found: dict[str, list[dict]] = {}
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


def _foreign_keys_to(conn: psycopg.Connection, parent: str) -> list[tuple[str, list[str], list[str]]]:
    """(child table, child columns, parent columns) of every foreign key that references parent."""
    out = []
    for child, child_cols, parent_cols in conn.execute(
            "SELECT format('%%I.%%I', n.nspname, c.relname), "
            "       array(SELECT attname FROM unnest(k.conkey) WITH ORDINALITY u(n, o) JOIN pg_attribute "
            "             ON attrelid = k.conrelid AND attnum = u.n ORDER BY o), "
            "       array(SELECT attname FROM unnest(k.confkey) WITH ORDINALITY u(n, o) JOIN pg_attribute "
            "             ON attrelid = k.confrelid AND attnum = u.n ORDER BY o) "
            "FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE k.contype = 'f' AND k.confrelid = %s::regclass", (_qualified(parent),)):
        out.append((child, list(child_cols), list(parent_cols)))
    return out


def _present_in(conn: psycopg.Connection, table: str, pk: list[str], keys: list[dict]) -> list[dict]:
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


def _absent_in(conn: psycopg.Connection, table: str, pk: list[str], keys: list[dict]) -> list[dict]:
    present = {_token(k) for k in _present_in(conn, table, pk, keys)}
    return [k for k in keys if _token(k) not in present]


def _count_missing(prod: psycopg.Connection, recovery: RecoverySet) -> int:
    return sum(len(_absent_in(prod, table, _primary_key(prod, table), keys)) for table, keys in recovery.keys.items())


def _parents_first(conn: psycopg.Connection, tables: list[str]) -> list[str]:
    remaining, ordered = set(tables), []
    while remaining:
        ready = sorted(t for t in remaining if not any(
            p in remaining and p != t for p in _parents_of(conn, t)))
        if not ready:  # a cycle: keep a stable order and let the transaction decide
            ready = sorted(remaining)
        ordered += ready
        remaining -= set(ready)
    return ordered


def _parents_of(conn: psycopg.Connection, table: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_constraint k JOIN pg_class c ON c.oid = k.confrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE k.contype = 'f' AND k.conrelid = %s::regclass",
        (_qualified(table),))]


def _copy_csv(conn: psycopg.Connection, table: str, keys: list[dict]) -> bytes:
    pk = _primary_key(conn, table)
    buf = io.BytesIO()
    query = sql.SQL("COPY (SELECT * FROM {} WHERE ({}) IN (SELECT {} FROM jsonb_populate_recordset(NULL::{}, {})) "
                    "ORDER BY {}) TO STDOUT WITH (FORMAT csv, HEADER)").format(
        _ident(table), _cols(pk), _cols(pk), _ident(table), sql.Literal(json.dumps(keys)), _cols(pk))
    with conn.cursor().copy(query) as copy:
        for chunk in copy:
            buf.write(chunk)
    return buf.getvalue()


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
