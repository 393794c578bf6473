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

    def restore_command(self) -> str:
        """restore_command for recovery (runs as the server's OS user)."""
        return shlex.join(self._common("barman-cloud-wal-restore") + [self.destination, self.server_name]) + " %f %p"

    def backup_argv(self, host: str, port: int, user: str) -> list[str]:
        return self._common("barman-cloud-backup") + [
            "--immediate-checkpoint", "-h", host, "-p", str(port), "-U", user, self.destination, self.server_name,
        ]

    def restore_argv(self, backup_id: str, target_dir: Path) -> list[str]:
        return self._common("barman-cloud-restore") + [self.destination, self.server_name, backup_id, str(target_dir)]

    def list_backups(self) -> list[dict]:
        """Completed backups, oldest first, as barman-cloud-backup-list reports them."""
        argv = self._common("barman-cloud-backup-list") + ["--format", "json", self.destination, self.server_name]
        proc = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"barman-cloud-backup-list exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        backups = json.loads(proc.stdout or "{}").get("backups_list", [])
        return [b for b in backups if b.get("status") == "DONE"]
