"""BackupActivities: restore from S3 into a fresh directory, replay WAL, swap in.

Nothing here deletes the damaged data directory: it is renamed aside, and the
restore lands beside it and replaces it only after verification. Long steps
run as child processes whose state is kept on disk next to the restore, so
an activity retried after a worker crash adopts the running child (or its
result) instead of starting the work again.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from temporalio import activity
from temporalio.exceptions import ApplicationError

from adapters.barman import ARCHIVE_UNREADABLE, BarmanCloud
from adapters.pgserver import PgServer, run_as
from adapters.processes import free_port, pid_alive
from adapters.recovery import (
    RECOVERY_BEGIN,
    RECOVERY_END,
    RestoreJob,
    check_reached,
    damaged_dir_for,
    recovery_end_of,
    recovery_state,
    restore_dir_for,
    swap_tablespace,
    write_as,
)
from adapters.sealing import marker_path, set_allow_connections, set_subscriptions
from adapters.timelines import (
    backup_on_history,
    history_file_name,
    parse_history,
)
from models.errors import ErrorKind
from models.postgres import (
    BackupRequest,
    BackupResult,
    ReplayRequest,
    ReplayResult,
    RestoreRequest,
    RestoreResult,
    SwapRequest,
    SwapResult,
    Tablespace,
    TeardownRequest,
    TimelineBranch,
)

# A complete WAL segment or a timeline history file (not .partial or .backup): what archive_command archives
# and a recovery needs.
_WAL_OR_HISTORY = re.compile(r"[0-9A-F]{24}|[0-9A-F]{8}\.history")


def _heartbeat(*details) -> None:
    if activity.in_activity():
        activity.heartbeat(*details)


class BackupActivities:
    def __init__(self, server: PgServer, barman: BarmanCloud, poll_seconds: float = 0.1):
        self.server = server
        self.barman = barman
        self.poll_seconds = poll_seconds

    # --- restore --------------------------------------------------------------

    @activity.defn
    def restore_base_backup(self, req: RestoreRequest) -> RestoreResult:
        """Restore a base backup into <data_dir>.<purpose>-<incident>: the newest completed one on
        production's timeline history (adapters.timelines), unless one is named.

        Production's timeline is `req.timeline`, else its control file's; its
        history comes from its own pg_wal, else from the archive. Re-run safe: a
        finished restore is returned as is, a restore still running from a crashed
        attempt is waited for, and only a failed one is redone.
        Raises NoBackup / NoBackupOnTimeline / TimelineHistoryMissing (non-retryable,
        nothing changed) and RestoreFailed (retryable).
        """
        restore_dir = restore_dir_for(self.server.data_dir, req.incident_id, req.purpose)
        job = RestoreJob(restore_dir)
        while True:
            record = job.load()
            if record and job.exit_code() == 0:
                self._prepare_data_dir(job.restore_dir)
                return RestoreResult(
                    restore_dir=str(restore_dir),
                    backup_id=record["backup_id"],
                    launches=record["launches"],
                    timeline=record.get("timeline"),
                    timeline_history=record.get("timeline_history", []),
                    tablespaces=record.get("tablespaces", []),
                )
            if record and job.running_pid():
                self._wait_for(job, record)
                continue
            self._launch(job, record or self._choose(req, restore_dir))

    def _choose(self, req: RestoreRequest, restore_dir: Path) -> dict:
        """The first launch's record: which backup, on which timeline (read-only; raises when none fits)."""
        timeline = req.timeline if req.timeline is not None else self.server.control_timeline()
        history = self._history(timeline) if timeline else []
        backups = self.barman.list_backups()
        if not backups:
            raise ApplicationError(
                f"no completed base backup in {self.barman.destination} for server "
                f"{self.barman.server_name!r}; nothing was changed",
                type=ErrorKind.NoBackup,
                non_retryable=True,
            )
        candidates = [b for b in backups if b["backup_id"] == req.backup_id] if req.backup_id else backups
        if not candidates:
            raise ApplicationError(
                f"backup {req.backup_id} is not in {self.barman.destination}",
                type=ErrorKind.NoBackup,
                non_retryable=True,
            )
        chosen = backup_on_history(candidates, timeline, history) if timeline else candidates[-1]
        if chosen is None:
            path = ", ".join(f"timeline {b.parent} until {b.switchpoint}" for b in history) or "no ancestors"
            found = ", ".join(
                f"{b['backup_id']} (timeline {b.get('timeline')}, ended {b.get('end_xlog')})" for b in candidates
            )
            raise ApplicationError(
                f"no completed base backup lies on production's timeline {timeline} ({path}); the archive has "
                f"{found}. Take a base backup of production, or name one with backup_id; nothing was changed",
                type=ErrorKind.NoBackupOnTimeline,
                non_retryable=True,
            )
        tablespaces = [
            Tablespace(
                name=name,
                oid=int(oid),
                location=location,
                restored_to=f"{location.rstrip('/')}{restore_dir.name.removeprefix(self.server.data_dir.name)}",
            )
            for name, oid, location in chosen.get("tablespaces") or []
        ]
        self._check_tablespaces(chosen, tablespaces)
        return {
            "backup_id": chosen["backup_id"],
            "launches": 0,
            "timeline": timeline,
            "timeline_history": [b.model_dump() for b in history],
            "tablespaces": [t.model_dump() for t in tablespaces],
        }

    def _check_tablespaces(self, backup: dict, tablespaces: list[Tablespace]) -> None:
        """Refuse a backup that lacks one of production's tablespaces: WAL replay would create it at
        production's own location, over production's files (NoBackupOnTimeline names what to do)."""
        try:
            production = {int(p.name) for p in (self.server.data_dir / "pg_tblspc").iterdir() if p.name.isdigit()}
        except OSError:
            return  # production's directory is gone or unreadable: the backup's list is all there is
        missing = production - {t.oid for t in tablespaces}
        if missing:
            raise ApplicationError(
                f"backup {backup['backup_id']} was taken before tablespace(s) with OID {sorted(missing)} existed: "
                "replaying their creation would write into production's tablespace directories. Take a new base "
                "backup (barman-cloud-backup) and run again; nothing was changed",
                type=ErrorKind.TablespaceNotInBackup,
                non_retryable=True,
            )

    def _history(self, timeline: int) -> list[TimelineBranch]:
        """Production's timeline history: from its own pg_wal, else from the archive; [] for timeline 1."""
        if timeline <= 1:
            return []
        name = history_file_name(timeline)
        try:
            return parse_history((self.server.data_dir / "pg_wal" / name).read_text())
        except OSError:
            pass
        with tempfile.TemporaryDirectory() as tmp:
            try:
                found = self.barman.fetch_wal_file(name, Path(tmp) / name)
            except RuntimeError as err:
                raise ApplicationError(
                    f"cannot read {name} from the archive: {err}", type=ErrorKind.ArchiveUnreachable
                ) from err
            if not found:
                raise ApplicationError(
                    f"production is on timeline {timeline}, but {name} is neither in its pg_wal nor in "
                    f"{self.barman.destination}: the recovery cannot follow its history; nothing was changed",
                    type=ErrorKind.TimelineHistoryMissing,
                    non_retryable=True,
                )
            return parse_history((Path(tmp) / name).read_text())

    def _launch(self, job: RestoreJob, previous: dict) -> None:
        if previous["launches"]:  # a failed or killed copy: S3 still holds the backup
            self._remove_restored(job.restore_dir, previous.get("tablespaces", []))
        record = {**previous, "launches": previous["launches"] + 1, "started_at": datetime.now(UTC).isoformat()}
        for stale in (job.exit_file, job.pid_file):
            stale.unlink(missing_ok=True)
        job.job_file.write_text(json.dumps(record))
        tablespaces = [Tablespace.model_validate(t) for t in record.get("tablespaces", [])]
        for tablespace in tablespaces:  # fresh, empty and the server's: barman refuses a non-empty one
            self._make_server_dir(Path(tablespace.restored_to))
        # The shell records its PID and the exit code itself: both survive this worker's death.
        script = 'pidf=$1 exitf=$2; shift 2; echo $$ > "$pidf"; rc=0; "$@" || rc=$?; echo $rc > "$exitf"'
        argv = run_as(
            self.server.os_user,
            [
                "sh",
                "-c",
                script,
                "restore",
                str(job.pid_file),
                str(job.exit_file),
                *self.barman.restore_argv(
                    record["backup_id"], job.restore_dir, {t.name: t.restored_to for t in tablespaces}
                ),
            ],
        )
        with open(job.log_file, "ab") as log:
            proc = subprocess.Popen(
                argv,
                env=self.barman.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        while True:
            try:
                proc.wait(timeout=self.poll_seconds)
                break
            except subprocess.TimeoutExpired:
                _heartbeat({"phase": "restoring", "backup_id": record["backup_id"], "launches": record["launches"]})
        self._finish(job, record)

    def _wait_for(self, job: RestoreJob, record: dict) -> None:
        """Adopt a restore started by an earlier attempt of this activity."""
        activity.logger.info("adopting the restore of %s started by an earlier attempt", record["backup_id"])
        while job.running_pid():
            _heartbeat({"phase": "restoring (adopted)", "backup_id": record["backup_id"]})
            time.sleep(self.poll_seconds)
        self._finish(job, record)

    def _finish(self, job: RestoreJob, record: dict) -> None:
        code = job.exit_code()
        if code == 0:
            return
        tail = job.log_file.read_text(errors="replace")[-1500:] if job.log_file.exists() else ""
        raise ApplicationError(
            f"barman-cloud-restore of {record['backup_id']} exited {code}: {tail}", type=ErrorKind.RestoreFailed
        )

    def _prepare_data_dir(self, restore_dir: Path) -> None:
        """What barman-cloud-restore leaves to us: an empty pg_wal and mode 700 (idempotent)."""
        (restore_dir / "pg_wal").mkdir(exist_ok=True)
        subprocess.run(run_as(self.server.os_user, ["chmod", "700", str(restore_dir)]), check=True)
        if self.server.os_user and os.geteuid() == 0:
            subprocess.run(["chown", f"{self.server.os_user}:", str(restore_dir / "pg_wal")], check=True)

    def _remove_restored(self, restore_dir: Path, tablespaces: list[dict]) -> None:
        """Delete a restore this run made (never production's or the damaged directories)."""
        for directory in [restore_dir, *(Path(t["restored_to"]) for t in tablespaces)]:
            if directory.exists():
                shutil.rmtree(directory)

    def _make_server_dir(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, exist_ok=True)
        if self.server.os_user and os.geteuid() == 0:
            subprocess.run(["chown", f"{self.server.os_user}:", str(directory)], check=True)

    # --- replay -----------------------------------------------------------------

    @activity.defn
    def replay_wal(self, req: ReplayRequest) -> ReplayResult:
        """Start the restore on a spare port and replay archived WAL along production's timeline.

        Full recovery (no `target_xid`): to the end of the archive, then promote;
        the promoted copy keeps `archive_mode = on` with an empty
        `archive_command`, so it archives nothing (its WAL waits in pg_wal) until
        the swap makes it production. The databases the seal closed are
        reopened in it. A recovery that ended before `must_reach_lsn` (or
        `must_reach_segment`) is refused: ReplayIncomplete. Side instance
        (`target_xid`): stops just before that transaction, paused, read-only,
        `archive_mode = off`.

        Re-run safe: a server already replaying on that directory is watched, not
        restarted; one that stopped because the archive was unreadable (exit
        126 from restore_command) is started again and resumes: ArchiveUnreachable
        is retryable, ReplayFailed (any other stop) is not. Heartbeats the replay
        position.
        """
        restore_dir = Path(req.restore_dir)
        server = self.server.at(restore_dir, port=self.server.at(restore_dir).running_port() or free_port())
        timeline = req.timeline if req.timeline is not None else self.server.control_timeline()
        if not server.is_running():
            if not (restore_dir / "PG_VERSION").exists():
                raise ApplicationError(
                    f"{restore_dir} holds no restored cluster; restore it first",
                    type=ErrorKind.NothingToReplay,
                    non_retryable=True,
                )
            if req.local_wal_dir:
                self._archive_unarchived(Path(req.local_wal_dir))
            self._write_recovery_config(restore_dir, req.target_xid, timeline, req.local_wal_dir)
            server.start(wait=False)
        while True:
            if not server.is_running():
                log = server.log_tail(40)
                if ARCHIVE_UNREADABLE in log:
                    raise ApplicationError(
                        "the WAL archive could not be read, so recovery stopped instead of "
                        "ending early; it resumes on the next attempt:" + log[-1500:],
                        type=ErrorKind.ArchiveUnreachable,
                    )
                raise ApplicationError(
                    "recovery stopped before it was done; see the server log:" + log[-1500:],
                    type=ErrorKind.ReplayFailed,
                    non_retryable=True,
                )
            state = recovery_state(server)
            if state and req.target_xid is not None and state.get("paused"):
                return ReplayResult(port=server.port, timeline=0, end_lsn=state["lsn"], followed_timeline=timeline)
            if state and not state["in_recovery"]:
                recovery_end = recovery_end_of(restore_dir, state["timeline"])
                try:
                    check_reached(state["segment"], recovery_end, req.must_reach_segment, req.must_reach_lsn)
                except ApplicationError:
                    server.stop()  # promoted but incomplete: nobody may write to it
                    raise
                set_allow_connections(server, req.reopen_databases, allow=True)
                return ReplayResult(
                    port=server.port,
                    timeline=state["timeline"],
                    end_lsn=state["lsn"],
                    last_commit_at=state["last_commit_at"],
                    followed_timeline=timeline,
                    recovery_end_lsn=recovery_end,
                )
            _heartbeat({"phase": "replaying", "port": server.port, **(state or {"lsn": "starting"})})
            time.sleep(self.poll_seconds)

    def _archive_unarchived(self, wal: Path) -> None:
        """The complete segments a stopped primary never archived (`.ready` in its pg_wal), uploaded the way
        its archive_command would have, oldest first: the archive is whole again for any later recovery.
        Its pg_wal is only read (the `.ready` files stay: they are evidence of what the archiver missed)."""
        try:
            ready = sorted(
                p.name.removesuffix(".ready")
                for p in (wal / "archive_status").glob("*.ready")
                if _WAL_OR_HISTORY.fullmatch(p.name.removesuffix(".ready"))
            )
        except OSError:
            return  # unreadable: restore_command still falls back to it file by file
        for i, segment in enumerate(ready):
            _heartbeat(
                {
                    "phase": "archiving the stopped primary's unarchived WAL",
                    "segment": segment,
                    "done": i,
                    "of": len(ready),
                }
            )
            try:
                self.barman.archive_wal_file(wal / segment)
            except RuntimeError as err:
                raise ApplicationError(
                    f"could not archive {segment} from the stopped primary's pg_wal: {err}",
                    type=ErrorKind.ArchiveUnreachable,
                ) from err

    def _write_recovery_config(
        self, restore_dir: Path, target_xid: int | None, timeline: int | None, local_wal_dir: str | None = None
    ) -> None:
        auto = restore_dir / "postgresql.auto.conf"
        current = auto.read_text() if auto.exists() else ""
        if RECOVERY_BEGIN not in current:
            restore_command = self.barman.restore_command(fallback_dir=local_wal_dir).replace("'", "''")
            if target_xid is None:  # to the end of the archive, then a new primary that archives nothing yet
                # and applies no subscription (it would consume production's slots on the publishers) until
                # the swap makes it production: no logical-replication launcher at all.
                target = (
                    "recovery_target_action = 'promote'\narchive_mode = on\narchive_command = ''\n"
                    "max_logical_replication_workers = 0\n"
                )
            else:  # a side instance: just before the bad transaction, paused, read-only, archiving nothing
                target = (
                    f"recovery_target_xid = '{target_xid % 2**32}'\nrecovery_target_inclusive = off\n"
                    "recovery_target_action = 'pause'\narchive_mode = off\n"
                )
            follow = str(timeline) if timeline else "latest"
            block = (
                f"\n{RECOVERY_BEGIN}\nrestore_command = '{restore_command}'\n"
                f"recovery_target_timeline = '{follow}'\n{target}{RECOVERY_END}\n"
            )
            write_as(self.server.os_user, auto, current + block)
        write_as(self.server.os_user, restore_dir / "recovery.signal", "")

    # --- swap -------------------------------------------------------------------

    @activity.defn
    def swap_in_restored(self, req: SwapRequest) -> SwapResult:
        """Move the damaged directory (and its seal marker) aside, put the verified restore in its
        place, start it as production, and wait until the WAL it held back is archived.

        The restore's recovery settings are removed first, so production's own
        archive_command applies: the new timeline's history file and the WAL
        written since the promotion reach the archive now, and only now.
        Re-run safe: each rename happens only if it has not happened yet.
        Raises PrimaryRunning / SwapConflict (non-retryable), ArchiveLagging (retryable).
        """
        data_dir = self.server.data_dir
        restore_dir = Path(req.restore_dir)
        damaged = damaged_dir_for(data_dir, req.incident_id)
        if restore_dir.exists():
            self.server.at(restore_dir).stop()
            self._strip_recovery_config(restore_dir)
            if data_dir.exists() and not damaged.exists():
                if self.server.is_running():
                    raise ApplicationError(
                        f"a server still runs on {data_dir}; seal the primary first",
                        type=ErrorKind.PrimaryRunning,
                        non_retryable=True,
                    )
                data_dir.rename(damaged)
            if data_dir.exists():
                raise ApplicationError(
                    f"both {data_dir} and {damaged} exist; refusing to overwrite either",
                    type=ErrorKind.SwapConflict,
                    non_retryable=True,
                )
            if marker_path(data_dir).exists():  # the seal stays with the evidence it describes
                marker_path(data_dir).rename(marker_path(damaged))
            for tablespace in req.tablespaces:
                swap_tablespace(restore_dir, tablespace, req.incident_id)
            restore_dir.rename(data_dir)
        self.server.start()
        self.server.wait_ready()
        self._wait_archive_drained(data_dir)
        # The seal disabled them (WAL-logged, so disabled in the restore too): production applies again.
        set_subscriptions(self.server, req.enable_subscriptions, enable=True)
        return SwapResult(
            data_dir=str(data_dir), damaged_dir=str(damaged), enabled_subscriptions=req.enable_subscriptions
        )

    def _wait_archive_drained(self, data_dir: Path, timeout: float = 300) -> None:
        """Wait until pg_wal/archive_status holds no .ready file: everything held back is archived."""
        status = data_dir / "pg_wal" / "archive_status"
        deadline = time.monotonic() + timeout
        while pending := sorted(p.name for p in status.glob("*.ready")):
            if time.monotonic() > deadline:
                raise ApplicationError(
                    f"{len(pending)} WAL files still wait to be archived after {timeout:.0f}s "
                    f"(first {pending[0]}); check archive_command",
                    type=ErrorKind.ArchiveLagging,
                )
            _heartbeat({"phase": "archiving held-back WAL", "pending": len(pending)})
            time.sleep(self.poll_seconds)

    @activity.defn
    def stop_restore(self, req: SwapRequest) -> str:
        """Stop a restore that will not be swapped in (the run failed or was refused) and keep it for
        inspection. It archived nothing (empty archive_command), so the archive is as it was.
        Returns what was left where (re-run safe)."""
        restore = self.server.at(Path(req.restore_dir))
        if not restore.data_dir.exists():
            return "no restore was made"
        running = restore.is_running()
        restore.stop()
        return (
            f"the restore in {restore.data_dir} was {'stopped' if running else 'not running'} and is kept for "
            "inspection; it archived nothing"
        )

    def _strip_recovery_config(self, restore_dir: Path) -> None:
        auto = restore_dir / "postgresql.auto.conf"
        text = auto.read_text() if auto.exists() else ""
        if RECOVERY_BEGIN in text:
            head, rest = text.split(RECOVERY_BEGIN, 1)
            write_as(self.server.os_user, auto, head.rstrip("\n") + "\n" + rest.split(RECOVERY_END, 1)[-1].lstrip("\n"))

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
        self._remove_restored(side, (job.load() or {}).get("tablespaces", []))
        for leftover in (job.job_file, job.pid_file, job.exit_file, job.log_file, self.server.at(side).log_file):
            leftover.unlink(missing_ok=True)

    # --- backup -----------------------------------------------------------------

    @activity.defn
    def take_base_backup(self, req: BackupRequest) -> BackupResult:
        """A fresh base backup on the new timeline, so the next restore replays little WAL.

        Re-run safe: a backup that finished after this incident's swap is reused, and one still running
        from an attempt whose worker died is waited for, never started twice (the child's PID and exit
        code are kept on disk, as for a restore). Raises BackupFailed (retryable: the next attempt starts
        a new backup).
        """
        marker = self.server.data_dir.with_name(f"{self.server.data_dir.name}.backup-{req.incident_id}")
        if marker.exists():
            return BackupResult(backup_id=marker.read_text().strip())
        job = RestoreJob(marker.with_name(marker.name + ".run"))  # the same crash-safe child record
        while True:
            record = job.load()
            if record and job.exit_code() == 0:
                break
            if record and job.running_pid():
                activity.logger.info("adopting the base backup started by an earlier attempt")
                while job.running_pid():
                    _heartbeat({"phase": "backing up (adopted)"})
                    time.sleep(self.poll_seconds)
            elif record and job.exit_code() is not None and not record.get("reported"):
                # it failed: this attempt fails with its output; the next one starts a new backup
                tail = job.log_file.read_text(errors="replace")[-1500:] if job.log_file.exists() else ""
                job.job_file.write_text(json.dumps({**record, "reported": True}))
                raise ApplicationError(
                    f"barman-cloud-backup exited {job.exit_code()}: {tail}", type=ErrorKind.BackupFailed
                )
            else:  # never started, killed with the worker before it recorded an exit, or a reported failure
                self._launch_backup(job, record)
        new = [b["backup_id"] for b in self.barman.list_backups() if b["backup_id"] not in record["before"]]
        backup_id = new[-1] if new else "unknown"
        marker.write_text(backup_id)
        for done in (job.job_file, job.pid_file, job.exit_file):
            done.unlink(missing_ok=True)
        return BackupResult(backup_id=backup_id)

    def _launch_backup(self, job: RestoreJob, previous: dict | None) -> None:
        before = previous["before"] if previous else [b["backup_id"] for b in self.barman.list_backups()]
        record = {
            "before": before,
            "launches": (previous or {}).get("launches", 0) + 1,
            "started_at": datetime.now(UTC).isoformat(),
        }
        for stale in (job.exit_file, job.pid_file):
            stale.unlink(missing_ok=True)
        job.job_file.write_text(json.dumps(record))  # before the child starts: a retry knows about it
        script = 'pidf=$1 exitf=$2; shift 2; echo $$ > "$pidf"; rc=0; "$@" || rc=$?; echo $rc > "$exitf"'
        argv = [
            "sh",
            "-c",
            script,
            "backup",
            str(job.pid_file),
            str(job.exit_file),
            *self.barman.backup_argv(self.server.host, self.server.port, self.server.superuser),
        ]
        with open(job.log_file, "ab") as log:
            proc = subprocess.Popen(
                argv,
                env={**self.barman.env(), "PGPASSWORD": self.server.password or ""},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        while True:
            try:
                proc.wait(timeout=self.poll_seconds)
                return
            except subprocess.TimeoutExpired:
                _heartbeat({"phase": "backing up", "launches": record["launches"]})
