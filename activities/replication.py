"""ReplicationActivities: check a streaming standby, fence the old primary, promote.

The invariant is "never two writable primaries": the old primary is stopped
and left with a standby.signal (it comes back read-only if anyone starts it)
before the standby is promoted.
"""

import shutil
import subprocess
import time

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from temporalio import activity
from temporalio.exceptions import ApplicationError

from adapters.pgserver import PgServer, one, run_as
from adapters.replication import (
    REPLICA_DB,
    current_timeline,
    set_application_name,
    single_synchronous_name,
    standby_application_name,
    timeline_history,
    wal_position,
)
from adapters.timelines import diverged
from models.errors import ErrorKind
from models.failover import (
    Fenced,
    FenceRequest,
    LagCheck,
    Promoted,
    PromoteRequest,
    Rejoined,
    RejoinRequest,
    Role,
    StandbyStatus,
)


class ReplicationActivities:
    def __init__(self, primary: PgServer, standby: PgServer | None):
        self.primary = primary
        self._standby = standby

    @property
    def standby(self) -> PgServer:
        if self._standby is None:
            raise ApplicationError(
                "no standby is configured (settings: standby.port, standby.data_dir)",
                type=ErrorKind.NoStandby,
                non_retryable=True,
            )
        return self._standby

    def server(self, role: Role) -> PgServer:
        return self.primary if role == "primary" else self.standby

    def other(self, role: Role) -> PgServer:
        return self.standby if role == "primary" else self.primary

    @activity.defn
    def check_standby(self, req: LagCheck) -> StandbyStatus:
        """Is the replica replaying, how far behind its source, on which timeline; refuse a lagging one
        (StandbyLagging, unless `override`) and, always, one whose history diverged from its source's
        (StandbyDiverged: promoting it would drop every commit the source made after the fork)."""
        status = self._status(req.replica)
        if status.diverged:
            raise ApplicationError(
                f"the standby on {status.host}:{status.port} is on timeline {status.timeline} at {status.replay_lsn}, "
                f"a position that is not on the history of its source (timeline {status.source_timeline}, at "
                f"{status.primary_lsn or 'unknown'}): the standby diverged and can never follow it. Promoting "
                "it would lose every commit made since the fork, so this is refused even with override_lag. "
                "Rebuild it first (DatabaseFailback's rejoin, or a fresh pg_basebackup); nothing was changed.",
                type=ErrorKind.StandbyDiverged,
                non_retryable=True,
            )
        if status.in_recovery and self._too_far(status, req) and not req.override:
            raise ApplicationError(
                f"standby lags {status.lag_bytes} bytes / {status.lag_seconds}s (allowed {req.max_lag_bytes} bytes / "
                f"{req.max_lag_seconds}s); promoting it would lose those commits. Start again with "
                "override_lag=true if a person accepts that loss.",
                type=ErrorKind.StandbyLagging,
                non_retryable=True,
            )
        return status

    @activity.defn
    def await_catch_up(self, req: LagCheck) -> StandbyStatus:
        """Wait (heartbeating) until the replica is within the allowed lag of its source."""
        while True:
            status = self._status(req.replica)
            if status.in_recovery and status.lag_bytes is not None and not self._too_far(status, req):
                return status
            activity.heartbeat(f"{status.lag_bytes} bytes behind")
            time.sleep(0.2)

    @staticmethod
    def _too_far(status: StandbyStatus, req: LagCheck) -> bool:
        return (status.lag_bytes or 0) > req.max_lag_bytes or (status.lag_seconds or 0) > req.max_lag_seconds

    def _status(self, role: Role) -> StandbyStatus:
        replica, source = self.server(role), self.other(role)
        try:
            with replica.connect(REPLICA_DB) as conn:
                in_recovery, receive, replay = one(
                    conn.execute(
                        "SELECT pg_is_in_recovery(), pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text"
                    )
                )
                received_tli = conn.execute(
                    "SELECT received_tli FROM pg_stat_wal_receiver WHERE status = 'streaming'"
                ).fetchone()
                streaming = received_tli is not None
                # Streaming: the timeline it receives; otherwise its last restartpoint's.
                timeline = (
                    received_tli[0]
                    if streaming
                    else conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()[0]
                )
        except psycopg.OperationalError as err:
            raise ApplicationError(
                f"replica {replica.host}:{replica.port} unreachable: {str(err).strip().splitlines()[-1]}",
                type=ErrorKind.StandbyUnreachable,
            ) from err
        primary_lsn, lag_bytes, lag_seconds, synchronous, reachable = None, None, None, False, False
        try:
            with source.connect(timeout=3) as conn:
                reachable = True
                primary_lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
                lag_bytes = conn.execute(
                    "SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)::bigint", (primary_lsn, replay or "0/0")
                ).fetchone()[0]
                row = conn.execute(
                    "SELECT extract(epoch FROM coalesce(replay_lag, '0')), sync_state FROM pg_stat_replication LIMIT 1"
                ).fetchone()
                if row:
                    lag_seconds, synchronous = float(row[0]), row[1] == "sync"
        except psycopg.OperationalError:
            pass  # a dead primary is why we fail over; lag against it cannot be measured then
        source_timeline = current_timeline(source)
        # A fork: its position lies past where its source's history left its timeline, or (same timeline,
        # two histories: a standby's source started as a primary without promotion) ahead of the source.
        fork = bool(
            in_recovery
            and replay
            and (
                (lag_bytes is not None and lag_bytes < 0)
                or (
                    not streaming
                    and source_timeline
                    and diverged(timeline, replay, source_timeline, timeline_history(source, source_timeline))
                )
            )
        )
        return StandbyStatus(
            host=replica.host,
            port=replica.port,
            in_recovery=in_recovery,
            streaming=streaming,
            timeline=timeline,
            receive_lsn=receive,
            replay_lsn=replay,
            primary_reachable=reachable,
            primary_lsn=primary_lsn,
            lag_bytes=None if fork else lag_bytes,
            lag_seconds=lag_seconds,
            synchronous=synchronous,
            diverged=fork,
            source_timeline=source_timeline,
        )

    @activity.defn
    def fence_primary(self, req: FenceRequest) -> Fenced:
        """Stop the old primary and leave a standby.signal, so it can never take writes again unasked.

        A fast shutdown lets the walsender hand the standby every WAL record up to
        the shutdown checkpoint first. Re-run safe: a stopped, fenced primary is left so.
        """
        old = self.server(req.server)
        was_running = old.is_running()
        old.stop(mode="fast")
        subprocess.run(run_as(old.os_user, ["touch", str(old.data_dir / "standby.signal")]), check=True)
        control = old.control_data()
        # Only a clean shutdown's checkpoint is the last thing the primary wrote; after a crash it is not.
        clean = control.get("Database cluster state") == "shut down"
        return Fenced(
            was_running=was_running, final_lsn=control.get("Latest checkpoint location") or None if clean else None
        )

    @activity.defn
    def promote_standby(self, req: PromoteRequest) -> Promoted:
        """Let the standby take in the fenced primary's last WAL, then pg_promote() it (re-run safe).

        With the old primary's final position known, the standby gets
        `catch_up_seconds` to receive it; what it still lacks then is the data lost.
        """
        with self.server(req.server).connect(REPLICA_DB) as conn:
            if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                return Promoted(
                    already_primary=True,
                    lost_bytes=None,
                    **wal_position(conn),
                    synchronous_paused=req.synchronous_standby_names or None,
                )
            lost = self._wait_for_wal(conn, req.final_lsn, req.catch_up_seconds) if req.final_lsn else None
            paused = _pause_synchronous(conn, req.synchronous_standby_names)
            if not conn.execute("SELECT pg_promote(wait => true, wait_seconds => 60)").fetchone()[0]:
                raise ApplicationError("pg_promote did not finish within 60s", type=ErrorKind.PromoteSlow)
            return Promoted(lost_bytes=lost, synchronous_paused=paused, **wal_position(conn))

    def _wait_for_wal(self, conn: psycopg.Connection, final_lsn: str, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        while True:
            missing = conn.execute(
                "SELECT greatest(pg_wal_lsn_diff(%s::pg_lsn, pg_last_wal_replay_lsn()), 0)::bigint", (final_lsn,)
            ).fetchone()[0]
            if missing == 0 or time.monotonic() > deadline:
                return missing
            activity.heartbeat(f"standby {missing} bytes behind the fenced primary")
            time.sleep(0.1)

    @activity.defn
    def rejoin_as_standby(self, req: RejoinRequest) -> Rejoined:
        """Make `req.server` a streaming standby of `source`.

        `method="rewind"`: pg_rewind -R (crash recovery first if needed); if it
        fails, or the rewound server does not come up streaming, a fresh base
        backup instead. `method="basebackup"`: straight to the base backup, the
        way after a restore (the restored primary lacks the WAL before its fork
        that a rewind would need). A base backup goes into a scratch directory
        and the old directory is moved aside, never deleted. Re-run safe: a
        standby already streaming from the source on its timeline is left as it
        is. Raises RejoinFailed (retryable) when it does not stream in 5 minutes.
        """
        server, source = self.server(req.server), self.server(req.source)
        aside = server.data_dir.with_name(f"{server.data_dir.name}.before-rejoin-{req.incident_id}")
        own = _own_synchronous_names(server, req.incident_id)
        if server.is_running():
            if self._follows(server, source):
                return Rejoined(
                    method="already following",
                    synchronous_standby_names=own,
                    synchronous=_restore_synchronous(source, req.restore_synchronous_standby_names),
                )
            _refuse_a_primary(server)
            server.stop(mode="fast")
        elif server.data_dir.exists() and not any(
            (server.data_dir / f).exists() for f in ("standby.signal", "recovery.signal")
        ):
            raise ApplicationError(
                f"{server.data_dir} is a stopped primary (no standby.signal): it may hold commits "
                "nobody else has; it was not touched. Compare it with the current primary first",
                type=ErrorKind.StandbyPromoted,
                non_retryable=True,
            )
        # The name synchronous_standby_names knows it by: a rebuilt standby must stream under the same one.
        name = (
            standby_application_name(server.data_dir)
            or standby_application_name(aside)
            or single_synchronous_name(source)
        )
        if req.method == "rewind":
            subprocess.run(run_as(server.os_user, ["rm", "-f", str(server.data_dir / "standby.signal")]), check=True)
            conninfo = make_conninfo(host=source.host, port=source.port, user=source.superuser, dbname="postgres")
            rewind = server.tool(
                "pg_rewind",
                f"--target-pgdata={server.data_dir}",
                f"--source-server={conninfo}",
                "--write-recovery-conf",
                check=False,
                timeout=3600,
            )
            if rewind.returncode == 0:
                if name:
                    set_application_name(server, name)
                server.start(wait=False)
                if self._await_streaming(server, source):
                    return Rejoined(
                        method="pg_rewind",
                        synchronous_standby_names=own,
                        synchronous=_restore_synchronous(source, req.restore_synchronous_standby_names),
                    )
                server.stop(mode="immediate")
                activity.logger.warning(
                    "the rewound server did not stream, rebuilding from a base backup:%s", server.log_tail(5)
                )
            else:
                activity.logger.warning("pg_rewind failed, rebuilding from a base backup: %s", rewind.stderr[-500:])
        if server.data_dir.exists() and not aside.exists():
            server.data_dir.rename(aside)
        if not server.data_dir.exists():
            # Into a scratch directory first: a copy cut short by a crash is ours to discard.
            scratch = server.data_dir.with_name(f"{server.data_dir.name}.rejoin-{req.incident_id}")
            if scratch.exists():
                shutil.rmtree(scratch)
            source.create_standby(scratch, name or "drp_rejoined")
            scratch.rename(server.data_dir)
        server.start(wait=False)
        if not self._await_streaming(server, source):
            raise ApplicationError(
                f"{server.data_dir} did not start streaming from {source.port}" + server.log_tail(),
                type=ErrorKind.RejoinFailed,
            )
        return Rejoined(
            method="pg_basebackup",
            moved_aside=str(aside) if aside.exists() else None,
            synchronous_standby_names=own,
            synchronous=_restore_synchronous(source, req.restore_synchronous_standby_names),
        )

    def _await_streaming(self, server: PgServer, source: PgServer, timeout: float = 300) -> bool:
        """Wait until `server` streams from `source`; False when it stopped (it failed to start) or the time ran out."""
        deadline = time.monotonic() + timeout
        while not self._follows(server, source):
            if time.monotonic() > deadline or not server.is_running():
                return False
            activity.heartbeat("waiting for streaming")
            time.sleep(0.2)
        return True

    def _follows(self, server: PgServer, source: PgServer) -> bool:
        """In recovery, streaming from `source`'s port, on `source`'s current timeline."""
        try:
            with server.connect(REPLICA_DB, timeout=2) as conn:
                row = conn.execute(
                    "SELECT pg_is_in_recovery(), (SELECT sender_port FROM pg_stat_wal_receiver "
                    "WHERE status = 'streaming'), (SELECT received_tli FROM pg_stat_wal_receiver "
                    "WHERE status = 'streaming')"
                ).fetchone()
        except psycopg.OperationalError:
            return False
        return bool(row[0]) and row[1] == source.port and row[2] == current_timeline(source)


def _refuse_a_primary(server: PgServer) -> None:
    """A server meant to become a standby that answers as a primary was promoted by someone: it may hold
    acknowledged commits nobody else has. Never rewind or rebuild it (StandbyPromoted, non-retryable)."""
    try:
        with server.connect(REPLICA_DB, timeout=3) as conn:
            primary = not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
    except psycopg.OperationalError:
        return
    if primary:
        raise ApplicationError(
            f"{server.data_dir} on port {server.port} is a primary (it was promoted): it may hold "
            "commits nobody else has, so it was not touched. Two primaries are running: decide "
            "which one serves before rebuilding the other",
            type=ErrorKind.StandbyPromoted,
            non_retryable=True,
        )


def _pause_synchronous(conn: psycopg.Connection, wanted: str | None) -> str | None:
    """Before a standby is promoted: it has no standby of its own yet, so a synchronous_standby_names it
    carries (its own, or one pg_rewind copied from the primary it followed) would hold every commit,
    the runbook's write check included, until a standby confirms. Like Patroni on promotion (non-strict
    synchronous mode), turn it off (ALTER SYSTEM, reload) and return the value to restore once a standby
    streams: `wanted` (the server's own setting from before a rejoin replaced it), else the current one."""
    current = conn.execute("SHOW synchronous_standby_names").fetchone()[0].strip()
    if current:
        conn.execute("ALTER SYSTEM SET synchronous_standby_names = ''")
        conn.execute("SELECT pg_reload_conf()")
    return (wanted or "").strip() or current or None


def _restore_synchronous(source: PgServer, value: str | None, timeout: float = 60) -> str | None:
    """Set synchronous_standby_names on `source` to `value` now that a standby streams, and keep it only if
    a standby confirms synchronously within `timeout` (else every commit would wait): the outcome in words."""
    if not value:
        return None
    with source.connect() as conn:
        conn.execute(sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(sql.Literal(value)))
        conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + timeout
        while True:
            rows = conn.execute("SELECT application_name, sync_state FROM pg_stat_replication").fetchall()
            synchronous = [name for name, state in rows if state in ("sync", "quorum")]
            if synchronous:
                return (
                    f"synchronous_standby_names = '{value}' restored on the primary: "
                    f"{', '.join(synchronous)} confirms commits synchronously"
                )
            if time.monotonic() > deadline:
                conn.execute("ALTER SYSTEM SET synchronous_standby_names = ''")
                conn.execute("SELECT pg_reload_conf()")
                streaming = ", ".join(f"{n} ({s})" for n, s in rows) or "none"
                return (
                    f"synchronous_standby_names = '{value}' NOT restored: no standby matched it within "
                    f"{timeout:.0f}s (streaming: {streaming}); the primary commits asynchronously until a person "
                    "sets it"
                )
            if activity.in_activity():
                activity.heartbeat("waiting for a synchronous standby")
            time.sleep(0.2)


def _own_synchronous_names(server: PgServer, incident_id: str) -> str | None:
    """`server`'s own synchronous_standby_names as its configuration files say (postgres -C, running or not),
    recorded beside it before a rejoin replaces them (pg_rewind and pg_basebackup copy the source's), so a
    retried rejoin still knows it. None when there is no data directory to read."""
    record = server.data_dir.with_name(f"{server.data_dir.name}.synchronous-{incident_id}")
    try:
        return record.read_text().strip() or None
    except OSError:
        pass
    if not (server.data_dir / "PG_VERSION").exists():
        return None
    shown = server.tool("postgres", "-C", "synchronous_standby_names", "-D", str(server.data_dir), check=False)
    if shown.returncode != 0:
        return None
    value = shown.stdout.strip()
    record.write_text(value)
    return value or None
