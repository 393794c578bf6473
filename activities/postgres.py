"""PostgresActivities: look at the database, seal it, and verify a restore.

Every check here reads, never writes, except `seal_primary`, which stops the
old server only after the last WAL it wrote is safe in the archive.
"""

import time

import psycopg
from psycopg import sql
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.pgserver import PgServer
from models.postgres import (
    Assessment,
    AssessRequest,
    SealRequest,
    SealResult,
    VerifyRequest,
    VerifyResult,
)

USER_TABLES = """
    SELECT format('%I.%I', schemaname, tablename) FROM pg_tables
    WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1
"""


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
            return Assessment(database=req.database, server_reachable=False,
                              findings=[f"server unreachable: {str(err).strip().splitlines()[-1]}"])
        with conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (req.database,)).fetchone()
        if not exists:
            raise ApplicationError(f"database {req.database!r} does not exist on {self.server.host}:"
                                   f"{self.server.port}; nothing was changed", type="UnknownDatabase",
                                   non_retryable=True)
        return self._inspect(self.server, req.database)

    def _inspect(self, server: PgServer, database: str) -> Assessment:
        findings: list[str] = []
        corrupted: set[str] = set()
        with server.connect(database) as conn:
            tables = [r[0] for r in conn.execute(USER_TABLES)]
            amcheck = bool(conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'").fetchone())
        schema = server.tool("pg_dump", *server.client_args(database), "--schema-only", "-f", "/dev/null",
                             check=False, timeout=600)
        if schema.returncode != 0:
            findings.append(f"pg_dump --schema-only failed: {_first_error(schema.stderr)}")
        if amcheck:
            _heartbeat("pg_amcheck")
            check = server.tool("pg_amcheck", *server.client_args(database), "--heapallindexed",
                                check=False, timeout=3600)
            for header, detail in _amcheck_reports(check.stdout + check.stderr):
                findings.append(f"{header} {detail}".strip())
                table = _table_of(header.split('"')[1] if '"' in header else "", tables)
                if table:
                    corrupted.add(table)
            if check.returncode not in (0, 2):
                findings.append(f"pg_amcheck exited {check.returncode}: {_first_error(check.stderr)}")
        for table in tables:  # the playbook's per-table dump: reads every heap page
            _heartbeat(f"pg_dump -t {table}")
            dump = server.tool("pg_dump", *server.client_args(database), "-t", table, "-f", "/dev/null",
                               check=False, timeout=3600)
            if dump.returncode != 0:
                corrupted.add(table)
                findings.append(f"pg_dump -t {table}: {_first_error(dump.stderr)}")
        with server.connect(database) as conn:
            failures = conn.execute("SELECT coalesce(checksum_failures, 0) FROM pg_stat_database "
                                    "WHERE datname = %s", (database,)).fetchone()[0]
        if failures:
            findings.append(f"pg_stat_database.checksum_failures = {failures}")
        return Assessment(database=database, server_reachable=True, corrupted_tables=sorted(corrupted),
                          findings=findings, checksum_failures=failures, amcheck_available=amcheck)

    # --- seal -----------------------------------------------------------------

    @activity.defn
    def seal_primary(self, req: SealRequest) -> SealResult:
        """Get the damaged primary's last WAL into the archive, record what it holds, stop it.

        Safe to re-run: what was recorded before the stop is returned again, and a
        server that was already down is left as it is (was_running=False).
        """
        record = self.server.data_dir.with_name(f"{self.server.data_dir.name}.seal-{req.incident_id}.json")
        if not self.server.is_running():  # stopped by us in an earlier attempt, or already down
            if record.exists():
                return SealResult.model_validate_json(record.read_text())
            return SealResult(was_running=False)
        try:
            conn = self.server.connect(req.database)
        except psycopg.OperationalError:
            self.server.stop()  # running but not answering: nothing more can be saved from it
            return SealResult(was_running=True)
        with conn:
            counts = _row_counts(conn, skip=set(req.skip_tables))
            last_commit = conn.execute("SELECT timestamp FROM pg_last_committed_xact()").fetchone()
            segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
            self._wait_archived(conn, segment)
        result = SealResult(was_running=True, archived_through=segment, row_counts=counts,
                            last_commit_at=last_commit[0] if last_commit else None)
        record.write_text(result.model_dump_json())  # a retry after the stop below still knows all this
        self.server.stop()
        return result

    @activity.defn
    def archive_current_wal(self, req: AssessRequest) -> str:
        """Close the current WAL segment and wait until it is in the archive: a point-in-time
        recovery to a moment that just passed needs that WAL. Returns the segment name."""
        with self.server.connect(req.database) as conn:
            segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
            self._wait_archived(conn, segment)
        return segment

    def _wait_archived(self, conn: psycopg.Connection, segment: str) -> None:
        deadline = time.monotonic() + self.archive_wait_seconds
        while True:
            last, failed = conn.execute("SELECT last_archived_wal, last_failed_wal FROM pg_stat_archiver").fetchone()
            if last and last[:24] >= segment:  # same timeline: names sort by position
                return
            if time.monotonic() > deadline:
                raise ApplicationError(f"WAL segment {segment} not archived after {self.archive_wait_seconds:.0f}s "
                                       f"(last archived {last}, last failed {failed}); check archive_command",
                                       type="ArchiveLagging")
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
            counts = _row_counts(conn)
        assessment = self._inspect(server, req.database)
        problems += assessment.findings
        for table, want in {**req.baseline_row_counts, **req.expected_row_counts}.items():
            got = counts.get(_qualified(table))
            if got != want:
                problems.append(f"{table}: {got} rows restored, {want} expected")
        if problems:
            raise ApplicationError("restored database failed verification; production is untouched and the "
                                   "restore is kept for inspection: " + "; ".join(problems),
                                   type="VerificationFailed", non_retryable=True)
        try:
            with server.connect(req.database, autocommit=False) as conn:
                conn.execute("CREATE TABLE drp_write_probe (id int)")  # proves the server takes writes
                conn.execute("INSERT INTO drp_write_probe VALUES (1)")
                conn.rollback()  # and leaves nothing behind
        except psycopg.Error as err:
            raise ApplicationError(f"restored server refuses writes: {err}", type="VerificationFailed",
                                   non_retryable=True) from err
        checks = ["not in recovery", "pg_dump --schema-only", "pg_dump of every table",
                  "no checksum failures", "accepts writes"]
        if assessment.amcheck_available:
            checks.insert(1, "pg_amcheck --heapallindexed")
        if req.baseline_row_counts or req.expected_row_counts:
            checks.append("row counts match")
        return VerifyResult(row_counts=counts, checks=checks)


def _row_counts(conn: psycopg.Connection, skip: set[str] = frozenset()) -> dict[str, int]:
    counts = {}
    for (table,) in conn.execute(USER_TABLES).fetchall():
        if table in skip or table.split(".", 1)[-1] in skip:
            continue
        schema, name = table.split(".", 1)
        try:
            with conn.transaction():
                counts[table] = conn.execute(
                    sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(name))
                ).fetchone()[0]
        except psycopg.Error:
            continue  # unreadable (corrupted) tables have no trustworthy count
    return counts


def _amcheck_reports(output: str) -> list[tuple[str, str]]:
    """pg_amcheck prints a header line per damaged relation and indented details below it."""
    reports: list[tuple[str, str]] = []
    for line in output.splitlines():
        if line.startswith(("heap table", "btree index")):
            reports.append((line.rstrip(":").strip(), ""))
        elif line.startswith((" ", "\t")) and reports and not reports[-1][1]:
            reports[-1] = (reports[-1][0], line.strip())
    return reports


def _qualified(table: str) -> str:
    return table if "." in table else f"public.{table}"


def _table_of(relation: str, tables: list[str]) -> str | None:
    """Map a relation named by pg_amcheck (db.schema.rel) to one of the user tables."""
    parts = relation.split(".")
    candidate = ".".join(parts[-2:]) if len(parts) >= 2 else relation
    return candidate if candidate in tables else None


def _first_error(stderr: str) -> str:
    for line in stderr.splitlines():
        if "error" in line.lower():
            return line.strip()
    return stderr.strip().splitlines()[0] if stderr.strip() else "(no output)"

