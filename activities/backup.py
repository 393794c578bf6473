"""BackupActivities: restore from S3 into a fresh directory, replay WAL, swap in.

Nothing here deletes the damaged data directory: it is renamed aside, and the
restore lands beside it and replaces it only after verification. Long steps
run as child processes whose state is kept on disk next to the restore, so
an activity retried after a worker crash adopts the running child (or its
result) instead of starting the work again.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.barman import BarmanCloud
from activities.pgserver import PgServer, run_as
from activities.processes import free_port, pid_alive
from models.postgres import (
    BackupRequest,
    BackupResult,
    ReplayRequest,
    ReplayResult,
    RestoreRequest,
    RestoreResult,
    SwapRequest,
    SwapResult,
    TeardownRequest,
)

RECOVERY_BEGIN = "# --- drp recovery: begin ---"
RECOVERY_END = "# --- drp recovery: end ---"


def _heartbeat(*details) -> None:
    if activity.in_activity():
        activity.heartbeat(*details)


def restore_dir_for(data_dir: Path, incident_id: str, purpose: str = "restore") -> Path:
    return data_dir.with_name(f"{data_dir.name}.{purpose}-{incident_id}")


def damaged_dir_for(data_dir: Path, incident_id: str) -> Path:
    return data_dir.with_name(f"{data_dir.name}.damaged-{incident_id}")


class RestoreJob:
    """On-disk record of one barman-cloud-restore child: which backup, which PID, how it ended.

    The record is written before the child starts and the child's shell writes
    its own PID and exit code, so no crash of the worker, at any moment, leaves
    a restore running that a retry does not know about.
    """

    def __init__(self, restore_dir: Path):
        self.restore_dir = restore_dir
        self.job_file = restore_dir.with_name(restore_dir.name + ".job.json")
        self.pid_file = restore_dir.with_name(restore_dir.name + ".pid")
        self.exit_file = restore_dir.with_name(restore_dir.name + ".exit")
        self.log_file = restore_dir.with_name(restore_dir.name + ".restore.log")

    def load(self) -> dict | None:
        try:
            return json.loads(self.job_file.read_text())
        except (OSError, ValueError):
            return None

    def exit_code(self) -> int | None:
        try:
            return int(self.exit_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def running_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if not pid_alive(pid):
            return None
        try:  # guard against PID reuse: the process must be ours
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return None
        return pid if str(self.restore_dir) in cmdline else None


class BackupActivities:
    def __init__(self, server: PgServer, barman: BarmanCloud, poll_seconds: float = 0.1):
        self.server = server
        self.barman = barman
        self.poll_seconds = poll_seconds

    # --- restore --------------------------------------------------------------

    @activity.defn
    def restore_base_backup(self, req: RestoreRequest) -> RestoreResult:
        """Restore a base backup (the newest unless named) into <data_dir>.<purpose>-<incident>.

        Re-run safe: a finished restore is returned as is, a restore still running
        from a crashed attempt is waited for, and only a failed one is redone.
        """
        restore_dir = restore_dir_for(self.server.data_dir, req.incident_id, req.purpose)
        job = RestoreJob(restore_dir)
        while True:
            record = job.load()
            if record and job.exit_code() == 0:
                self._prepare_data_dir(job.restore_dir)
                return RestoreResult(restore_dir=str(restore_dir), backup_id=record["backup_id"],
                                     launches=record["launches"])
            if record and job.running_pid():
                self._wait_for(job, record)
                continue
            self._launch(job, record, req.backup_id)

    def _launch(self, job: RestoreJob, previous: dict | None, backup_id: str | None) -> None:
        if previous and job.restore_dir.exists():
            self._remove_partial(job.restore_dir)  # a failed or killed copy: S3 still holds the backup
        backups = self.barman.list_backups()
        if not backups:
            raise ApplicationError(f"no completed base backup in {self.barman.destination} for server "
                                   f"{self.barman.server_name!r}; nothing was changed", type="NoBackup",
                                   non_retryable=True)
        if backup_id and backup_id not in {b["backup_id"] for b in backups}:
            raise ApplicationError(f"backup {backup_id} is not in {self.barman.destination}", type="NoBackup",
                                   non_retryable=True)
        record = {"backup_id": previous["backup_id"] if previous else backup_id or backups[-1]["backup_id"],
                  "launches": (previous or {}).get("launches", 0) + 1,
                  "started_at": datetime.now(timezone.utc).isoformat()}
        for stale in (job.exit_file, job.pid_file):
            stale.unlink(missing_ok=True)
        job.job_file.write_text(json.dumps(record))
        # The shell records its PID and the exit code itself: both survive this worker's death.
        script = 'pidf=$1 exitf=$2; shift 2; echo $$ > "$pidf"; rc=0; "$@" || rc=$?; echo $rc > "$exitf"'
        argv = run_as(self.server.os_user, [
            "sh", "-c", script, "restore", str(job.pid_file), str(job.exit_file),
            *self.barman.restore_argv(record["backup_id"], job.restore_dir),
        ])
        with open(job.log_file, "ab") as log:
            proc = subprocess.Popen(argv, env=self.barman.env(), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        while True:
            try:
                proc.wait(timeout=self.poll_seconds)
                break
            except subprocess.TimeoutExpired:
                _heartbeat({"phase": "restoring", **record})
        self._finish(job, record)

    def _wait_for(self, job: RestoreJob, record: dict) -> None:
        """Adopt a restore started by an earlier attempt of this activity."""
        activity.logger.info("adopting the restore of %s started by an earlier attempt", record["backup_id"])
        while job.running_pid():
            _heartbeat({"phase": "restoring (adopted)", **record})
            time.sleep(self.poll_seconds)
        self._finish(job, record)

    def _finish(self, job: RestoreJob, record: dict) -> None:
        code = job.exit_code()
        if code == 0:
            return
        tail = job.log_file.read_text(errors="replace")[-1500:] if job.log_file.exists() else ""
        raise ApplicationError(f"barman-cloud-restore of {record['backup_id']} exited {code}: {tail}",
                               type="RestoreFailed")

    def _prepare_data_dir(self, restore_dir: Path) -> None:
        """What barman-cloud-restore leaves to us: an empty pg_wal and mode 700 (idempotent)."""
        (restore_dir / "pg_wal").mkdir(exist_ok=True)
        subprocess.run(run_as(self.server.os_user, ["chmod", "700", str(restore_dir)]), check=True)
        if self.server.os_user and os.geteuid() == 0:
            subprocess.run(["chown", f"{self.server.os_user}:", str(restore_dir / "pg_wal")], check=True)

    def _remove_partial(self, restore_dir: Path) -> None:
        shutil.rmtree(restore_dir)

    # --- replay -----------------------------------------------------------------

    @activity.defn
    def replay_wal(self, req: ReplayRequest) -> ReplayResult:
        """Start the restore on a spare port and replay archived WAL to its end, then promote.

        Re-run safe: a server already replaying on that directory is watched, not restarted.
        """
        restore_dir = Path(req.restore_dir)
        server = self.server.at(restore_dir, port=self.server.at(restore_dir).running_port() or free_port())
        if not server.is_running():
            if not (restore_dir / "PG_VERSION").exists():
                raise ApplicationError(f"{restore_dir} holds no restored cluster; restore it first",
                                       type="NothingToReplay", non_retryable=True)
            self._write_recovery_config(restore_dir, req.target_xid)
            server.start(wait=False)
        while True:
            if not server.is_running():
                raise ApplicationError("recovery stopped before it was done; see the server log:"
                                       + server.log_tail(), type="ReplayFailed", non_retryable=True)
            state = _recovery_state(server)
            if state and req.target_xid is not None and state.get("paused"):
                return ReplayResult(port=server.port, timeline=0, end_lsn=state["lsn"])
            if state and not state["in_recovery"]:
                _check_reached(state["segment"], req.must_reach_segment)
                return ReplayResult(port=server.port, timeline=state["timeline"], end_lsn=state["lsn"],
                                    last_commit_at=state["last_commit_at"])
            _heartbeat({"phase": "replaying", "port": server.port, **(state or {"lsn": "starting"})})
            time.sleep(self.poll_seconds)

    def _write_recovery_config(self, restore_dir: Path, target_xid: int | None) -> None:
        auto = restore_dir / "postgresql.auto.conf"
        current = auto.read_text() if auto.exists() else ""
        if RECOVERY_BEGIN not in current:
            restore_command = self.barman.restore_command().replace("'", "''")
            if target_xid is None:  # to the end of the archive, then become the new primary
                target = "recovery_target_action = 'promote'\n"
            else:  # a side instance: just before the bad transaction, paused, read-only, archiving nothing
                target = (f"recovery_target_xid = '{target_xid % 2**32}'\nrecovery_target_inclusive = off\n"
                          "recovery_target_action = 'pause'\narchive_mode = off\n")
            block = (f"\n{RECOVERY_BEGIN}\nrestore_command = '{restore_command}'\n"
                     f"recovery_target_timeline = 'latest'\n{target}{RECOVERY_END}\n")
            _write_as(self.server.os_user, auto, current + block)
        _write_as(self.server.os_user, restore_dir / "recovery.signal", "")

    # --- swap -------------------------------------------------------------------

    @activity.defn
    def swap_in_restored(self, req: SwapRequest) -> SwapResult:
        """Move the damaged directory aside, put the verified restore in its place, start it.

        Re-run safe: each rename happens only if it has not happened yet.
        """
        data_dir = self.server.data_dir
        restore_dir = Path(req.restore_dir)
        damaged = damaged_dir_for(data_dir, req.incident_id)
        if restore_dir.exists():
            self.server.at(restore_dir).stop()
            self._strip_recovery_config(restore_dir)
            if data_dir.exists() and not damaged.exists():
                if self.server.is_running():
                    raise ApplicationError(f"a server still runs on {data_dir}; seal the primary first",
                                           type="PrimaryRunning", non_retryable=True)
                data_dir.rename(damaged)
            if data_dir.exists():
                raise ApplicationError(f"both {data_dir} and {damaged} exist; refusing to overwrite either",
                                       type="SwapConflict", non_retryable=True)
            restore_dir.rename(data_dir)
        self.server.start()
        self.server.wait_ready()
        return SwapResult(data_dir=str(data_dir), damaged_dir=str(damaged))

    def _strip_recovery_config(self, restore_dir: Path) -> None:
        auto = restore_dir / "postgresql.auto.conf"
        text = auto.read_text() if auto.exists() else ""
        if RECOVERY_BEGIN in text:
            head, rest = text.split(RECOVERY_BEGIN, 1)
            _write_as(self.server.os_user, auto, head.rstrip("\n") + "\n" + rest.split(RECOVERY_END, 1)[-1].lstrip("\n"))

    # --- side instance teardown ---------------------------------------------------

    @activity.defn
    def remove_side_instance(self, req: TeardownRequest) -> None:
        """Stop a side instance and delete it with its bookkeeping files.

        Only `side` copies are ever deleted: they are scratch copies of a backup
        that S3 still holds; the evidence taken from them is in S3 already.
        Re-run safe: whatever is already gone is skipped.
        """
        side = restore_dir_for(self.server.data_dir, req.incident_id, "side")
        job = RestoreJob(side)
        pid = job.running_pid()
        if pid:  # cancelled mid-restore: the child runs in its own session
            os.killpg(pid, signal.SIGKILL)
            while pid_alive(pid):
                time.sleep(0.05)
        self.server.at(side).stop(mode="immediate")
        if side.exists():
            shutil.rmtree(side)
        for leftover in (job.job_file, job.pid_file, job.exit_file, job.log_file, self.server.at(side).log_file):
            leftover.unlink(missing_ok=True)

    # --- backup -----------------------------------------------------------------

    @activity.defn
    def take_base_backup(self, req: BackupRequest) -> BackupResult:
        """A fresh base backup on the new timeline, so the next restore replays little WAL.

        Re-run safe: a backup that finished after this incident's swap is reused.
        """
        marker = self.server.data_dir.with_name(f"{self.server.data_dir.name}.backup-{req.incident_id}")
        if marker.exists():
            return BackupResult(backup_id=marker.read_text().strip())
        before = {b["backup_id"] for b in self.barman.list_backups()}
        argv = self.barman.backup_argv(self.server.host, self.server.port, self.server.superuser)
        proc = subprocess.Popen(argv, env={**self.barman.env(), "PGPASSWORD": self.server.password or ""},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while True:
            try:
                proc.wait(timeout=self.poll_seconds)
                break
            except subprocess.TimeoutExpired:
                _heartbeat({"phase": "backing up"})
        output = proc.stdout.read() if proc.stdout else ""
        if proc.returncode != 0:
            raise ApplicationError(f"barman-cloud-backup exited {proc.returncode}: {output[-1500:]}",
                                   type="BackupFailed")
        new = [b["backup_id"] for b in self.barman.list_backups() if b["backup_id"] not in before]
        backup_id = new[-1] if new else "unknown"
        marker.write_text(backup_id)
        return BackupResult(backup_id=backup_id)


def _recovery_state(server: PgServer) -> dict | None:
    try:
        with server.connect(timeout=2) as conn:
            in_recovery = conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
            if in_recovery:
                lsn, paused = conn.execute("SELECT pg_last_wal_replay_lsn()::text, "
                                           "pg_get_wal_replay_pause_state() = 'paused'").fetchone()
                return {"in_recovery": True, "lsn": lsn, "paused": paused}
            segment, lsn = conn.execute(
                "SELECT pg_walfile_name(pg_current_wal_lsn()), pg_current_wal_lsn()::text").fetchone()
            timeline = int(segment[:8], 16)
            last = conn.execute("SELECT timestamp FROM pg_last_committed_xact()").fetchone()
            return {"in_recovery": False, "timeline": timeline, "lsn": lsn, "segment": segment,
                    "last_commit_at": last[0] if last else None}
    except psycopg.OperationalError:
        return None  # still starting up, or not yet consistent


def _check_reached(current_segment: str, required: str | None) -> None:
    """Refuse a recovery that ended before the last segment the old primary archived.

    PostgreSQL ends recovery at the first WAL file restore_command cannot
    fetch, so an S3 outage mid-replay looks like the end of the archive. The
    position (the last 16 hex digits, timeline aside) tells the two apart.
    """
    if required and current_segment[8:] < required[8:]:
        raise ApplicationError(
            f"recovery ended in segment {current_segment[8:]} but the old primary archived up to {required}; "
            "WAL is missing or was unreachable. The restore is kept; production is untouched.",
            type="ReplayIncomplete", non_retryable=True)


def _write_as(os_user: str | None, path: Path, text: str) -> None:
    """Write a file inside a data directory so that the server's OS user owns it."""
    subprocess.run(run_as(os_user, ["sh", "-c", 'cat > "$0"', str(path)]), input=text.encode(), check=True)
