"""The crash matrix's machinery (tests/test_crash_matrix.py): worker processes that die at one exact point
of a run (tests/crash_worker.py), their replacements, and the optional Temporal server restart.

No kill waits on a clock: each is triggered by the run's own state (the hook in the worker, the
workflow's approval gate, a heartbeat the server has recorded)."""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from temporalio.service import RPCError

from models.approval import ApprovalRequest
from tests.conftest import activity_attempts, query_timed_out, terminate_runs, wait_for_approval_gate
from tests.test_crash_survival import ROOT, wait_for_poller

KINDS = ("none", "scheduled", "returned", "completed", "mid")


@dataclass(frozen=True)
class Point:
    """Where a run's worker dies: `kind` of the `nth` activity of type `activity` (tests/crash_worker.py),
    and whether the Temporal server restarts there too."""

    kind: str
    activity: str = ""
    nth: int = 1
    restart: bool = False

    def __post_init__(self):
        assert self.kind in KINDS, self.kind

    def __str__(self) -> str:
        if self.kind == "none":
            return "undisturbed"
        return (f"{self.kind}:{self.activity}" + (f"#{self.nth}" if self.nth > 1 else "")
                + ("+server-restart" if self.restart else ""))


def points(*specs: str) -> list[Point]:
    """'scheduled:restore_base_backup', 'completed:seal_primary+restart', 'mid:rejoin_as_standby#2', 'none'."""
    out = []
    for spec in specs:
        restart = spec.endswith("+restart")
        spec = spec.removesuffix("+restart")
        if spec == "none":
            out.append(Point("none", restart=restart))
            continue
        kind, activity = spec.split(":", 1)
        activity, _, nth = activity.partition("#")
        out.append(Point(kind, activity, int(nth or 1), restart))
    return out


class Crash:
    """Worker processes, one per task queue, on one settings file. The first generation carries the
    crash point; when it fires (the hook SIGKILLs its own process, or the test SIGKILLs it at an approval
    gate or after a recorded heartbeat) every first-generation process is SIGKILLed, the Temporal server
    restarts if the point says so, and a plain second generation takes over."""

    def __init__(self, client, temporal_stack, settings: dict, queues: list[str], tmp: Path, point: Point,
                 workflow_id: str):
        self.client, self.temporal_stack, self.point, self.workflow_id = client, temporal_stack, point, workflow_id
        self.queues, self.tmp = queues, tmp
        self.dir = tmp / "crash"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.settings_file = tmp / "settings.json"
        # a dead worker's sticky queue is given up on after this; production's 10 s would only slow the matrix
        self.settings_file.write_text(json.dumps({**settings, "sticky_queue_timeout": "3s"}))
        self.first: list[subprocess.Popen] = []
        self.second: list[subprocess.Popen] = []
        self.crashed: str | None = None  # where the first generation died
        self.handle = None
        self._watcher: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    def _spawn(self, queue: str, generation: int) -> subprocess.Popen:
        env = {**os.environ, "DRP_SETTINGS_FILE": str(self.settings_file), "DRP_TASK_QUEUE": queue,
               "PYTHONPATH": str(ROOT), "DRP_CRASH_DIR": str(self.dir), "DRP_CRASH_WORKFLOW": self.workflow_id}
        env.pop("DRP_CRASH_AT", None)
        if generation == 1 and self.point.kind != "none":
            env["DRP_CRASH_AT"] = f"{self.point.kind}:{self.point.activity}:{self.point.nth}"
        log = open(self.tmp / f"worker{generation}-{queue}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "tests.crash_worker"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)

    async def _wait_for_pollers(self, procs: list[subprocess.Popen]) -> None:
        for queue, proc in zip(self.queues, procs):
            async with asyncio.timeout(180):
                while True:
                    try:
                        await wait_for_poller(self.client, queue, proc)
                        break
                    except RPCError:  # the server is still starting after a restart
                        await asyncio.sleep(0.5)

    async def __aenter__(self) -> "Crash":
        self.first = [self._spawn(q, 1) for q in self.queues]
        await self._wait_for_pollers(self.first)
        return self

    def watch(self, handle) -> None:
        """Start watching `handle`'s run for the crash point (call right after starting the run)."""
        self.handle = handle
        if self.point.kind != "none":
            self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            if any(p.poll() is not None for p in self.first):
                break  # the hook SIGKILLed its own process
            if (self.dir / "mid").exists() and await self._heartbeat_recorded():
                break
            await asyncio.sleep(0.1)
        await self.crash()

    async def _heartbeat_recorded(self) -> bool:
        try:
            desc = await self.handle.describe()
        except RPCError:
            return False
        return any(a.activity_type.name == self.point.activity and a.HasField("last_heartbeat_time")
                   for a in desc.raw_description.pending_activities)

    async def crash(self) -> None:
        async with self._lock:
            if self.crashed is not None:
                return
            for proc in self.first:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(proc.wait)
            fired = self.dir / "fired"
            self.crashed = (fired.read_text().strip() if fired.exists() else
                            f"{self.point.kind} {self.point.activity}#{self.point.nth} (SIGKILL by the test)")
            if self.point.restart:
                await asyncio.to_thread(self.temporal_stack.restart_temporal)
                self.crashed += ", then the Temporal server restarted"
            self.second = [self._spawn(q, 2) for q in self.queues]
            await self._wait_for_pollers(self.second)

    async def approve(self, handle, step: str | None = None, approver: str = "alice",
                      reason: str = "approved in the crash matrix"):
        """Approve at the gate; a `completed` point armed before the gate fires here, while the run waits."""
        await self._gate(handle, step)
        if self.point.kind == "completed" and (self.dir / "armed").exists() and self.crashed is None:
            (self.dir / "fired").write_text(f"completed {self.point.activity}#{self.point.nth}, at the approval "
                                            f"gate {step or ''} (SIGKILL by the test)\n")
            await self.crash()
            await self._gate(handle, step)
        async with asyncio.timeout(300):
            while True:
                try:
                    return await handle.execute_update("approve", ApprovalRequest(approver=approver, reason=reason))
                except RPCError as err:
                    if not _no_worker_yet(err):
                        raise
                    await asyncio.sleep(0.5)

    async def _gate(self, handle, step: str | None) -> None:
        """Until the run asks for approval; a query finds no worker while one dies and the next starts."""
        async with asyncio.timeout(600):
            while True:
                try:
                    await wait_for_approval_gate(handle, step, timeout=600)
                    return
                except RPCError as err:
                    if not _no_worker_yet(err):
                        raise
                    await asyncio.sleep(0.5)

    async def result(self, handle, timeout: float = 600):
        async with asyncio.timeout(timeout):
            while True:
                try:
                    result = await handle.result()
                    break
                except RPCError:  # the server restarted under the long poll
                    await asyncio.sleep(0.5)
        if self._watcher is not None and self._watcher.done() and self._watcher.exception():
            raise self._watcher.exception()
        assert self.point.kind == "none" or self.crashed, f"the run ended without reaching {self.point}"
        return result

    async def attempts(self, handle) -> list[int] | None:
        """The attempts of the point's activity that reached the history (its last attempt completed it)."""
        if self.point.kind == "none":
            return None
        return await activity_attempts(handle, self.point.activity)

    async def __aexit__(self, *exc) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
        for proc in self.first:  # only the processes this test started
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        for proc in self.second:
            if proc.poll() is None:
                proc.terminate()
                try:
                    await asyncio.to_thread(proc.wait, 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for queue in self.queues:
            with contextlib.suppress(Exception):
                await terminate_runs(self.client, queue)


def _no_worker_yet(err: RPCError) -> bool:
    """A query or update nobody could answer yet: the worker was killed, its successor is starting, or
    the server is restarting."""
    text = str(err).lower()
    return query_timed_out(err) or any(s in text for s in ("no poller", "unavailable", "connection refused",
                                                           "transport", "deadline"))


def report(runbook: str, point: Point, outcome: str, where: str | None, attempts, counts: dict) -> None:
    """One line of the matrix, appended to $DRP_CRASH_REPORT (JSON lines) when set."""
    path = os.environ.get("DRP_CRASH_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"runbook": runbook, "point": str(point), "outcome": outcome, "where": where,
                                  "attempts": attempts, "counts": counts}) + "\n")
