"""PostgresActivities: look at the database, seal it, and verify a restore.

Every check here reads, never writes, except `seal_primary`, which stops the
old server only after the last WAL it wrote is safe in the archive.
"""

import re
import time
from datetime import UTC, datetime

import psycopg
from psycopg.conninfo import make_conninfo
from temporalio import activity
from temporalio.exceptions import ApplicationError

from adapters.pgserver import PgServer, one
from adapters.pgsql import (
    USER_TABLES,
    allow_connections,
    amcheck_reports,
    first_error,
    qualified,
    row_counts,
    table_of,
    terminate_others,
)
from adapters.sealing import marker_path, read_seal, set_allow_connections, set_subscriptions, write_seal
from adapters.timelines import waldump_end
from models.errors import ErrorKind
from models.postgres import (
    Assessment,
    AssessRequest,
    ProductionState,
    SealRequest,
    SealResult,
    VerifyRequest,
    VerifyResult,
)

# A complete WAL segment or a timeline history file (not .partial or .backup): what archive_command archives
# and a recovery needs.
_WAL_OR_HISTORY = re.compile(r"[0-9A-F]{24}|[0-9A-F]{8}\.history")


def _heartbeat(*details) -> None:
    if activity.in_activity():
        activity.heartbeat(*details)


class PostgresActivities:
    def __init__(self, server: PgServer, archive_wait_seconds: float = 300):
        self.server = server
        self.archive_wait_seconds = archive_wait_seconds

    # --- assess ---------------------------------------------------------------

    @activity.defn
    def assess_database(self, req: AssessRequest) -> Assessment:
        """Detect corruption for real: amcheck, a full read of every table, checksum failures."""
        try:
            conn = self.server.connect("postgres")
        except psycopg.OperationalError as err:
            return Assessment(
                database=req.database,
                server_reachable=False,
                findings=[f"server unreachable: {str(err).strip().splitlines()[-1]}"],
            )
        with conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (req.database,)).fetchone()
        if not exists:
            raise ApplicationError(
                f"database {req.database!r} does not exist on {self.server.host}:"
                f"{self.server.port}; nothing was changed",
                type=ErrorKind.UnknownDatabase,
                non_retryable=True,
            )
        return self._inspect(self.server, req.database)

    def _inspect(self, server: PgServer, database: str) -> Assessment:
        findings: list[str] = []
        corrupted: set[str] = set()
        with server.connect(database) as conn:
            rows = conn.execute(USER_TABLES).fetchall()
            tables = [r[0] for r in rows]
            unlogged = [r[0] for r in rows if r[1]]
            amcheck = bool(conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'").fetchone())
        schema = server.tool(
            "pg_dump", *server.client_args(database), "--schema-only", "-f", "/dev/null", check=False, timeout=600
        )
        if schema.returncode != 0:
            findings.append(f"pg_dump --schema-only failed: {first_error(schema.stderr)}")
        if amcheck:
            _heartbeat("pg_amcheck")
            # The database as a positional connection string: pg_amcheck's -d takes a pattern, which
            # folds case and reads *, ? and . as wildcards and separators.
            check = server.tool(
                "pg_amcheck",
                *server.connection_args(),
                make_conninfo(dbname=database),
                "--heapallindexed",
                check=False,
                timeout=3600,
            )
            for header, detail in amcheck_reports(check.stdout + check.stderr):
                findings.append(f"{header} {detail}".strip())
                table = table_of(header, database, rows)
                if table:
                    corrupted.add(table)
            if check.returncode not in (0, 2):
                findings.append(f"pg_amcheck exited {check.returncode}: {first_error(check.stderr)}")
        for table in tables:  # the playbook's per-table dump: reads every heap page
            _heartbeat(f"pg_dump -t {table}")
            dump = server.tool(
                "pg_dump", *server.client_args(database), "-t", table, "-f", "/dev/null", check=False, timeout=3600
            )
            if dump.returncode != 0:
                corrupted.add(table)
                findings.append(f"pg_dump -t {table}: {first_error(dump.stderr)}")
        with server.connect(database) as conn:
            failures = conn.execute(
                "SELECT coalesce(checksum_failures, 0) FROM pg_stat_database WHERE datname = %s", (database,)
            ).fetchone()[0]
        if failures:
            findings.append(f"pg_stat_database.checksum_failures = {failures}")
        return Assessment(
            database=database,
            server_reachable=True,
            corrupted_tables=sorted(corrupted),
            findings=findings,
            checksum_failures=failures,
            amcheck_available=amcheck,
            unlogged_tables=unlogged,
        )

    # --- seal -----------------------------------------------------------------

    @activity.defn
    def seal_primary(self, req: SealRequest) -> SealResult:
        """Fence the damaged primary's writers, record what it holds, archive its last WAL, stop it.

        Fencing: every non-template database is closed to new connections
        (`ALLOW_CONNECTIONS false`) and every other client backend is terminated
        before the row counts, the last commit time and `pg_switch_wal()` are
        taken, so another writer cannot commit after the counts: the counts are
        final and every commit is in the WAL archived through `archived_through`.
        The seal marker (adapters.sealing) is written before the first change
        and keeps the databases it closed, so a retry, a later run or a person
        (`drp unseal`) can undo exactly that.

        Re-run safe: a sealed primary returns the recorded seal (also to a later
        incident's run: the archive must still reach what was recorded); a
        primary that was down and never sealed is recorded as found
        (`was_running=False`, its timeline from the control file).
        Raises ArchiveLagging (retryable) when the last segment is not archived in time.
        """
        data_dir = self.server.data_dir
        marker = read_seal(data_dir) or {}
        if not self.server.is_running():
            if marker.get("result"):
                return SealResult.model_validate(marker["result"]).model_copy(
                    update={"sealed_by": marker.get("incident_id")}
                )
            # An earlier attempt may have fenced it before it went down: keep what must be reopened.
            fenced = marker.get("fenced_databases", [])
            result = SealResult(
                was_running=False,
                timeline=self.server.control_timeline(),
                fenced_databases=fenced,
                disabled_subscriptions=marker.get("disabled_subscriptions", []),
                **self._stopped_wal(),
            )
            write_seal(
                data_dir,
                {
                    "incident_id": req.incident_id,
                    "sealed_at": _now(),
                    **marker,
                    "state": "found stopped",
                    "fenced_databases": fenced,
                    "result": result.model_dump(),
                },
            )
            return result
        try:
            ctl = self.server.connect("template1")
        except psycopg.OperationalError:
            self.server.stop()  # running but not answering: nothing more can be saved from it
            fenced = marker.get("fenced_databases", [])
            result = SealResult(
                was_running=True,
                timeline=self.server.control_timeline(),
                fenced_databases=fenced,
                disabled_subscriptions=marker.get("disabled_subscriptions", []),
                **self._stopped_wal(),
            )
            write_seal(
                data_dir,
                {
                    "incident_id": req.incident_id,
                    "sealed_at": _now(),
                    **marker,
                    "state": "stopped unanswering",
                    "fenced_databases": fenced,
                    "result": result.model_dump(),
                },
            )
            return result
        with ctl:
            ctl.execute("SET synchronous_commit = local")  # the fence must not wait for a standby that is gone
            if "fenced_databases" not in marker:  # first attempt: remember what was open before closing it
                fenced = [
                    r[0]
                    for r in ctl.execute(
                        "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1"
                    )
                ]
                marker = {
                    "incident_id": req.incident_id,
                    "state": "fencing",
                    "sealed_at": _now(),
                    "fenced_databases": fenced,
                }
                write_seal(data_dir, marker)
            fenced = marker["fenced_databases"]
            if "disabled_subscriptions" not in marker:  # apply workers are not client sessions: stop them too
                marker = {**marker, "disabled_subscriptions": _enabled_subscriptions(ctl)}
                write_seal(data_dir, marker)
            set_subscriptions(self.server, marker["disabled_subscriptions"], enable=False)
            allow_connections(ctl, fenced, False)
            terminate_others(ctl, keep=[], progress=_heartbeat)
            # Only this run inside the database it counts: open it for one connection, close it again.
            allow_connections(ctl, [req.database], True)
            conn = self.server.connect(req.database)
            allow_connections(ctl, [req.database], False)
            with conn:
                terminate_others(ctl, keep=[conn.info.backend_pid], progress=_heartbeat)
                counts, unlogged = row_counts(conn, skip=set(req.skip_tables))
                last_commit = conn.execute("SELECT timestamp FROM pg_last_committed_xact()").fetchone()
                timeline = int(conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0][:8], 16)
                end_lsn, segment = one(conn.execute("SELECT s::text, pg_walfile_name(s) FROM pg_switch_wal() s"))
                self._wait_archived(conn, segment)
        result = SealResult(
            was_running=True,
            archived_through=segment,
            end_lsn=end_lsn,
            row_counts=counts,
            last_commit_at=last_commit[0] if last_commit else None,
            timeline=timeline,
            fenced_databases=fenced,
            unlogged_tables=unlogged,
            disabled_subscriptions=marker["disabled_subscriptions"],
        )
        write_seal(data_dir, {**marker, "state": "sealed", "result": result.model_dump()})
        self.server.stop()
        return result

    @activity.defn
    def reopen_production(self, req: SealRequest) -> ProductionState:
        """Undo a seal that did not get as far as stopping production: reopen the databases it fenced and
        remove the marker. A stopped (sealed) primary is left as it is: it is the evidence, and
        `drp unseal` is a person's decision. Re-run safe."""
        marker = read_seal(self.server.data_dir)
        running = self.server.is_running()
        if not running:
            who = marker.get("incident_id") if marker else None
            return ProductionState(
                running=False,
                detail=(
                    f"production is stopped and sealed by incident {who}; `drp unseal` starts it again as it was"
                    if marker
                    else "production is stopped"
                ),
            )
        if marker is None:
            return ProductionState(running=True, detail="production keeps running; it was not fenced")
        set_allow_connections(self.server, marker.get("fenced_databases", []), allow=True)
        subscriptions = marker.get("disabled_subscriptions", [])
        set_subscriptions(self.server, subscriptions, enable=True)
        marker_path(self.server.data_dir).unlink(missing_ok=True)
        return ProductionState(
            running=True,
            detail="production keeps running; the databases the seal closed are open again"
            + (
                f" and the subscriptions it disabled ({', '.join(subscriptions)}) enabled again"
                if subscriptions
                else ""
            ),
        )

    @activity.defn
    def archive_current_wal(self, req: AssessRequest) -> str:
        """Close the current WAL segment and wait until it is in the archive: a point-in-time
        recovery to a moment that just passed needs that WAL. Returns the segment name."""
        with self.server.connect(req.database) as conn:
            segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
            self._wait_archived(conn, segment)
        return segment

    def _stopped_wal(self) -> dict:
        """What a primary found stopped still holds in its own pg_wal: where its WAL ends (pg_waldump from
        its last checkpoint's REDO point to the first invalid record, as crash recovery would read it),
        the complete segments it never archived (`.ready`), and that pg_wal for the replay to read.
        Read-only. When it cannot be read, `wal_end_unknown` says why."""
        wal = self.server.data_dir / "pg_wal"
        try:
            ready = sorted(
                p.name.removesuffix(".ready")
                for p in (wal / "archive_status").glob("*.ready")
                if _WAL_OR_HISTORY.fullmatch(p.name.removesuffix(".ready"))
            )
        except OSError as err:
            return {"wal_end_unknown": f"{wal} cannot be read: {err}"}
        control = self.server.control_data()
        redo, timeline = control.get("Latest checkpoint's REDO location"), control.get("Latest checkpoint's TimeLineID")
        if not redo or not timeline:
            return {"unarchived_wal": ready, "wal_end_unknown": f"no readable control file in {self.server.data_dir}"}
        dump = self.server.tool(
            "pg_waldump", "--quiet", "-p", str(wal), "-t", timeline, "-s", redo, check=False, timeout=1800
        )
        end = waldump_end(dump.stderr, int(control.get("Bytes per WAL segment") or 16 * 1024 * 1024))
        if end is None:
            return {
                "unarchived_wal": ready,
                "wal_end_unknown": f"pg_waldump could not find the end of {wal}: {dump.stderr.strip()[-300:]}",
            }
        return {"end_lsn": end, "local_wal_dir": str(wal), "unarchived_wal": ready}

    def _wait_archived(self, conn: psycopg.Connection, segment: str) -> None:
        deadline = time.monotonic() + self.archive_wait_seconds
        while True:
            last, failed = one(conn.execute("SELECT last_archived_wal, last_failed_wal FROM pg_stat_archiver"))
            if last and last[:24] >= segment:  # same timeline: names sort by position
                return
            if time.monotonic() > deadline:
                raise ApplicationError(
                    f"WAL segment {segment} not archived after {self.archive_wait_seconds:.0f}s "
                    f"(last archived {last}, last failed {failed}); check archive_command",
                    type=ErrorKind.ArchiveLagging,
                )
            _heartbeat(f"waiting for {segment} to be archived")
            time.sleep(0.5)

    # --- verify ---------------------------------------------------------------

    @activity.defn
    def verify_restored(self, req: VerifyRequest) -> VerifyResult:
        """Check a restored server before it replaces production; raise if anything is off."""
        server = self.server.at(self.server.data_dir, port=req.port)
        problems: list[str] = []
        with server.connect(req.database) as conn:
            if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                problems.append("server is still in recovery")
            counts, unlogged = row_counts(conn)
        assessment = self._inspect(server, req.database)
        problems += assessment.findings
        for table, want in {**req.baseline_row_counts, **req.expected_row_counts}.items():
            if qualified(table) in unlogged:
                continue  # by design empty after a restore: reported, not compared
            got = counts.get(qualified(table))
            if got != want:
                problems.append(f"{table}: {got} rows restored, {want} expected")
        if problems:
            raise ApplicationError(
                "restored database failed verification; production is untouched and the "
                "restore is kept for inspection: " + "; ".join(problems),
                type=ErrorKind.VerificationFailed,
                non_retryable=True,
            )
        try:
            with server.connect(req.database, autocommit=False) as conn:
                conn.execute("CREATE TABLE drp_write_probe (id int)")  # proves the server takes writes
                conn.execute("INSERT INTO drp_write_probe VALUES (1)")
                conn.rollback()  # and leaves nothing behind
        except psycopg.Error as err:
            raise ApplicationError(
                f"restored server refuses writes: {err}", type=ErrorKind.VerificationFailed, non_retryable=True
            ) from err
        checks = [
            "not in recovery",
            "pg_dump --schema-only",
            "pg_dump of every table",
            "no checksum failures",
            "accepts writes",
        ]
        if assessment.amcheck_available:
            checks.insert(1, "pg_amcheck --heapallindexed")
        if req.baseline_row_counts or req.expected_row_counts:
            checks.append("row counts match")
        return VerifyResult(row_counts=counts, checks=checks, unlogged_tables=unlogged)


def _enabled_subscriptions(conn: psycopg.Connection) -> list[str]:
    """'database/subscription' of every enabled logical-replication subscription of the cluster."""
    return [
        f"{db}/{name}"
        for db, name in conn.execute(
            "SELECT d.datname, s.subname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
            "WHERE s.subenabled ORDER BY 1, 2"
        )
    ]


def _now() -> str:
    return datetime.now(UTC).isoformat()
