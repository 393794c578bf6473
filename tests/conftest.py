"""One embedded stack per test session: a real Temporal dev server, PostgreSQL 18
with WAL archiving to S3 through barman-cloud, moto and the demo app.

Each test runs its own worker on its own task queue against that stack.
"""

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
import pytest_asyncio
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from temporalio.service import RPCError, RPCStatusCode

from models.approval import ApprovalRequest
from stack.stack import DATABASE, STANDBY_NAME, Stack
from starters._start import wait_for_approval
from tests.deploy_helpers import dev_server  # noqa: F401 - the deployment tests' bare Temporal dev server fixture
from workers.main import build_worker
from workers.settings import Settings
from workers.temporal_client import connect
from workflows._runbook import Runbook

TABLES = ("public.companies", "public.filings", "public.metrics")
# Upper bound (s) for waiting on a state a run reaches (recovered, a result, a gate). Only a hang
# reaches it: a recovery on a loaded 2-core machine took 67 s for its replay alone, so a wait sized
# to a quiet machine's minute failed a run that was still progressing.
RUN_WAIT = 900


@pytest.fixture(scope="session")
def stack() -> Stack:
    # Not under pytest's tmp_path: that is mode 700 and the unprivileged server
    # user must reach the data directory.
    state = Path(tempfile.mkdtemp(prefix="drp-test-stack-"))
    os.chmod(state, 0o755)
    s = Stack(state, companies=200)
    try:
        s.up(with_worker=False, log=lambda *_: None)
        yield s
    finally:
        s.down(log=lambda *_: None)
        shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def own_stack(prefix: str, **kwargs):
    """A PostgreSQL primary + standby (with S3, Redis and the app, without Temporal) of a test's own, for
    tests that change which server is the primary; removed afterwards. `kwargs` go to Stack."""
    state = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(state, 0o755)  # the unprivileged server user must reach it (pytest's tmp_path is mode 700)
    s = Stack(state, **kwargs)
    try:
        s.up(with_worker=False, with_temporal=False, log=lambda *_: None)
        yield s
    finally:
        s.down(log=lambda *_: None)
        shutil.rmtree(state, ignore_errors=True)


def rebuild_standby(stack: Stack) -> None:
    """A fresh streaming standby of the stack's primary, the old directory moved aside: for tests that leave
    the session's standby promoted or unrebuildable (it shares the host, so a tablespace in the primary
    cannot be copied to the same path for it)."""
    standby = stack.standby()
    standby.stop(mode="immediate")
    if standby.data_dir.exists():
        standby.data_dir.rename(standby.data_dir.with_name(f"{standby.data_dir.name}.replaced-{uuid.uuid4().hex[:8]}"))
    stack.postgres().create_standby(standby.data_dir, STANDBY_NAME)
    standby.start()


@pytest_asyncio.fixture(scope="session")
async def client(stack):
    client = await connect(stack.temporal_address)
    yield client
    if os.environ.get("DRP_RECORD_HISTORIES") in ("1", "add"):  # see CONTRIBUTING.md
        await record_histories(client, replace=os.environ["DRP_RECORD_HISTORIES"] == "1")


async def record_histories(client, replace: bool) -> None:
    """Every closed run of the session, as `tests/histories/<WorkflowType>/<workflow ID>.json`
    (`WorkflowHistory.to_json()`), replacing what was recorded before unless `replace` is false:
    tests/test_replay.py replays them."""
    from tests.test_replay import HISTORIES, history_path

    for old in HISTORIES.glob("*/*.json") if replace else ():
        old.unlink()
    async for run in client.list_workflows("ExecutionStatus != 'Running'"):
        history = await client.get_workflow_handle(run.id, run_id=run.run_id).fetch_history()
        path = history_path(run.workflow_type, run.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(history.to_json())


def worker_settings(stack: Stack, task_queue: str, backup: dict | None = None) -> Settings:
    raw = stack.worker_settings()
    return Settings(**{**raw, "task_queue": task_queue, "backup": {**raw["backup"], **(backup or {})}})


@contextlib.asynccontextmanager
async def running_worker(client, stack: Stack, backup: dict | None = None, settings=None):
    """An in-process worker on a fresh task queue; yields the queue name. `backup` overrides backup
    settings; `settings(queue)`, when given, builds the whole Settings instead."""
    queue = f"test-{uuid.uuid4().hex[:10]}"
    try:
        with ThreadPoolExecutor(max_workers=8) as executor:
            async with build_worker(
                client, settings(queue) if settings else worker_settings(stack, queue, backup), executor
            ):
                yield queue
    finally:
        await terminate_runs(client, queue)


async def terminate_runs(client, queue: str) -> None:
    """End every run a test left open on its queue (a test that failed half-way): a run that still holds
    the database lock or waits for an approval must not reach into the next test."""
    async for run in client.list_workflows(f"TaskQueue = '{queue}' AND ExecutionStatus = 'Running'"):
        with contextlib.suppress(Exception):
            await client.get_workflow_handle(run.id, run_id=run.run_id).terminate(reason="the test ended")


def row_counts(stack: Stack) -> dict[str, int]:
    with stack.postgres().connect(DATABASE) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


def query_timed_out(err: RPCError) -> bool:
    """No worker answered a query in time: on a loaded machine one may still be starting or busy."""
    return err.status in (RPCStatusCode.CANCELLED, RPCStatusCode.DEADLINE_EXCEEDED) or "Timeout expired" in str(err)


async def wait_for_approval_gate(handle, step: str | None = None, timeout: float = RUN_WAIT) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                assert await wait_for_approval(handle, step), "the run ended before it asked for approval"
                return
            except RPCError as err:
                if not query_timed_out(err):
                    raise


async def approve_when_asked(
    handle, step: str | None = None, approver: str = "alice", reason: str = "approved in the test suite"
):
    await wait_for_approval_gate(handle, step)
    return await handle.execute_update(Runbook.approve, ApprovalRequest(approver=approver, reason=reason))


async def activity_attempts(handle, activity_type: str) -> list[int]:
    """The attempt number of every start of one activity type in a run's history."""
    history = [e async for e in handle.fetch_history_events()]
    scheduled = {
        e.event_id
        for e in history
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == activity_type
    }
    return [
        e.activity_task_started_event_attributes.attempt
        for e in history
        if e.HasField("activity_task_started_event_attributes")
        and e.activity_task_started_event_attributes.scheduled_event_id in scheduled
    ]


CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
BACKUP_REGION = "us-west-2"


@pytest.fixture(scope="session")
def aws():
    """A moto server for the AWS APIs the region runbooks call (RDS, Route53, CloudWatch, SNS, SQS)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def world(aws):
    """A primary RDS instance in us-east-1, its read replica in us-west-2, the zone, the topic."""
    tag = uuid.uuid4().hex[:6]
    east = boto3.client("rds", region_name="us-east-1", endpoint_url=aws, **CREDS)
    west = boto3.client("rds", region_name=BACKUP_REGION, endpoint_url=aws, **CREDS)
    primary = east.create_db_instance(
        DBInstanceIdentifier=f"ci-{tag}",
        Engine="postgres",
        AllocatedStorage=20,
        DBInstanceClass="db.t3.micro",
        MasterUsername="pg",
        MasterUserPassword="not-a-secret-1",
    )["DBInstance"]
    west.create_db_instance_read_replica(
        DBInstanceIdentifier=f"ci-{tag}-replica", SourceDBInstanceIdentifier=primary["DBInstanceArn"]
    )
    route53 = boto3.client("route53", region_name="us-east-1", endpoint_url=aws, **CREDS)
    zone = route53.create_hosted_zone(Name=f"ci{tag}.example.com", CallerReference=tag)["HostedZone"]["Id"]
    sns = boto3.client("sns", region_name="us-east-1", endpoint_url=aws, **CREDS)
    sqs = boto3.client("sqs", region_name="us-east-1", endpoint_url=aws, **CREDS)
    topic = sns.create_topic(Name=f"critical-alerts-{tag}")["TopicArn"]
    queue = sqs.create_queue(QueueName=f"pager-{tag}")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
    return {
        "tag": tag,
        "replica": f"ci-{tag}-replica",
        "zone": zone,
        "record": f"api.ci{tag}.example.com",
        "topic": topic,
        "queue": queue,
        "route53": route53,
        "sqs": sqs,
        "cloudwatch": boto3.client("cloudwatch", region_name=BACKUP_REGION, endpoint_url=aws, **CREDS),
    }


@pytest.fixture
def notify_world(aws):
    """SMTP, SNS (moto) and the Slack/Statuspage fakes an incident talks to (tests/notify_world.py)."""
    from tests.notify_world import NotifyWorld

    world = NotifyWorld(aws)
    yield world
    world.close()
