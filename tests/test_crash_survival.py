"""A worker SIGKILLed mid-restore: a new worker finishes the run, nothing restored twice."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

from models.approval import ApprovalRequest
from models.db_corruption import DatabaseCorruptionInput
from stack.corrupt import corrupt_table
from stack.stack import DATABASE
from starters.db_corruption import start_db_corruption
from tests.conftest import RUN_WAIT, activity_attempts, row_counts, wait_for_approval_gate
from workflows.db_corruption import DatabaseCorruptionRecovery

ROOT = Path(__file__).resolve().parent.parent


def spawn_worker(stack, queue: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A worker process on the stack's settings (plus DRP_* overrides in `env`), one that can be SIGKILLed."""
    env = {
        **os.environ,
        "DRP_SETTINGS_FILE": str(stack.settings_file),
        "DRP_TASK_QUEUE": queue,
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "workers.main"], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT
    )


async def wait_for_poller(client, queue: str, worker: subprocess.Popen, timeout: float = 120) -> None:
    """Until the worker process polls the queue for workflow tasks (a loaded machine takes a while to
    import and connect one): a test that times what the run does must not time the worker's start-up."""
    request = DescribeTaskQueueRequest(
        namespace=client.namespace,
        task_queue=TaskQueue(name=queue),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
    )
    async with asyncio.timeout(timeout):
        while True:
            assert worker.poll() is None, f"the worker exited with {worker.returncode}"
            pollers = (await client.workflow_service.describe_task_queue(request)).pollers
            if any(p.identity.startswith(f"{worker.pid}@") for p in pollers):
                return
            await asyncio.sleep(0.2)


async def wait_for_activity(handle, activity_type: str, timeout: float = RUN_WAIT):
    async with asyncio.timeout(timeout):
        while True:
            desc = await handle.describe()
            running = [a for a in desc.raw_description.pending_activities if a.activity_type.name == activity_type]
            if running and running[0].HasField("last_started_time"):
                return running[0]
            await asyncio.sleep(0.1)


async def test_worker_killed_during_restore_is_replaced_and_nothing_is_restored_twice(stack, client, tmp_path):
    before = row_counts(stack)
    corrupt_table(stack.postgres(), DATABASE, "filings")
    inc, queue = f"CRASH-{uuid.uuid4().hex[:8]}", f"crash-{uuid.uuid4().hex[:8]}"
    restore_job = stack.postgres().data_dir.with_name(f"primary.restore-{inc}.job.json")
    restore_pid = stack.postgres().data_dir.with_name(f"primary.restore-{inc}.pid")
    first = spawn_worker(stack, queue, tmp_path / "worker1.log")
    second = None
    try:
        await wait_for_poller(client, queue, first)
        handle = await start_db_corruption(
            client,
            DatabaseCorruptionInput(incident_id=inc, database=DATABASE, heartbeat_timeout=timedelta(seconds=10)),
            queue,
        )
        await wait_for_approval_gate(handle)
        await handle.execute_update(
            DatabaseCorruptionRecovery.approve, ApprovalRequest(approver="alice", reason="crash drill")
        )
        await wait_for_activity(handle, "restore_base_backup")
        async with asyncio.timeout(120):
            while not restore_pid.exists():  # the restore child is running
                await asyncio.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()

        second = spawn_worker(stack, queue, tmp_path / "worker2.log")
        result = await asyncio.wait_for(handle.result(), timeout=RUN_WAIT)
    finally:
        for proc in (first, second):
            if proc and proc.poll() is None:
                proc.terminate()
                proc.wait()

    assert result.outcome == "recovered"
    assert {t: result.recovered_row_counts[t] for t in before} == before == row_counts(stack)
    assert json.loads(restore_job.read_text())["launches"] == 1  # adopted, not restored again
    # the killed attempt timed out; the second worker finished it
    assert (await activity_attempts(handle, "restore_base_backup"))[-1] == 2


async def test_run_waiting_for_approval_survives_a_temporal_server_restart(stack, client):
    """The approval wait is a durable timer in Temporal's own store, not in any process."""
    from tests.conftest import running_worker

    before = row_counts(stack)
    corrupt_table(stack.postgres(), DATABASE, "metrics")
    inc = f"RESTART-{uuid.uuid4().hex[:8]}"
    async with running_worker(client, stack) as queue:
        handle = await start_db_corruption(client, DatabaseCorruptionInput(incident_id=inc, database=DATABASE), queue)
        await wait_for_approval_gate(handle)
        stack.restart_temporal()  # same port, same --db-filename
        async with asyncio.timeout(120):
            while True:  # the client and the worker reconnect by themselves
                try:
                    progress = await handle.query(DatabaseCorruptionRecovery.progress)
                    break
                except Exception:  # noqa: BLE001 (server still starting)
                    await asyncio.sleep(0.5)
        assert progress.awaiting_approval == "restore"
        await handle.execute_update(
            DatabaseCorruptionRecovery.approve, ApprovalRequest(approver="alice", reason="after a server restart")
        )
        result = await asyncio.wait_for(handle.result(), timeout=RUN_WAIT)
    assert result.outcome == "recovered"
    assert {t: result.recovered_row_counts[t] for t in before} == before
