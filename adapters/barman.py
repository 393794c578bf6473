"""barman-cloud command lines for one server's backups and WAL archive in S3.

Kept in one place so the archive_command the stack installs, the
restore_command a recovery writes, and the backups the activities take all
point at exactly the same bucket, prefix and server name.
"""

import json
import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# How often restore_command tries a WAL file the archive answers with an error, and the
# line it leaves in the server log when it gives up (exit 126: recovery stops, not ends).
RESTORE_TRIES = 5
ARCHIVE_UNREADABLE = "drp: WAL archive unreadable"


@dataclass(frozen=True)
class BarmanCloud:
    bin_dir: Path
    destination: str  # s3://bucket/prefix
    server_name: str
    endpoint_url: str | None = None
    credentials_env: dict[str, str] = field(default_factory=dict, repr=False)

    def _common(self, tool: str) -> list[str]:
        argv = [str(self.bin_dir / tool), "--cloud-provider", "aws-s3"]
        if self.endpoint_url:
            argv += ["--endpoint-url", self.endpoint_url]
        return argv

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.credentials_env}

    def archive_command(self) -> str:
        """archive_command for postgresql.conf (runs as the server's OS user)."""
        return shlex.join(self._common("barman-cloud-wal-archive") + [self.destination, self.server_name]) + " %p"

    def restore_command(self, tries: int = RESTORE_TRIES, fallback_dir: str | None = None) -> str:
        """restore_command for recovery (runs as the server's OS user).

        PostgreSQL reads any exit status below 126 as "this WAL file does not
        exist" and ends recovery there, yet barman-cloud-wal-restore exits 2 or 4
        on network and S3 errors (1 only when the file is truly absent). So the
        call is retried `tries` times with a growing pause, and an archive that
        stays unreadable exits 126: the server stops with FATAL and recovery
        resumes when it is started again, instead of promoting early and
        dropping the WAL it could not read. The marker on stderr lands in the
        server log, where the replay activity looks for it.

        `fallback_dir` (a stopped primary's own pg_wal): a file the archive truly
        lacks (exit 1) is copied from there when it exists, the way PostgreSQL's
        docs say to recover with the unarchived WAL of a crashed primary; the
        directory is only read.
        """
        # --no-partial: a standby promoted elsewhere archives its last segment as .partial, which barman
        # would otherwise serve as the complete segment (barman-cloud-wal-restore --help); PANIC at its zeros.
        fetch = shlex.join(
            self._common("barman-cloud-wal-restore") + ["--no-partial", self.destination, self.server_name]
        )
        absent = "exit 1"
        if fallback_dir:
            local = shlex.quote(fallback_dir.rstrip("/"))
            absent = f'[ -f {local}/"$1" ] && cp {local}/"$1" "$2" && exit 0; exit 1'
        script = (
            f'n=0; while :; do {fetch} "$1" "$2"; rc=$?; [ $rc -eq 0 ] && exit 0; [ $rc -eq 1 ] && break; '
            f'n=$((n+1)); [ $n -ge {int(tries)} ] && {{ echo "{ARCHIVE_UNREADABLE}: barman-cloud-wal-restore '
            f'exited $rc for $1 {int(tries)} times" >&2; exit 126; }}; sleep $n; done; {absent}'
        )
        return shlex.join(["sh", "-c", script, "drp-wal-restore"]) + " %f %p"

    def archive_wal_file(self, path: Path) -> None:
        """Upload one WAL segment the way archive_command does (barman-cloud-wal-archive). Raises RuntimeError."""
        argv = self._common("barman-cloud-wal-archive") + [self.destination, self.server_name, str(path)]
        proc = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(
                f"barman-cloud-wal-archive {path.name} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
            )

    def fetch_wal_file(self, name: str, dest: Path) -> bool:
        """Download one archived WAL or history file; False when the archive does not have it.

        Raises RuntimeError when the archive cannot be read (anything but "not found").
        """
        argv = self._common("barman-cloud-wal-restore") + [self.destination, self.server_name, name, str(dest)]
        proc = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=300)
        if proc.returncode == 1:
            return False
        if proc.returncode != 0:
            raise RuntimeError(
                f"barman-cloud-wal-restore {name} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
            )
        return True

    def backup_argv(self, host: str, port: int, user: str) -> list[str]:
        return self._common("barman-cloud-backup") + [
            "--immediate-checkpoint",
            "-h",
            host,
            "-p",
            str(port),
            "-U",
            user,
            self.destination,
            self.server_name,
        ]

    def restore_argv(self, backup_id: str, target_dir: Path, tablespaces: dict[str, str] | None = None) -> list[str]:
        """barman-cloud-restore of one backup; `tablespaces` relocates each named tablespace (name -> dir)."""
        relocate = [
            arg for name, location in (tablespaces or {}).items() for arg in ("--tablespace", f"{name}:{location}")
        ]
        return self._common("barman-cloud-restore") + [
            *relocate,
            self.destination,
            self.server_name,
            backup_id,
            str(target_dir),
        ]

    def list_backups(self) -> list[dict]:
        """Completed backups, oldest first, as barman-cloud-backup-list reports them."""
        argv = self._common("barman-cloud-backup-list") + ["--format", "json", self.destination, self.server_name]
        proc = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"barman-cloud-backup-list exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        backups = json.loads(proc.stdout or "{}").get("backups_list", [])
        return [b for b in backups if b.get("status") == "DONE"]
