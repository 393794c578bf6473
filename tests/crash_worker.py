"""The worker process of the crash matrix (tests/test_crash_matrix.py): `workers.main`'s worker (same
workflows, activities, sandbox and settings) plus a hook that SIGKILLs this process at one exact point
of one run, so that no kill depends on how fast the machine is.

`python -m tests.crash_worker` with DRP_SETTINGS_FILE / DRP_TASK_QUEUE as for `workers.main`, and:

- DRP_CRASH_AT = "<kind>:<activity type>:<n>": the n-th first attempt of an activity of that type
  (1-based) of the run DRP_CRASH_WORKFLOW (a workflow ID) that this process receives (the first worker
  of a run receives them all; a later generation counts from its own start), where kind is
  - `scheduled`: the activity was scheduled and handed to this worker; the process dies before its
    body runs (the server retries it once its heartbeat or start-to-close timeout notices);
  - `returned`: its body did all its work and returned; the process dies before the result reaches
    the server (the retry runs the body again: the idempotency test for quick activities);
  - `completed`: its result is in the history; the process dies in the workflow task that would
    issue the run's next command (next activity, child, signal, or the run's completion). When the
    next thing the run does is wait for an approval, nothing is issued: the hook leaves an `armed`
    file and the test kills the process itself while the run waits;
  - `mid`: the activity's body heartbeats for the first time; that heartbeat is handed to the SDK, then
    the activity's thread stops (it does no more work) and a `mid` file tells the test, which kills
    the process once the server shows the heartbeat (the retry resumes from the heartbeat details).
- DRP_CRASH_DIR: where the `armed` / `mid` / `fired` files go.

Each generation of workers gets the next point of the case (tests/crash.py); the last one is plain.
"""

import asyncio
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from temporalio import activity, workflow
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    ExecuteWorkflowInput,
    Interceptor,
    SignalChildWorkflowInput,
    SignalExternalWorkflowInput,
    StartActivityInput,
    StartChildWorkflowInput,
    Worker,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from workers.logging import LoggingInterceptor, configure_logging
from workers.main import WORKFLOWS, build_activities
from workers.settings import Settings
from workers.temporal_client import connect

CRASH_AT = os.environ.get("DRP_CRASH_AT", "")
TARGET = os.environ.get("DRP_CRASH_WORKFLOW", "")
CRASH_DIR = Path(os.environ.get("DRP_CRASH_DIR", "/nonexistent"))
KIND, TYPE, NTH = (CRASH_AT.split(":") + ["", "", "1"])[:3] if CRASH_AT else ("", "", "1")
NTH = int(NTH or 1)

_seen: dict[str, int] = {}  # activity ID -> its ordinal among TYPE's activities of the target run
_lock = threading.Lock()


def die(where: str) -> None:
    """SIGKILL this process: no finally block, no flush, no goodbye to the server."""
    (CRASH_DIR / "fired").write_text(f"{where}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _ordinal(info: activity.Info) -> int:
    with _lock:
        if info.activity_id not in _seen:
            _seen[info.activity_id] = len(_seen) + 1
        return _seen[info.activity_id]


def _targeted(info: activity.Info) -> bool:
    return (
        bool(KIND)
        and info.workflow_id == TARGET
        and info.activity_type == TYPE
        and info.attempt == 1
        and _ordinal(info) == NTH
    )


class _CrashActivity(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput):
        info = activity.info()
        if not _targeted(info) or (CRASH_DIR / "fired").exists():
            return await super().execute_activity(input)
        if KIND == "scheduled":
            die(f"scheduled {TYPE}#{NTH}")
        if KIND == "mid":
            input.fn = _stopping_at_heartbeat(input.fn)
        result = await super().execute_activity(input)
        if KIND == "returned":
            die(f"returned {TYPE}#{NTH}")
        if KIND == "completed":
            (CRASH_DIR / "armed").write_text(f"{TYPE}#{NTH}\n")
        return result


def _stopping_at_heartbeat(fn):
    """`fn` (a sync activity, run in the executor's thread) whose first heartbeat stops the thread."""

    def wrapped(*args, **kwargs):
        ctx = activity._Context.current()
        heartbeat = ctx.heartbeat

        def stop_after(*details):
            heartbeat(*details)  # handed to the SDK, which sends a first heartbeat at once
            (CRASH_DIR / "mid").write_text(f"{TYPE}#{NTH}\n")
            threading.Event().wait()  # no more work: the test SIGKILLs the process

        ctx.heartbeat = stop_after
        return fn(*args, **kwargs)

    return wrapped


class _CrashWorkflowInbound(WorkflowInboundInterceptor):
    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        super().init(_CrashWorkflowOutbound(outbound))

    async def execute_workflow(self, input: ExecuteWorkflowInput):
        result = await super().execute_workflow(input)
        _die_if_armed("the run's completion")
        return result


def _die_if_armed(command: str) -> None:
    if KIND != "completed" or workflow.info().workflow_id != TARGET or workflow.unsafe.is_replaying():
        return
    with workflow.unsafe.sandbox_unrestricted():
        if (CRASH_DIR / "armed").exists() and not (CRASH_DIR / "fired").exists():
            die(f"completed {TYPE}#{NTH}, before {command}")


class _CrashWorkflowOutbound(WorkflowOutboundInterceptor):
    def start_activity(self, input: StartActivityInput):
        _die_if_armed(f"scheduling {input.activity}")
        return super().start_activity(input)

    async def start_child_workflow(self, input: StartChildWorkflowInput):
        _die_if_armed(f"starting child {input.workflow}")
        return await super().start_child_workflow(input)

    async def signal_child_workflow(self, input: SignalChildWorkflowInput) -> None:
        _die_if_armed(f"signalling child {input.signal}")
        return await super().signal_child_workflow(input)

    async def signal_external_workflow(self, input: SignalExternalWorkflowInput) -> None:
        _die_if_armed(f"signalling {input.signal}")
        return await super().signal_external_workflow(input)


class CrashInterceptor(Interceptor):
    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _CrashActivity(next)

    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput):
        return _CrashWorkflowInbound


async def run(settings: Settings) -> None:
    client = await connect(settings.temporal_address, settings.temporal_namespace)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules("models", "tests")
    )
    with ThreadPoolExecutor(max_workers=16) as executor:
        async with Worker(
            client,
            task_queue=settings.task_queue,
            workflows=WORKFLOWS,
            activities=build_activities(settings, client),
            activity_executor=executor,
            interceptors=[LoggingInterceptor(), CrashInterceptor()],
            workflow_runner=runner,
            sticky_queue_schedule_to_start_timeout=settings.sticky_queue_timeout,
        ):
            await stop.wait()


if __name__ == "__main__":
    settings = Settings()
    configure_logging(settings.log_level)
    asyncio.run(run(settings))
