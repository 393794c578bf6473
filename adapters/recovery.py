"""A restore's files on disk: where it lands, its barman-cloud-restore child's record, its recovery settings,
its end point, and swapping its tablespaces in.
"""

import json
import os
import subprocess
from pathlib import Path

import psycopg
from temporalio.exceptions import ApplicationError

from adapters.pgserver import PgServer, one, run_as
from adapters.processes import pid_alive
from adapters.timelines import (
    history_file_name,
    lsn_to_int,
    parse_history,
)
from models.errors import ErrorKind
from models.postgres import (
    Tablespace,
)

RECOVERY_BEGIN = "# --- drp recovery: begin ---"


RECOVERY_END = "# --- drp recovery: end ---"


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


def recovery_state(server: PgServer) -> dict | None:
    try:
        with server.connect("template1", timeout=2) as conn:  # the seal's fenced databases open at promotion
            in_recovery = conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
            if in_recovery:
                lsn, paused = one(
                    conn.execute("SELECT pg_last_wal_replay_lsn()::text, pg_get_wal_replay_pause_state() = 'paused'")
                )
                return {"in_recovery": True, "lsn": lsn, "paused": paused}
            segment, lsn = one(conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn()), pg_current_wal_lsn()::text"))
            timeline = int(segment[:8], 16)
            last = conn.execute("SELECT timestamp FROM pg_last_committed_xact()").fetchone()
            return {
                "in_recovery": False,
                "timeline": timeline,
                "lsn": lsn,
                "segment": segment,
                "last_commit_at": last[0] if last else None,
            }
    except psycopg.OperationalError:
        return None  # still starting up, or not yet consistent


def swap_tablespace(restore_dir: Path, tablespace: Tablespace, incident_id: str) -> None:
    """Production's tablespace directory aside (never deleted), the restored one in its place, the
    restore's pg_tblspc link pointed at it. Each move happens once, so a retry continues."""
    location, fresh = Path(tablespace.location), Path(tablespace.restored_to)
    damaged = location.with_name(f"{location.name}.damaged-{incident_id}")
    link = restore_dir / "pg_tblspc" / str(tablespace.oid)
    if not link.is_symlink():
        return  # dropped after the backup: the replay removed it, there is nothing of production's to swap
    if fresh.exists():
        if location.exists() and not damaged.exists():
            location.rename(damaged)
        if location.exists():
            raise ApplicationError(
                f"both {location} and {damaged} exist; refusing to overwrite either",
                type=ErrorKind.SwapConflict,
                non_retryable=True,
            )
        fresh.rename(location)
    if os.readlink(link) != str(location):
        tmp = link.with_name(link.name + ".tmp")
        tmp.unlink(missing_ok=True)
        os.symlink(location, tmp)
        os.replace(tmp, link)


def recovery_end_of(restore_dir: Path, timeline: int) -> str | None:
    """Where replay ended: the switch point in the history file the promotion wrote for its new timeline."""
    try:
        branches = parse_history((restore_dir / "pg_wal" / history_file_name(timeline)).read_text())
    except OSError:
        return None
    return branches[-1].switchpoint if branches else None


def check_reached(
    current_segment: str, recovery_end: str | None, required_segment: str | None, required_lsn: str | None
) -> None:
    """Refuse a recovery that ended before the last WAL the sealed primary archived.

    PostgreSQL ends recovery at the first WAL file restore_command reports as
    absent, so a segment missing from the archive looks like its end. With the
    sealed primary's position (`required_lsn`, just past its last archived
    segment) the replay's end point, read from the new timeline's history file,
    must reach it; without it, the segment names' positions are compared.
    """
    if required_lsn and recovery_end is not None and lsn_to_int(recovery_end) < lsn_to_int(required_lsn):
        raise ApplicationError(
            f"recovery ended at {recovery_end} but the old primary archived WAL up to {required_lsn} "
            f"(segment {required_segment}): a WAL segment is missing from the archive. The restore is kept, "
            "stopped, and archived nothing; production is untouched.",
            type=ErrorKind.ReplayIncomplete,
            non_retryable=True,
        )
    if required_segment and current_segment[8:] < required_segment[8:]:
        raise ApplicationError(
            f"recovery ended in segment {current_segment[8:]} but the old primary archived up to {required_segment}; "
            "WAL is missing or was unreachable. The restore is kept, stopped, and archived nothing; "
            "production is untouched.",
            type=ErrorKind.ReplayIncomplete,
            non_retryable=True,
        )


def write_as(os_user: str | None, path: Path, text: str) -> None:
    """Write a file inside a data directory so that the server's OS user owns it."""
    subprocess.run(run_as(os_user, ["sh", "-c", 'cat > "$0"', str(path)]), input=text.encode(), check=True)
