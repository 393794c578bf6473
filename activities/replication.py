"""ReplicationActivities: check a streaming standby, fence the old primary, promote.

The invariant is "never two writable primaries": the old primary is stopped
and left with a standby.signal (it comes back read-only if anyone starts it)
before the standby is promoted.
"""

import subprocess
import time

import psycopg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.pgserver import PgServer, run_as
from models.failover import Fenced, FenceRequest, LagCheck, Promoted, PromoteRequest, StandbyStatus


class ReplicationActivities:
    def __init__(self, primary: PgServer, standby: PgServer | None):
        self.primary = primary
        self._standby = standby

    @property
    def standby(self) -> PgServer:
        if self._standby is None:
            raise ApplicationError("no standby is configured (settings: standby.port, standby.data_dir)",
                                   type="NoStandby", non_retryable=True)
        return self._standby

    @activity.defn
    def check_standby(self, req: LagCheck) -> StandbyStatus:
        """Is the standby replaying, how far behind, on which timeline; refuse a lagging one."""
        try:
            with self.standby.connect() as conn:
                in_recovery, receive, replay = conn.execute(
                    "SELECT pg_is_in_recovery(), pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text"
                ).fetchone()
                streaming = bool(conn.execute("SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'")
                                 .fetchone())
                timeline = conn.execute("SELECT timeline_id FROM pg_control_checkpoint()").fetchone()[0]
        except psycopg.OperationalError as err:
            raise ApplicationError(f"standby {self.standby.host}:{self.standby.port} unreachable: "
                                   f"{str(err).strip().splitlines()[-1]}", type="StandbyUnreachable") from err
        primary_lsn, lag_bytes, lag_seconds, synchronous, reachable = None, None, None, False, False
        try:
            with self.primary.connect(timeout=3) as conn:
                reachable = True
                primary_lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
                lag_bytes = conn.execute("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)::bigint",
                                         (primary_lsn, replay or "0/0")).fetchone()[0]
                row = conn.execute("SELECT extract(epoch FROM coalesce(replay_lag, '0')), sync_state "
                                   "FROM pg_stat_replication LIMIT 1").fetchone()
                if row:
                    lag_seconds, synchronous = float(row[0]), row[1] == "sync"
        except psycopg.OperationalError:
            pass  # a dead primary is why we fail over; lag against it cannot be measured then
        status = StandbyStatus(host=self.standby.host, port=self.standby.port, in_recovery=in_recovery,
                               streaming=streaming, timeline=timeline, receive_lsn=receive, replay_lsn=replay,
                               primary_reachable=reachable, primary_lsn=primary_lsn, lag_bytes=lag_bytes,
                               lag_seconds=lag_seconds, synchronous=synchronous)
        if not in_recovery:
            return status  # already promoted (a re-run after the promotion)
        too_far = (lag_bytes or 0) > req.max_lag_bytes or (lag_seconds or 0) > req.max_lag_seconds
        if too_far and not req.override:
            raise ApplicationError(
                f"standby lags {lag_bytes} bytes / {lag_seconds}s (allowed {req.max_lag_bytes} bytes / "
                f"{req.max_lag_seconds}s); promoting it would lose those commits. Start again with "
                "override_lag=true if a person accepts that loss.", type="StandbyLagging", non_retryable=True)
        return status

    @activity.defn
    def fence_primary(self, req: FenceRequest) -> Fenced:
        """Stop the old primary and leave a standby.signal, so it can never take writes again unasked.

        A fast shutdown lets the walsender hand the standby every WAL record up to
        the shutdown checkpoint first. Re-run safe: a stopped, fenced primary is left so.
        """
        data_dir = self.primary.data_dir
        was_running = self.primary.is_running()
        self.primary.stop(mode="fast")
        subprocess.run(run_as(self.primary.os_user, ["touch", str(data_dir / "standby.signal")]), check=True)
        control = dict(line.split(":", 1) for line in
                       self.primary.tool("pg_controldata", str(data_dir), check=False).stdout.splitlines() if ":" in line)
        # Only a clean shutdown's checkpoint is the last thing the primary wrote; after a crash it is not.
        clean = control.get("Database cluster state", "").strip() == "shut down"
        return Fenced(was_running=was_running,
                      final_lsn=control.get("Latest checkpoint location", "").strip() or None if clean else None)

    @activity.defn
    def promote_standby(self, req: PromoteRequest) -> Promoted:
        """Let the standby take in the fenced primary's last WAL, then pg_promote() it (re-run safe).

        With the old primary's final position known, the standby gets
        `catch_up_seconds` to receive it; what it still lacks then is the data lost.
        """
        with self.standby.connect() as conn:
            if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                return Promoted(already_primary=True, lost_bytes=None, **_position(conn))
            lost = self._wait_for_wal(conn, req.final_lsn, req.catch_up_seconds) if req.final_lsn else None
            if not conn.execute("SELECT pg_promote(wait => true, wait_seconds => 60)").fetchone()[0]:
                raise ApplicationError("pg_promote did not finish within 60s", type="PromoteSlow")
            return Promoted(lost_bytes=lost, **_position(conn))

    def _wait_for_wal(self, conn: psycopg.Connection, final_lsn: str, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        while True:
            missing = conn.execute("SELECT greatest(pg_wal_lsn_diff(%s::pg_lsn, pg_last_wal_replay_lsn()), 0)::bigint",
                                   (final_lsn,)).fetchone()[0]
            if missing == 0 or time.monotonic() > deadline:
                return missing
            activity.heartbeat(f"standby {missing} bytes behind the fenced primary")
            time.sleep(0.1)


def _position(conn: psycopg.Connection) -> dict:
    segment, lsn = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn()), pg_current_wal_lsn()::text").fetchone()
    return {"timeline": int(segment[:8], 16), "promoted_at_lsn": lsn}
