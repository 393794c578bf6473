"""Background processes tracked by PID files, so `drp stack down` stops exactly
what `drp stack up` started, even from another shell."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_for_port(port: int, timeout: float = 60, what: str = "service") -> None:
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not open port {port} within {timeout:.0f}s")
        time.sleep(0.1)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


class ProcessTable:
    """PID files under one run/ folder, one per named process."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def pid(self, name: str) -> int | None:
        """The recorded process if it still runs: its start time must match, so a PID the
        kernel reused for another process is never signalled."""
        try:
            pid, started = self.pidfile(name).read_text().split()
        except (OSError, ValueError):
            return None
        return int(pid) if pid_alive(int(pid)) and _start_time(int(pid)) == started else None

    def spawn(
        self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> int:
        """Start argv in its own session unless it already runs; returns its PID."""
        existing = self.pid(name)
        if existing:
            return existing
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self.pidfile(name).write_text(f"{proc.pid} {_start_time(proc.pid)}\n")
        return proc.pid

    def stop(self, name: str, timeout: float = 20) -> bool:
        """SIGTERM the process group, then SIGKILL after timeout. True if it was running."""
        pid = self.pid(name)
        if pid is None:
            self.pidfile(name).unlink(missing_ok=True)
            return False
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pidfile(name).unlink(missing_ok=True)
        return True


def _start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "gone"
