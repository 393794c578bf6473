"""Helpers of the deployment tests (encryption, secured clusters, metrics): a bare Temporal dev server
per test module (no PostgreSQL: these tests need only Temporal), raw histories, processes, ports."""

import asyncio
import base64
import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest_asyncio
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload, WorkflowExecution
from temporalio.api.workflowservice.v1 import GetWorkflowExecutionHistoryRequest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from tests.deploy_workflows import SecretEcho, echo
from workers.metrics import RunbookMetricsInterceptor
from workflows.search_attributes import INCIDENT_ID, PROCEDURE, SEVERITY, STATUS

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def dev_server():
    """A bare `temporal server start-dev` (in memory); yields its client without any codec (the raw view)."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(VENV_BIN / "temporal"),
        search_attributes=[INCIDENT_ID, PROCEDURE, SEVERITY, STATUS],
    )
    try:
        yield env.client
    finally:
        await env.shutdown()


def address(raw_client) -> str:
    return raw_client.service_client.config.target_host


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def queue() -> str:
    return f"deploy-{uuid.uuid4().hex[:10]}"


def worker(client, task_queue: str) -> Worker:
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[SecretEcho],
        activities=[echo],
        interceptors=[RunbookMetricsInterceptor()],
    )


async def raw_history(raw_client, workflow_id: str, run_id: str | None = None) -> list[Message]:
    """The history's events exactly as the Temporal frontend serves them (no data converter, no codec)."""
    events, token = [], b""
    while True:
        resp = await raw_client.workflow_service.get_workflow_execution_history(
            GetWorkflowExecutionHistoryRequest(
                namespace=raw_client.namespace,
                execution=WorkflowExecution(workflow_id=workflow_id, run_id=run_id or ""),
                next_page_token=token,
            )
        )
        events.extend(resp.history.events)
        token = resp.next_page_token
        if not token:
            return events


def payloads_in(message: Message) -> Iterator[Payload]:
    """Every Payload anywhere in a protobuf message (inputs, results, failures, headers, metadata)."""
    if isinstance(message, Payload):
        yield message
        return
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            for v in value.values():
                if isinstance(v, Message):
                    yield from payloads_in(v)
        elif isinstance(value, Message):
            yield from payloads_in(value)
        else:  # a repeated field
            for v in value:
                yield from payloads_in(v)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """An environment for a `drp` process: only these DRP_* settings (an empty settings file, so a local
    stack's settings.json is never picked up)."""
    empty = tmp_path / "settings.json"
    empty.write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRP_")}
    return {**env, "DRP_SETTINGS_FILE": str(empty), "PYTHONUNBUFFERED": "1", **variables}


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path):
    """A child process, its output in `log`; stopped (SIGTERM, then SIGKILL) at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until `url` answers 200 (the process started listening); fails early if the process died."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args} exited {proc.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer within {timeout}s: {log.read_text()[-2000:]}")
            await asyncio.sleep(0.2)
