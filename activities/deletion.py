"""DeletionActivities: contain, identify, extract and re-insert deleted rows.

Production is only ever added to: rows come back with INSERT ... ON CONFLICT
DO NOTHING in one transaction, so a row re-created since the deletion is
reported as a conflict and kept as it is. What the runbook did (privileges
revoked, rows re-inserted) is recorded in production's `drp` schema in the
same transaction as the change, which makes every step safe to re-run.
"""

import json
import tempfile
from datetime import datetime
from urllib.parse import urlparse

import psycopg
from psycopg import sql
from temporalio import activity
from temporalio.exceptions import ApplicationError

from adapters.barman import BarmanCloud
from adapters.errors import refused
from adapters.pgserver import PgServer, one
from adapters.rows import (
    BOOKKEEPING_SQL,
    audit_filter,
    column_list,
    columns,
    copy_csv,
    count_missing,
    display,
    ident,
    key_text,
    object_name,
    parents_first,
    primary_key,
    recorded,
    recovery_set,
    resolve_table,
    sample_rows,
    sql_errors,
)
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
from models.errors import ErrorKind

BLOCKED_KEYS = "blocked_api_keys"
WRITE_PRIVILEGES = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")
KEYS_PER_BATCH = 50  # rows re-inserted per statement: bounds memory with multi-megabyte (TOAST) values
MAX_CONFLICTS_LISTED = 100  # per table; the result keeps the count of the rest


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
        with self._connect(q.database) as conn, sql_errors(q.database):
            if conn.execute("SELECT to_regclass('public.audit_log')").fetchone()[0] is None:
                raise refused(
                    ErrorKind.NoAuditLog,
                    f"{q.database} has no public.audit_log; install it with "
                    "`drp audit install` (deletions before that cannot be traced)",
                )
            if conn.execute("SELECT current_setting('track_commit_timestamp')").fetchone()[0] != "on":
                raise refused(
                    ErrorKind.NoCommitTimestamps,
                    "commit timestamps are unknown (track_commit_timestamp is "
                    "off): neither the window nor the recovery target can be "
                    "placed safely; nothing was changed",
                )
            if q.table:
                resolve_table(conn, q.table, q.database)  # UnknownTable / AmbiguousTable
            if q.role and not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (q.role,)).fetchone():
                raise refused(ErrorKind.UnknownRole, f"role {q.role!r} does not exist")
            audit = audit_filter(conn, q)
            rows = conn.execute(
                sql.SQL(
                    'SELECT {schema}, {rel}, count(*), min("timestamp"), array_agg(DISTINCT role_name), '
                    "array_agg(DISTINCT txid) FROM public.audit_log WHERE {where} GROUP BY 1, 2"
                ).format(schema=audit.schema, rel=audit.rel, where=audit.where),
                audit.params,
            ).fetchall()
            if not rows:
                raise refused(
                    ErrorKind.NoDeletionsFound,
                    f"no DELETE committed between {q.window_start} and "
                    f"{q.window_end}{_filters(q)}; nothing was changed",
                )
            gone = [
                (r[0], r[1])
                for r in rows
                if conn.execute("SELECT to_regclass(%s)", (display((r[0], r[1])),)).fetchone()[0] is None
            ]
            if gone:
                raise refused(
                    ErrorKind.UnknownTable,
                    f"the audit log names {', '.join(map(display, gone))}, which no "
                    f"longer exists in {q.database}: rows cannot go back to a dropped "
                    "table (name the tables to recover with --table); nothing was "
                    "changed",
                )
            txids = sorted({t for r in rows for t in r[5]})
            first = one(
                conn.execute(
                    "SELECT t, pg_xact_commit_timestamp((t %% 4294967296)::text::xid) AS at "
                    "FROM unnest(%s::bigint[]) t ORDER BY at NULLS LAST LIMIT 1",
                    (txids,),
                )
            )
        if first[1] is None:
            raise refused(
                ErrorKind.NoCommitTimestamps,
                "commit timestamps are unknown (track_commit_timestamp is off); "
                "the recovery target cannot be placed safely",
            )
        target_xid, target_at = first
        backups = [b for b in self.barman.list_backups() if datetime.fromisoformat(b["end_time_iso"]) < target_at]
        if not backups:
            raise refused(
                ErrorKind.NoBackupBeforeTarget,
                f"the first deletion committed at {target_at}, before the oldest "
                f"base backup in {self.barman.destination} ended; point-in-time "
                "recovery cannot reach it. Nothing was changed.",
            )
        return DeletionFindings(
            rows_by_table={display((r[0], r[1])): r[2] for r in rows},
            roles=sorted({role for r in rows for role in r[4]}),
            first_deleted_at=min(r[3] for r in rows),
            target_xid=target_xid,
            target_commit_at=target_at,
            backup_id=backups[-1]["backup_id"],
        )

    # --- containment ---------------------------------------------------------------

    @activity.defn
    def contain(self, req: ContainRequest) -> Containment:
        """Revoke the role's write privileges and block the API key; both recorded for lifting later."""
        revoked: list[tuple[str, str]] = []
        if req.role:
            with self._connect(req.database, autocommit=False) as conn, sql_errors(req.database):
                conn.execute(BOOKKEEPING_SQL)
                grants = conn.execute(
                    "SELECT table_schema, table_name, privilege_type FROM information_schema.role_table_grants"
                    " WHERE grantee = %s AND privilege_type = ANY(%s) AND table_schema NOT IN ('drp', 'pg_catalog')",
                    (req.role, list(WRITE_PRIVILEGES)),
                ).fetchall()
                for schema, table, privilege in grants:
                    conn.execute(
                        "INSERT INTO drp.containment (incident_id, role_name, table_name, privilege) "
                        "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                        (req.incident_id, req.role, display((schema, table)), privilege),
                    )
                    conn.execute(
                        sql.SQL("REVOKE {} ON {} FROM {}").format(
                            sql.SQL(privilege), ident((schema, table)), sql.Identifier(req.role)
                        )
                    )
                revoked = [
                    tuple(r)
                    for r in conn.execute(
                        "SELECT table_name, privilege FROM drp.containment WHERE incident_id = %s AND role_name = %s "
                        "ORDER BY 1, 2",
                        (req.incident_id, req.role),
                    )
                ]
                conn.commit()
        if req.api_key_sha256:
            self._require_redis().sadd(BLOCKED_KEYS, req.api_key_sha256)
        return Containment(role=req.role, revoked=revoked, api_key_sha256=req.api_key_sha256)

    @activity.defn
    def lift_containment(self, req: ContainRequest) -> None:
        """Give back exactly what `contain` took, and unblock the key (re-run safe)."""
        if req.role:
            with self._connect(req.database, autocommit=False) as conn, sql_errors(req.database):
                conn.execute(BOOKKEEPING_SQL)
                for table, privilege in conn.execute(
                    "SELECT table_name, privilege FROM drp.containment WHERE incident_id = %s AND role_name = %s "
                    "AND restored_at IS NULL",
                    (req.incident_id, req.role),
                ).fetchall():
                    conn.execute(
                        sql.SQL("GRANT {} ON {} TO {}").format(
                            sql.SQL(privilege), ident(recorded(table)), sql.Identifier(req.role)
                        )
                    )
                conn.execute(
                    "UPDATE drp.containment SET restored_at = now() WHERE incident_id = %s AND "
                    "role_name = %s AND restored_at IS NULL",
                    (req.incident_id, req.role),
                )
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
        with (
            self._connect(req.query.database) as prod,
            self._side(req.query.database, req.side_port) as side,
            sql_errors(req.query.database),
        ):
            recovery = recovery_set(prod, side, req.query)
            counts, sample = {}, {}
            for table, keys in recovery.keys.items():
                _heartbeat(f"exporting {display(table)}")
                with (
                    sql_errors(f"{display(table)} in the side instance"),
                    tempfile.SpooledTemporaryFile(max_size=8 << 20) as csv_file,
                ):
                    copy_csv(side, table, keys, csv_file)
                    sample[display(table)] = sample_rows(side, table, keys)
                    csv_file.seek(0)
                    self.s3.put_object(
                        Bucket=self._evidence_bucket(), Key=f"{prefix}/{object_name(table)}.csv", Body=csv_file
                    )
                counts[table] = len(keys)
        return Extracted(
            rows_by_table={display(t): n for t, n in counts.items() if t in recovery.audit_tables},
            dependent_rows_by_table={display(t): n for t, n in counts.items() if t not in recovery.audit_tables},
            not_in_side_instance=recovery.not_in_side,
            sample=sample,
            evidence_uri=f"s3://{self._evidence_bucket()}/{prefix}/",
        )

    # --- re-insert ----------------------------------------------------------------

    @activity.defn
    def reinsert_rows(self, req: ReinsertRequest) -> Reinserted:
        """Put the rows back into production in one transaction; never overwrite.

        Only the columns that can be inserted are (generated columns are computed again; identity
        columns keep their values with OVERRIDING SYSTEM VALUE); rows are copied in batches, side
        instance to production, through this worker only."""
        with (
            self._connect(req.query.database, autocommit=False) as prod,
            self._side(req.query.database, req.side_port) as side,
            sql_errors(req.query.database),
        ):
            prod.execute(BOOKKEEPING_SQL)
            done = prod.execute(
                "SELECT result FROM drp.reinsertions WHERE incident_id = %s", (req.incident_id,)
            ).fetchone()
            if done:  # committed by an earlier attempt
                prod.rollback()
                return Reinserted.model_validate(done[0])
            recovery = recovery_set(prod, side, req.query)
            inserted, conflicts, conflict_counts = {}, {}, {}
            for table in parents_first(prod, list(recovery.keys)):
                name = display(table)
                _heartbeat(f"re-inserting {name}")
                with sql_errors(f"re-inserting into {name}"):
                    pk = primary_key(prod, table)
                    cols = column_list(columns(prod, table, insertable=True))
                    inserted[name], lost = 0, []
                    for start in range(0, len(recovery.keys[table]), KEYS_PER_BATCH):
                        batch = recovery.keys[table][start : start + KEYS_PER_BATCH]
                        # As JSON text from server to server: values are never re-typed in Python.
                        rows_json = side.execute(
                            sql.SQL(
                                "SELECT coalesce(jsonb_agg(to_jsonb(t)), '[]')::text FROM {} t WHERE ({}) IN "
                                "(SELECT {} FROM jsonb_populate_recordset(NULL::{}, %s))"
                            ).format(ident(table), column_list(pk), column_list(pk), ident(table)),
                            (json.dumps(batch),),
                        ).fetchone()[0]
                        back = prod.execute(
                            sql.SQL(
                                "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM "
                                "jsonb_populate_recordset(NULL::{}, %s::jsonb) ON CONFLICT DO NOTHING RETURNING {}"
                            ).format(ident(table), cols, cols, ident(table), column_list(pk)),
                            (rows_json,),
                        ).fetchall()
                        rows = [{c: r[c] for c in pk} for r in json.loads(rows_json)]
                        inserted[name] += len(back)
                        got = {tuple(str(v) for v in r) for r in back}
                        lost += [key_text(row, pk) for row in rows if tuple(str(row[c]) for c in pk) not in got]
                        _heartbeat(f"re-inserting {name}: {start + len(batch)} of {len(recovery.keys[table])}")
                    if lost:
                        conflicts[name] = lost[:MAX_CONFLICTS_LISTED]
                        conflict_counts[name] = len(lost)
            missing = count_missing(prod, recovery)
            result = Reinserted(
                inserted_by_table=inserted,
                conflicts_by_table=conflicts,
                conflict_count_by_table=conflict_counts,
                missing_after_insert=missing,
            )
            prod.execute(
                "INSERT INTO drp.reinsertions (incident_id, result) VALUES (%s, %s)",
                (req.incident_id, result.model_dump_json()),
            )
            prod.commit()
        return result

    @activity.defn
    def verify_reinserted(self, req: ReinsertRequest) -> int:
        """Every key of the recovery set is in production again; returns how many are present."""
        with (
            self._connect(req.query.database) as prod,
            self._side(req.query.database, req.side_port) as side,
            sql_errors(req.query.database),
        ):
            recovery = recovery_set(prod, side, req.query)
            missing = count_missing(prod, recovery)
        if missing:
            raise ApplicationError(
                f"{missing} recovered rows are not in production after the re-insert",
                type=ErrorKind.ReinsertIncomplete,
                non_retryable=True,
            )
        return sum(len(keys) for keys in recovery.keys.values())

    # --- helpers --------------------------------------------------------------------

    def _connect(self, database: str, autocommit: bool = True) -> psycopg.Connection:
        try:
            return self.server.connect(database, autocommit=autocommit)
        except psycopg.OperationalError as err:
            if "does not exist" in str(err):
                raise refused(
                    ErrorKind.UnknownDatabase, f"database {database!r} does not exist; nothing was changed"
                ) from err
            raise

    def _require_redis(self):
        if self.redis is None:
            raise refused(ErrorKind.NoRedis, "an API key was given but the worker has no redis_url to block it in")
        return self.redis

    def _side(self, database: str, port: int) -> psycopg.Connection:
        return self.server.at(self.server.data_dir, port=port).connect(database)

    def _evidence_bucket(self) -> str:
        return urlparse(self.evidence_destination).netloc

    def _evidence_prefix(self) -> str:
        return urlparse(self.evidence_destination).path.strip("/")


def _filters(q: DeletionQuery) -> str:
    return "".join(
        f" {k} {v}" for k, v in (("on table", q.table and str(q.table)), ("by role", q.role and repr(q.role))) if v
    )
