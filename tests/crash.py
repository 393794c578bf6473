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
        return (
            f"{self.kind}:{self.activity}"
            + (f"#{self.nth}" if self.nth > 1 else "")
            + ("+server-restart" if self.restart else "")
        )


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


class Case(tuple):
    """The points one run crashes at, in the order the run reaches them: worker generation k carries the
    k-th point, generation k+1 takes over when it fires (several points a run keep the matrix cheap)."""

    def __str__(self) -> str:
        return " > ".join(map(str, self))


def case(*specs: str) -> Case:
    return Case(points(*specs))


class Crash:
    """Worker processes, one per task queue, on one settings file, in generations. Generation k carries
    the k-th crash point; when it fires (the hook SIGKILLs its own process, or the test SIGKILLs it at an
    approval gate or after a recorded heartbeat) every process of the generation is SIGKILLed, the
    Temporal server restarts if the point says so, and generation k+1 takes over. The last one is plain."""

    def __init__(self, client, temporal_stack, settings: dict, queues: list[str], tmp: Path, case, workflow_id: str):
        self.points = [p for p in (case if isinstance(case, (list, tuple)) else [case]) if p.kind != "none"]
        self.client, self.temporal_stack, self.workflow_id = client, temporal_stack, workflow_id
        self.queues, self.tmp = queues, tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.settings_file = tmp / "settings.json"
        # a dead worker's sticky queue is given up on after this; production's 10 s would only slow the matrix
        self.settings_file.write_text(json.dumps({**settings, "sticky_queue_timeout": "3s"}))
        self.generations: list[list[subprocess.Popen]] = []
        self.crashed: list[str] = []  # where each generation died, in order
        self.handle = None
        self._watcher: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    @property
    def current(self) -> int:
        """Index of the point the running generation carries (len(points) when it is the plain last one)."""
        return len(self.generations) - 1

    @property
    def point(self) -> Point | None:
        return self.points[self.current] if self.current < len(self.points) else None

    def dir(self, index: int) -> Path:
        d = self.tmp / f"crash-{index + 1}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _spawn(self, queue: str, index: int) -> subprocess.Popen:
        env = {
            **os.environ,
            "DRP_SETTINGS_FILE": str(self.settings_file),
            "DRP_TASK_QUEUE": queue,
            "PYTHONPATH": str(ROOT),
            "DRP_CRASH_DIR": str(self.dir(index)),
            "DRP_CRASH_WORKFLOW": self.workflow_id,
        }
        env.pop("DRP_CRASH_AT", None)
        if index < len(self.points):
            point = self.points[index]
            env["DRP_CRASH_AT"] = f"{point.kind}:{point.activity}:{point.nth}"
        log = open(self.tmp / f"worker{index + 1}-{queue}.log", "ab")
        return subprocess.Popen(
            [sys.executable, "-m", "tests.crash_worker"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )

    async def _start_generation(self) -> None:
        index = len(self.generations)
        procs = [self._spawn(q, index) for q in self.queues]
        self.generations.append(procs)
        for queue, proc in zip(self.queues, procs, strict=True):
            async with asyncio.timeout(600):
                while True:
                    try:
                        await wait_for_poller(self.client, queue, proc)
                        break
                    except RPCError:  # the server is still starting after a restart
                        await asyncio.sleep(0.5)

    async def __aenter__(self) -> "Crash":
        await self._start_generation()
        return self

    def watch(self, handle) -> None:
        """Start watching `handle`'s run for the crash points (call right after starting the run)."""
        self.handle = handle
        if self.points:
            self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while self.point is not None:
            index, point = self.current, self.point
            if any(p.poll() is not None for p in self.generations[index]) or (
                (self.dir(index) / "mid").exists() and await self._heartbeat_recorded(point)
            ):
                await self.crash(index)  # the hook SIGKILLed its own process, or the activity stopped mid-way
            else:
                await asyncio.sleep(0.1)

    async def _heartbeat_recorded(self, point: Point) -> bool:
        try:
            desc = await self.handle.describe()
        except RPCError:
            return False
        return any(
            a.activity_type.name == point.activity and a.HasField("last_heartbeat_time")
            for a in desc.raw_description.pending_activities
        )

    async def crash(self, index: int) -> None:
        """SIGKILL generation `index` (the running one), restart the server if its point says so, start the next."""
        async with self._lock:
            if index != self.current or self.point is None:
                return
            point = self.points[index]
            for proc in self.generations[index]:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(proc.wait)
            fired = self.dir(index) / "fired"
            where = fired.read_text().strip() if fired.exists() else f"{point} (SIGKILL by the test)"
            if point.restart:
                await asyncio.to_thread(self.temporal_stack.restart_temporal)
                where += ", then the Temporal server restarted"
            self.crashed.append(where)
            await self._start_generation()

    async def approve(
        self, handle, step: str | None = None, approver: str = "alice", reason: str = "approved in the crash matrix"
    ):
        """Approve at the gate; a `completed` point armed before the gate fires here, while the run waits."""
        await self._gate(handle, step)
        point, index = self.point, self.current
        if point is not None and point.kind == "completed" and (self.dir(index) / "armed").exists():
            (self.dir(index) / "fired").write_text(
                f"completed {point.activity}#{point.nth}, at the approval gate {step or ''} (SIGKILL by the test)\n"
            )
            await self.crash(index)
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

    async def result(self, handle, timeout: float = 900):
        async with asyncio.timeout(timeout):
            while True:
                try:
                    result = await handle.result()
                    break
                except RPCError:  # the server restarted under the long poll
                    await asyncio.sleep(0.5)
        if self._watcher is not None and self._watcher.done() and self._watcher.exception():
            raise self._watcher.exception()
        assert len(self.crashed) == len(self.points), (
            f"the run ended without reaching {', '.join(map(str, self.points[len(self.crashed) :]))}; "
            f"it crashed at: {self.crashed}"
        )
        return result

    async def attempts(self, handle) -> dict[str, list[int]]:
        """Per crash point's activity, the attempts that reached the history (the last one completed it)."""
        return {p.activity: await activity_attempts(handle, p.activity) for p in self.points}

    async def __aexit__(self, *exc) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
        for index, procs in enumerate(self.generations):  # only the processes this test started
            for proc in procs:
                if proc.poll() is not None:
                    continue
                if index < len(self.points):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    continue
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
    return query_timed_out(err) or any(
        s in text for s in ("no poller", "unavailable", "connection refused", "transport", "deadline")
    )


@contextlib.contextmanager
def reporting(runbook: str, case, where, attempts, counts: dict):
    """Report the case's line of the matrix: pass, or FAIL with the first line of the failed assertion."""
    try:
        yield
    except AssertionError as err:
        report(runbook, case, "FAIL: " + (str(err).splitlines() or [""])[0][:300], where, attempts, counts)
        raise
    report(runbook, case, "pass", where, attempts, counts)


def report(runbook: str, point, outcome: str, where, attempts, counts: dict) -> None:
    """One line of the matrix, appended to $DRP_CRASH_REPORT (JSON lines) when set."""
    path = os.environ.get("DRP_CRASH_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(
                json.dumps(
                    {
                        "runbook": runbook,
                        "point": str(point),
                        "outcome": outcome,
                        "where": where,
                        "attempts": attempts,
                        "counts": counts,
                    }
                )
                + "\n"
            )


def table(lines: list[dict]) -> str:
    """The matrix as a Markdown table (BENCHMARKS.md)."""
    out = [
        "| runbook | crash points (in run order) | result | where the workers died | attempts of the "
        "point's activity | side effects counted on the real systems |",
        "|---|---|---|---|---|---|",
    ]
    for r in lines:
        where = "; ".join(r["where"]) if isinstance(r["where"], list) else (r["where"] or "-")
        attempts = (
            r["attempts"]
            if not isinstance(r["attempts"], dict)
            else ", ".join(f"{k} {v}" for k, v in r["attempts"].items())
        )
        counts = ", ".join(f"{k} {v}" for k, v in r["counts"].items())
        out.append(f"| {r['runbook']} | `{r['point']}` | {r['outcome']} | {where} | {attempts or '-'} | {counts} |")
    return "\n".join(out)


if __name__ == "__main__":  # python -m tests.crash report.jsonl
    print(table([json.loads(line) for line in open(sys.argv[1]) if line.strip()]))
