"""RegionFailover end to end: moto for RDS, Route53, CloudWatch, SNS and SQS; kmock
for the backup region's Kubernetes API; local HTTP health endpoints for both regions."""

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import httpx
import kmock as kmock_module
import pytest
from kubernetes import client as k8s
from temporalio.client import WorkflowFailureError

from adapters import statuspage
from models.failover import DatabaseFailbackInput
from models.region import FailoverHalted, RegionFailbackInput, RegionFailoverInput
from starters.db_failback import start_db_failback
from starters.region_failback import start_region_failback
from starters.region_failover import start_region_failover
from tests.conftest import (
    CREDS,
    RUN_WAIT,
    activity_attempts,
    approve_when_asked,
    own_stack,
    running_worker,
    wait_for_approval_gate,
)
from tests.fakes import FakeStatuspage
from tests.test_crash_survival import ROOT, spawn_worker, wait_for_activity
from tests.test_kubernetes_platform import api_client, fake_deployment_controller
from workers.main import build_worker
from workers.settings import Settings

BACKUP = "us-west-2"
NS, NAME = "corporate-intel", "corporate-intel-api"


class Health:
    """A region's /health: answers `status`, or refuses connections when status is None."""

    def __init__(self, status: int | None):
        self.status = status
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(outer.status or 503)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/health"

    def close(self):
        self.server.shutdown()


def replica_lag(world, seconds: float) -> None:
    world["cloudwatch"].put_metric_data(
        Namespace="AWS/RDS",
        MetricData=[
            {
                "MetricName": "ReplicaLag",
                "Value": seconds,
                "Timestamp": datetime.now(UTC),
                "Dimensions": [{"Name": "DBInstanceIdentifier", "Value": world["replica"]}],
            }
        ],
    )


def settings_for(
    stack,
    aws,
    world,
    kmock,
    primary: Health,
    backup: Health,
    queue: str,
    home_kmock=None,
    status_page: FakeStatuspage | None = None,
    **region,
) -> Settings:
    return Settings(**raw_settings(stack, aws, world, kmock, primary, backup, queue, home_kmock, status_page, **region))


def raw_settings(
    stack,
    aws,
    world,
    kmock,
    primary: Health,
    backup: Health,
    queue: str,
    home_kmock=None,
    status_page: FakeStatuspage | None = None,
    **region,
) -> dict:
    base = {**stack.worker_settings(), "task_queue": queue}
    base["failover"] = {
        "primary_health_url": primary.url,
        "hosted_zone_id": world["zone"],
        "record_name": world["record"],
        "sns_topic_arn": world["topic"],
        "aws_endpoint_url": aws,
        "max_replica_lag_seconds": 60,
        "regions": {
            BACKUP: {
                "task_queue": f"{queue}-{BACKUP}",
                "health_url": backup.url,
                "rds_replica_id": world["replica"],
                "replicas": 4,
                "kubernetes": {"api_url": str(kmock.url).rstrip("/"), "namespace": NS, "deployment": NAME},
                "load_balancer_dns": "backup-lb.us-west-2.elb.amazonaws.com",
                "load_balancer_zone_id": "Z0987654321XYZ",
                **region,
            }
        },
    }
    if status_page is not None:
        base["failover"].update(status_page_url=status_page.url, status_page_token=status_page.TOKEN)
    if home_kmock is not None:  # the primary region, for the way home
        base["failover"]["regions"]["us-east-1"] = {
            "task_queue": f"{queue}-us-east-1",
            "health_url": primary.url,
            "rds_replica_id": f"ci-{world['tag']}-home",
            "replicas": 6,
            "kubernetes": {"api_url": str(home_kmock.url).rstrip("/"), "namespace": NS, "deployment": NAME},
            "load_balancer_dns": "primary-lb.us-east-1.elb.amazonaws.com",
            "load_balancer_zone_id": "Z35SXDOTRQ7X7K",
        }
    return base


@contextlib.asynccontextmanager
async def region_workers(client, settings: Settings):
    """A worker on the default queue and one per region on that region's queue."""
    regional = [settings.model_copy(update={"task_queue": r.task_queue}) for r in settings.failover.regions.values()]
    with ThreadPoolExecutor(max_workers=12) as executor:
        async with contextlib.AsyncExitStack() as workers:
            for s in (settings, *regional):
                await workers.enter_async_context(build_worker(client, s, executor))
            yield settings.task_queue


async def deploy_backup(kmock, replicas: int = 0) -> None:
    apps = k8s.AppsV1Api(api_client(kmock))
    await asyncio.to_thread(
        apps.create_namespaced_deployment,
        NS,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": "ci"}},
                "template": {
                    "metadata": {"labels": {"app": "ci"}},
                    "spec": {"containers": [{"name": "api", "image": "api:1"}]},
                },
            },
            "status": {"readyReplicas": replicas},
        },
    )
    # One pod, so that kmock knows the pods resource (a real API server lists an empty namespace as []).
    await asyncio.to_thread(
        k8s.CoreV1Api(api_client(kmock)).create_namespaced_pod,
        NS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{NAME}-0", "namespace": NS, "labels": {"app": "ci"}},
        },
    )


def only_ns_and_soa(route53, zone: str) -> bool:
    sets = route53.list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]
    return {r["Type"] for r in sets} <= {"NS", "SOA"}


CHANGES = {
    "promote_rds_replica",
    "fence_primary",
    "promote_standby",
    "switch_dns",
    "scale_region",
    "create_home_replica",
    "scale_down_region",
    "notify_failover",
}


async def scheduled(handle) -> list[str]:
    """The activity types a run scheduled, in order (moto's RDS shows no trace of a promotion: the history
    is where a promotion shows)."""
    return [
        e.activity_task_scheduled_event_attributes.activity_type.name
        async for e in handle.fetch_history_events()
        if e.HasField("activity_task_scheduled_event_attributes")
    ]


def rds_instances(aws, region: str) -> set[str]:
    rds = boto3.client("rds", region_name=region, endpoint_url=aws, **CREDS)
    return {i["DBInstanceIdentifier"] for i in rds.describe_db_instances()["DBInstances"]}


def record(world):
    sets = world["route53"].list_resource_record_sets(HostedZoneId=world["zone"])["ResourceRecordSets"]
    return [r for r in sets if r["Name"].rstrip(".") == world["record"]]


async def test_failover_to_the_backup_region(stack, client, aws, world, kmock):
    primary, backup = Health(None), Health(200)  # the primary region is gone
    status_page = FakeStatuspage()
    await deploy_backup(kmock)
    replica_lag(world, 2)
    stop = asyncio.Event()
    controller = asyncio.create_task(fake_deployment_controller(kmock, stop, NS, NAME))
    try:
        settings = settings_for(
            stack, aws, world, kmock, primary, backup, f"rf-{uuid.uuid4().hex[:8]}", status_page=status_page
        )
        async with region_workers(client, settings) as queue:
            handle = await start_region_failover(
                client,
                RegionFailoverInput(
                    incident_id=f"RF-{world['tag']}",
                    backup_region=BACKUP,
                    health_checks=2,
                    health_check_spacing=timedelta(milliseconds=100),
                ),
                queue,
            )
            await wait_for_approval_gate(handle)
            assert not record(world)  # nothing changed before the approval
            await approve_when_asked(handle, approver="alice", reason="us-east-1 down")
            result = await handle.result()
    finally:
        stop.set()
        await controller
        primary.close()
        backup.close()

    assert result.replica_lag_seconds == 2 and result.promoted.replica_id == world["replica"]
    [dns] = record(world)
    assert dns["AliasTarget"]["DNSName"].rstrip(".") == "backup-lb.us-west-2.elb.amazonaws.com"
    assert result.dns.status == "INSYNC"
    dep = await asyncio.to_thread(k8s.AppsV1Api(api_client(kmock)).read_namespaced_deployment, NAME, NS)
    assert dep.spec.replicas == 4
    messages = world["sqs"].receive_message(QueueUrl=world["queue"], WaitTimeSeconds=1)["Messages"]
    assert "us-west-2" in json.loads(messages[0]["Body"])["Subject"]
    # Steps 5-9 ran on the backup region's queue.
    history = [e async for e in handle.fetch_history_events()]
    scheduled = [
        e.activity_task_scheduled_event_attributes
        for e in history
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    queues = {a.activity_type.name: a.task_queue.name for a in scheduled}
    assert queues["promote_rds_replica"] == queues["switch_dns"] == f"{queue}-{BACKUP}"
    assert queues["verify_primary_down"] == queue
    [incident] = status_page.incidents.values()
    assert f"RF-{world['tag']}" in incident["name"] and incident["status"] == "identified"
    assert result.notified.status_page_incident == incident["id"]


def test_status_page_incident_is_opened_once_and_updated_on_a_retry():
    page = FakeStatuspage()
    with httpx.Client() as http:
        first = statuspage.open_or_update(http, page.url, page.TOKEN, "INC-9", "Failover", "serving from us-west-2")
        statuspage.open_or_update(http, page.url, page.TOKEN, "INC-90", "Other", "an incident named alike")
        again = statuspage.open_or_update(http, page.url, page.TOKEN, "INC-9", "Failover", "still serving")
        with pytest.raises(httpx.HTTPStatusError):
            statuspage.open_or_update(http, page.url, "wrong-token", "INC-9", "Failover", "x")
    assert first == again and len(page.incidents) == 2
    assert [c.split()[0] for c in page.calls] == ["GET", "POST", "GET", "POST", "GET", "PATCH", "GET"]
    assert page.incidents[first]["body"] == "still serving"


async def test_the_api_record_can_be_a_plain_a_record(stack, client, aws, world, kmock):
    primary, backup = Health(None), Health(200)
    await deploy_backup(kmock)
    replica_lag(world, 1)
    stop = asyncio.Event()
    controller = asyncio.create_task(fake_deployment_controller(kmock, stop, NS, NAME))
    raw = raw_settings(
        stack,
        aws,
        world,
        kmock,
        primary,
        backup,
        f"ra-{uuid.uuid4().hex[:8]}",
        load_balancer_dns=None,
        load_balancer_zone_id=None,
        load_balancer_ips=["203.0.113.10"],
    )
    try:
        async with region_workers(client, Settings(**raw)) as queue:
            handle = await start_region_failover(
                client,
                RegionFailoverInput(incident_id=f"RA-{world['tag']}", backup_region=BACKUP, health_checks=1),
                queue,
            )
            await approve_when_asked(handle, approver="alice", reason="go")
            await handle.result()
    finally:
        stop.set()
        await controller
        primary.close()
        backup.close()
    [dns] = record(world)
    assert dns["ResourceRecords"] == [{"Value": "203.0.113.10"}] and "AliasTarget" not in dns


@pytest.mark.parametrize(
    "case",
    ["primary healthy", "replica lagging", "unknown region", "unknown replica", "unknown zone", "record outside zone"],
)
async def test_refusals_change_nothing(stack, client, aws, world, kmock, case):
    primary, backup = Health(200 if case == "primary healthy" else None), Health(200)
    await deploy_backup(kmock)
    replica_lag(world, 900 if case == "replica lagging" else 1)
    region = {"rds_replica_id": "no-such-replica"} if case == "unknown replica" else {}
    zone = world["zone"]
    if case == "unknown zone":
        world = {**world, "zone": "ZNOSUCHZONE"}
    if case == "record outside zone":  # Route53 would reject it, but only after the promotion
        world = {**world, "record": "api.elsewhere.example.org"}
    settings = settings_for(stack, aws, world, kmock, primary, backup, f"rf-{uuid.uuid4().hex[:8]}", **region)
    try:
        async with region_workers(client, settings) as queue:
            handle = await start_region_failover(
                client,
                RegionFailoverInput(
                    incident_id=f"RF-{uuid.uuid4().hex[:6]}",
                    backup_region="eu-west-1" if case == "unknown region" else BACKUP,
                    health_checks=2,
                    health_check_spacing=timedelta(milliseconds=100),
                ),
                queue,
            )
            with pytest.raises(WorkflowFailureError) as failed:
                await handle.result()
    finally:
        primary.close()
        backup.close()
    expected = {
        "primary healthy": "PrimaryHealthy",
        "replica lagging": "ReplicaLagging",
        "unknown region": "UnknownRegion",
        "unknown replica": "UnknownReplica",
        "unknown zone": "UnknownHostedZone",
        "record outside zone": "RecordOutsideZone",
    }[case]
    assert failed.value.cause.cause.type == expected
    if case == "record outside zone":
        assert "api.elsewhere.example.org" in failed.value.cause.cause.message
        assert await activity_attempts(handle, "plan_region_failover") == [1]  # refused at once, in the plan
    assert only_ns_and_soa(world["route53"], zone)
    assert not CHANGES & set(await scheduled(handle))  # nothing promoted, switched or scaled
    dep = await asyncio.to_thread(k8s.AppsV1Api(api_client(kmock)).read_namespaced_deployment, NAME, NS)
    assert dep.spec.replicas == 0


async def test_failback_brings_traffic_home(stack, client, aws, world, kmock):
    """Fail over to us-west-2, then, with us-east-1 back, RegionFailback returns: a new replica of the
    serving instance at home, promoted, DNS home, home cluster up, backup cluster down."""
    primary, backup = Health(None), Health(200)
    replica_lag(world, 1)
    async with kmock_module.KubernetesEmulator() as home_kmock, kmock_module.Server(home_kmock):
        await deploy_backup(kmock)
        await deploy_backup(home_kmock, replicas=0)
        stop = asyncio.Event()
        controllers = [asyncio.create_task(fake_deployment_controller(k, stop, NS, NAME)) for k in (kmock, home_kmock)]
        try:
            settings = settings_for(
                stack, aws, world, kmock, primary, backup, f"rb-{uuid.uuid4().hex[:8]}", home_kmock=home_kmock
            )
            async with region_workers(client, settings) as queue:
                inc = f"RB-{world['tag']}"
                failover = await start_region_failover(
                    client, RegionFailoverInput(incident_id=inc, backup_region=BACKUP, health_checks=1), queue
                )
                await approve_when_asked(failover, approver="alice", reason="go")
                assert "starters.region_failback" in (await failover.result()).failback
                primary.status = 200  # the primary region is back
                failback = await start_region_failback(
                    client, RegionFailbackInput(incident_id=inc, serving_region=BACKUP), queue
                )
                await approve_when_asked(failback, approver="alice", reason="go")
                result = await failback.result()
        finally:
            stop.set()
            await asyncio.gather(*controllers)
            primary.close()
            backup.close()
        home_dep = await asyncio.to_thread(k8s.AppsV1Api(api_client(home_kmock)).read_namespaced_deployment, NAME, NS)
    assert result.replica.created and result.replica.replica_id == f"ci-{world['tag']}-home"
    [dns] = record(world)
    assert dns["AliasTarget"]["DNSName"].rstrip(".") == "primary-lb.us-east-1.elb.amazonaws.com"
    assert home_dep.spec.replicas == 6
    away = await asyncio.to_thread(k8s.AppsV1Api(api_client(kmock)).read_namespaced_deployment, NAME, NS)
    assert away.spec.replicas == 0
    east = boto3.client("rds", region_name="us-east-1", endpoint_url=aws, **CREDS)
    assert east.describe_db_instances(DBInstanceIdentifier=result.replica.replica_id)["DBInstances"]


async def test_failover_survives_a_killed_backup_worker_and_a_server_restart(
    stack, client, aws, world, kmock, tmp_path
):
    """The backup region's worker is SIGKILLed once the replica is promoted and the Temporal server
    restarts; a new worker finishes the run and the promotion is not done again."""
    primary, backup = Health(None), Health(200)
    await deploy_backup(kmock)
    replica_lag(world, 1)
    stop = asyncio.Event()
    controller = asyncio.create_task(fake_deployment_controller(kmock, stop, NS, NAME))
    queue = f"rk-{uuid.uuid4().hex[:8]}"
    raw = raw_settings(stack, aws, world, kmock, primary, backup, queue)
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps(raw))
    backup_queue = raw["failover"]["regions"][BACKUP]["task_queue"]

    def backup_worker(log: str) -> subprocess.Popen:
        env = {
            **os.environ,
            "DRP_SETTINGS_FILE": str(settings_file),
            "DRP_TASK_QUEUE": backup_queue,
            "PYTHONPATH": str(ROOT),
        }
        return subprocess.Popen(
            [sys.executable, "-m", "workers.main"],
            env=env,
            cwd=ROOT,
            stdout=open(tmp_path / log, "ab"),
            stderr=subprocess.STDOUT,
        )

    first, second = backup_worker("w1.log"), None
    try:
        with ThreadPoolExecutor(max_workers=8) as executor:
            async with build_worker(client, Settings(**raw), executor):
                handle = await start_region_failover(
                    client,
                    RegionFailoverInput(
                        incident_id=f"RK-{world['tag']}",
                        backup_region=BACKUP,
                        health_checks=1,
                        heartbeat_timeout=timedelta(seconds=10),
                    ),
                    queue,
                )
                await approve_when_asked(handle, approver="alice", reason="go")
                async with asyncio.timeout(RUN_WAIT):
                    while not await completed(handle, "promote_rds_replica"):
                        await asyncio.sleep(0.05)
                first.kill()
                first.wait()
                stack.restart_temporal()
                second = backup_worker("w2.log")
                result = await asyncio.wait_for(handle.result(), timeout=RUN_WAIT)
    finally:
        for proc in (first, second):
            if proc and proc.poll() is None:
                proc.terminate()
                proc.wait()
        stop.set()
        await controller
        primary.close()
        backup.close()
    assert await activity_attempts(handle, "promote_rds_replica") == [1]  # promoted once, never again
    # INSYNC when the DNS step reported its change; CURRENT when the restart cut off that report (or the
    # heartbeat holding the change's Id) and the retry found the record already pointing at the target,
    # submitting nothing (a clean-clone CI run saw this). Either way the record below is the target.
    assert result.dns.status in ("INSYNC", "CURRENT")
    [dns] = record(world)
    assert dns["AliasTarget"]["DNSName"].rstrip(".") == "backup-lb.us-west-2.elb.amazonaws.com"


async def completed(handle, activity_type: str) -> bool:
    history = [e async for e in handle.fetch_history_events()]
    scheduled = {
        e.event_id
        for e in history
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == activity_type
    }
    return any(
        e.activity_task_completed_event_attributes.scheduled_event_id in scheduled
        for e in history
        if e.HasField("activity_task_completed_event_attributes")
    )


class FakeApp:
    """FAKE application: a real one cannot reach an RDS endpoint that moto only describes. Answers the
    health check, and a write check as an app connected to a server on port 5432 would."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                self._reply(200, {"status": "ok"})

            def do_POST(self):  # noqa: N802
                self._reply(201, {"id": 1, "server_port": 5432})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"


@pytest.mark.parametrize("lag, outcome", [(2, "promoted"), (900, "StandbyLagging")])
async def test_database_failover_to_an_rds_replica(stack, client, aws, world, kmock, lag, outcome):
    """DatabaseFailover with the `rds` target: replica checked (CloudWatch lag), promoted, the
    Deployment repointed at its endpoint and restarted, a write verified through the app."""
    from models.failover import DatabaseFailoverInput
    from starters.db_failover import start_db_failover
    from workflows.db_failover import DatabaseFailover

    app = FakeApp()
    await deploy_backup(kmock, replicas=2)
    replica_lag(world, lag)
    stop = asyncio.Event()
    controller = asyncio.create_task(fake_deployment_controller(kmock, stop, NS, NAME))
    raw = {
        **stack.worker_settings(),
        "task_queue": f"rds-{uuid.uuid4().hex[:8]}",
        "rds": {"region": BACKUP, "replica_id": world["replica"], "aws_endpoint_url": aws},
        "platform": {
            "kind": "kubernetes",
            "kubernetes": {"api_url": str(kmock.url).rstrip("/"), "namespace": NS, "deployment": NAME},
        },
        "app": {
            "health_url": f"{app.url}/health",
            "critical_url": f"{app.url}/api/v1/companies",
            "write_check_url": f"{app.url}/api/v1/write-check",
        },
    }
    try:
        with ThreadPoolExecutor(max_workers=8) as executor:
            async with build_worker(client, Settings(**raw), executor):
                handle = await start_db_failover(
                    client, DatabaseFailoverInput(incident_id=f"RDS-{uuid.uuid4().hex[:6]}"), raw["task_queue"]
                )
                if outcome == "promoted":
                    await approve_when_asked(handle, approver="alice", reason="go")
                    result = await handle.result()
                    progress = await handle.query(DatabaseFailover.progress)
                else:
                    with pytest.raises(WorkflowFailureError) as failed:
                        await handle.result()
    finally:
        stop.set()
        await controller
        app.server.shutdown()
    dep = await asyncio.to_thread(k8s.AppsV1Api(api_client(kmock)).read_namespaced_deployment, NAME, NS)
    if outcome != "promoted":
        assert failed.value.cause.cause.type == outcome and dep.spec.replicas == 2
        return
    env = {e.name: e.value for e in dep.spec.template.spec.containers[0].env}
    assert env["POSTGRES_HOST"] == result.before.host and result.before.host.startswith(world["replica"])
    assert env["POSTGRES_PORT"] == "5432" and dep.spec.replicas == 2
    assert result.before.lag_seconds == 2 and result.write_check.served_by_port == 5432
    # The Web UI's "Step n/N" counted this path's steps (no fencing of an RDS primary): n reached N.
    assert progress.total_steps == len(result.steps) == 7 and "fence old primary" not in {s.name for s in result.steps}


# --- failover paths: what a run refuses before any change, what it says after one, and DNS done once ---

ROUTE53_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?><ErrorResponse xmlns="https://route53.amazonaws.com/doc/'
    '2013-04-01/"><Error><Type>Sender</Type><Code>InvalidChangeBatch</Code><Message>{}</Message></Error>'
    "<RequestId>injected</RequestId></ErrorResponse>"
)


class AwsProxy:
    """A real HTTP hop in front of moto for the region workers. It counts the Route53 change batches
    that reach the server and injects what moto does not model: a change Route53 rejects
    (`reject`), and changes that stay PENDING while `pending` is set (moto's are INSYNC at once and
    all share one Id, so each accepted batch gets its own Id here)."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.changes: list[str] = []  # the Id of every accepted ChangeResourceRecordSets
        self.rejected = 0
        self.reject: str | None = None
        self.pending = threading.Event()
        self.lock = threading.Lock()
        http = httpx.Client(timeout=30)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, status: int, body: bytes, content_type: str | None) -> None:
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                change = self.command == "POST" and re.search(r"/hostedzone/[^/]+/rrset/?$", self.path)
                if change and outer.reject:
                    with outer.lock:
                        outer.rejected += 1
                    return self._send(400, ROUTE53_ERROR.format(outer.reject).encode(), "text/xml")
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "content-length", "connection", "accept-encoding")
                }
                resp = http.request(self.command, outer.upstream + self.path, content=body, headers=headers)
                data = resp.content
                if change and resp.status_code == 200:
                    with outer.lock:
                        outer.changes.append(f"/change/DRP{len(outer.changes) + 1}")
                        data = re.sub(rb"<Id>[^<]*</Id>", f"<Id>{outer.changes[-1]}</Id>".encode(), data)
                if "/change/" in self.path:  # Route53 answers GetChange with the full Id; moto echoes the bare one
                    data = re.sub(rb"<Id>(?!/change/)", b"<Id>/change/", data)
                if (change or "/change/" in self.path) and outer.pending.is_set():
                    data = data.replace(b"<Status>INSYNC</Status>", b"<Status>PENDING</Status>")
                self._send(resp.status_code, data, resp.headers.get("content-type"))

            do_GET = do_POST = do_PUT = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self):
        self.server.shutdown()


def halted(failed: pytest.ExceptionInfo) -> FailoverHalted:
    """The details of a run that failed after it changed something; the error is the workflow's own
    (no cause), so the incident's timeline shows its message."""
    err = failed.value.cause
    assert err.cause is None and err.non_retryable
    return FailoverHalted.model_validate(err.details[0])


@pytest.fixture(scope="module")
def pg_pair():
    """A PostgreSQL primary + streaming standby of its own: the self-managed path fences and promotes.
    Asynchronous: with a synchronous standby, DatabaseFailback after a clean fence promotes the old primary
    with synchronous_standby_names still set, and its write check waits on a standby it rejoins only
    after that check (a DatabaseFailback issue, not the region runbook's)."""
    with own_stack("drp-test-region-", companies=20) as s:
        yield s


def in_recovery(server) -> bool:
    with server.connect() as conn:
        return conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]


async def test_dns_rejected_after_the_promotion_says_what_was_done_and_a_rerun_goes_on(
    stack, client, aws, world, kmock
):
    """Route53 rejects the change after the RDS replica was promoted (injected: moto accepts it). The run
    fails as DnsChangeRejected saying the replica is promoted, DNS and the cluster untouched, and the
    command that goes on; that command, once the cause is fixed, finishes without promoting again."""
    primary, backup = Health(None), Health(200)
    proxy = AwsProxy(aws)
    proxy.reject = "RRSet of type A with DNS name api is not permitted because a conflicting RRSet exists"
    await deploy_backup(kmock)
    replica_lag(world, 1)
    stop = asyncio.Event()
    controller = asyncio.create_task(fake_deployment_controller(kmock, stop, NS, NAME))
    inc = f"RD-{world['tag']}"
    try:
        settings = settings_for(stack, proxy.url, world, kmock, primary, backup, f"rd-{uuid.uuid4().hex[:8]}")
        async with region_workers(client, settings) as queue:
            inp = RegionFailoverInput(incident_id=inc, backup_region=BACKUP, health_checks=1)
            handle = await start_region_failover(client, inp, queue)
            await approve_when_asked(handle, approver="alice", reason="go")
            with pytest.raises(WorkflowFailureError) as failed:
                await handle.result()
            assert failed.value.cause.type == "DnsChangeRejected"
            details = halted(failed)
            assert only_ns_and_soa(world["route53"], world["zone"])
            assert await activity_attempts(handle, "promote_rds_replica") == [1]
            assert CHANGES & set(await scheduled(handle)) == {"promote_rds_replica", "switch_dns"}
            dep = await asyncio.to_thread(k8s.AppsV1Api(api_client(kmock)).read_namespaced_deployment, NAME, NS)
            assert dep.spec.replicas == 0

            proxy.reject = None  # the cause fixed; the command from the message goes on
            assert f"--incident {inc} --backup-region {BACKUP}" in details.next_command
            again = await start_region_failover(client, inp, queue)
            await approve_when_asked(again, approver="alice", reason="record fixed")
            result = await again.result()
    finally:
        stop.set()
        await controller
        primary.close()
        backup.close()
        proxy.close()
    assert details.failed_step == "switch DNS" and details.error_type == "DnsChangeRejected"
    assert "conflicting RRSet" in details.error
    [promoted] = details.done
    assert world["replica"] in promoted and "promoted" in promoted and "UTC)" in promoted  # with its timing
    assert details.not_done == ["switch DNS", "scale backup region", "verify backup region", "notify"]
    assert "promoted and writable" in details.production
    assert "still points at the primary region" in details.production and "not scaled up" in details.production
    assert [(r.name, r.outcome) for r in details.steps][-2:] == [("promote replica", "ok"), ("switch DNS", "failed")]
    message = failed.value.cause.message
    assert all(part in message for part in ("DONE:", "NOT DONE:", "PRODUCTION NOW:", "NEXT:"))
    assert result.promoted.replica_id == world["replica"] and result.dns.status == "INSYNC"
    assert proxy.rejected == 1 and len(proxy.changes) == 1
    [dns] = record(world)
    assert dns["AliasTarget"]["DNSName"].rstrip(".") == "backup-lb.us-west-2.elb.amazonaws.com"


async def test_self_managed_dns_rejected_after_fence_and_promotion_then_the_way_back(
    pg_pair, client, aws, world, kmock
):
    """Self-managed path: the fence is a recorded step; Route53 rejects the change after the fence and the
    promotion. The error says the old primary is fenced and the standby is the primary; its way back,
    DatabaseFailback, makes the old primary the primary again."""
    primary, standby = pg_pair.postgres(), pg_pair.standby()
    down, backup = Health(None), Health(200)
    proxy = AwsProxy(aws)
    proxy.reject = "injected rejection"
    await deploy_backup(kmock)
    raw = raw_settings(pg_pair, proxy.url, world, kmock, down, backup, f"rs-{uuid.uuid4().hex[:8]}")
    raw["failover"]["database"] = "self-managed"
    inc = f"RS-{world['tag']}"
    try:
        async with region_workers(client, Settings(**raw)) as queue:
            handle = await start_region_failover(
                client, RegionFailoverInput(incident_id=inc, backup_region=BACKUP, health_checks=1), queue
            )
            await approve_when_asked(handle, approver="alice", reason="region down")
            with pytest.raises(WorkflowFailureError) as failed:
                await handle.result()
    finally:
        down.close()
        backup.close()
        proxy.close()
    assert failed.value.cause.type == "DnsChangeRejected"
    details = halted(failed)
    steps = {r.name: r for r in details.steps}
    assert (
        steps["fence old primary"].outcome == "ok"
        and steps["fence old primary"].ended_at > steps["fence old primary"].started_at
    )
    assert [r.name for r in details.steps][-3:] == ["fence old primary", "promote replica", "switch DNS"]
    assert len(details.done) == 2 and "fenced" in details.done[0] and "promoted" in details.done[1]
    assert "old primary is stopped and fenced" in details.production and "is the primary" in details.production
    assert f"starters.db_failback --incident {inc}" in details.way_back
    assert not primary.is_running() and (primary.data_dir / "standby.signal").exists()
    assert not in_recovery(standby) and only_ns_and_soa(world["route53"], world["zone"])

    async with running_worker(client, pg_pair) as queue:  # the way back the error names
        back = await start_db_failback(client, DatabaseFailbackInput(incident_id=inc), queue)
        await approve_when_asked(back, approver="bob", reason="dns failed, back home")
        await back.result()
    assert not in_recovery(primary) and in_recovery(standby)


@pytest.mark.parametrize("case", ["record outside zone", "no standby", "failback"])
async def test_self_managed_refusals_change_nothing(stack, client, aws, world, kmock, case):
    """Checked in the plan, before any fence: the record is in the zone, a standby exists; and
    RegionFailback after a self-managed failover refuses at once (no RDS call for a home replica that
    cannot exist), naming DatabaseFailback."""
    primary, backup = Health(None), Health(200)
    await deploy_backup(kmock)
    if case == "record outside zone":
        world = {**world, "record": "api.elsewhere.example.org"}
    raw = raw_settings(stack, aws, world, kmock, primary, backup, f"rm-{uuid.uuid4().hex[:8]}", home_kmock=kmock)
    raw["failover"]["database"] = "self-managed"
    if case == "no standby":
        raw["standby"] = None
    east_before = rds_instances(aws, "us-east-1")
    inc = f"RM-{uuid.uuid4().hex[:6]}"
    try:
        async with region_workers(client, Settings(**raw)) as queue:
            if case == "failback":
                handle = await start_region_failback(
                    client, RegionFailbackInput(incident_id=inc, serving_region=BACKUP), queue
                )
            else:
                handle = await start_region_failover(
                    client, RegionFailoverInput(incident_id=inc, backup_region=BACKUP, health_checks=1), queue
                )
            with pytest.raises(WorkflowFailureError) as failed:
                await handle.result()
    finally:
        primary.close()
        backup.close()
    err = failed.value.cause.cause
    assert (
        err.type
        == {"record outside zone": "RecordOutsideZone", "no standby": "NoStandby", "failback": "FailbackNotSupported"}[
            case
        ]
    )
    plan = "plan_region_failback" if case == "failback" else "plan_region_failover"
    assert await activity_attempts(handle, plan) == [1]  # refused at once, not retried
    assert not CHANGES & set(await scheduled(handle))
    if case == "failback":
        assert f"starters.db_failback --incident {inc}" in err.message and "Nothing was changed" in err.message
    assert rds_instances(aws, "us-east-1") == east_before  # no home replica
    assert stack.postgres().is_running() and in_recovery(stack.standby())
    assert only_ns_and_soa(world["route53"], world["zone"])
    dep = await asyncio.to_thread(k8s.AppsV1Api(api_client(kmock)).read_namespaced_deployment, NAME, NS)
    assert dep.spec.replicas == 0


async def test_a_retried_dns_step_waits_on_the_change_it_submitted(stack, client, aws, world, kmock, tmp_path):
    """The backup region's worker is SIGKILLed while its Route53 change is PENDING. The retry on a new
    worker finds the change Id in the heartbeat details and waits on it: one change batch in all."""
    primary, backup = Health(None), Health(200)
    proxy = AwsProxy(aws)
    proxy.pending.set()
    await deploy_backup(kmock)
    replica_lag(world, 1)
    stop = asyncio.Event()
    controller = asyncio.create_task(fake_deployment_controller(kmock, stop, NS, NAME))
    queue = f"rn-{uuid.uuid4().hex[:8]}"
    raw = raw_settings(stack, proxy.url, world, kmock, primary, backup, queue)
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps(raw))
    backup_queue = raw["failover"]["regions"][BACKUP]["task_queue"]
    env = {"DRP_SETTINGS_FILE": str(settings_file)}
    first, second = spawn_worker(stack, backup_queue, tmp_path / "w1.log", env), None
    try:
        with ThreadPoolExecutor(max_workers=8) as executor:
            async with build_worker(client, Settings(**raw), executor):
                handle = await start_region_failover(
                    client,
                    RegionFailoverInput(
                        incident_id=f"RN-{world['tag']}",
                        backup_region=BACKUP,
                        health_checks=1,
                        heartbeat_timeout=timedelta(seconds=3),
                    ),
                    queue,
                )
                await approve_when_asked(handle, approver="alice", reason="go")
                async with asyncio.timeout(RUN_WAIT):  # submitted, and its Id is on the server
                    while not (proxy.changes and b"/change/DRP1" in await heartbeat(handle, "switch_dns")):
                        await asyncio.sleep(0.1)
                first.kill()
                first.wait()
                second = spawn_worker(stack, backup_queue, tmp_path / "w2.log", env)
                async with asyncio.timeout(RUN_WAIT):  # the second attempt runs (and waits on the change)
                    while (await wait_for_activity(handle, "switch_dns")).attempt < 2:
                        await asyncio.sleep(0.1)
                proxy.pending.clear()  # Route53 reports the change INSYNC
                result = await asyncio.wait_for(handle.result(), timeout=RUN_WAIT)
    finally:
        for proc in (first, second):
            if proc and proc.poll() is None:
                proc.terminate()
                proc.wait()
        stop.set()
        await controller
        primary.close()
        backup.close()
        proxy.close()
    assert await activity_attempts(handle, "switch_dns") == [2]  # the attempt that completed
    assert proxy.changes == ["/change/DRP1"]  # one batch, not one per attempt
    assert result.dns.change_id == "/change/DRP1" and result.dns.resumed and result.dns.status == "INSYNC"
    [dns] = record(world)
    assert dns["AliasTarget"]["DNSName"].rstrip(".") == "backup-lb.us-west-2.elb.amazonaws.com"


async def heartbeat(handle, activity_type: str) -> bytes:
    """The raw heartbeat details of a running activity (b"" when none)."""
    desc = await handle.describe()
    return b"".join(
        p.data
        for a in desc.raw_description.pending_activities
        if a.activity_type.name == activity_type
        for p in a.heartbeat_details.payloads
    )


async def test_a_record_already_at_the_target_is_not_submitted_again(stack, client, aws, world, kmock):
    """A DNS step that finds the record already pointing at the target (a person switched it, or an
    earlier attempt did before its Id was recorded) submits nothing."""
    primary, backup = Health(None), Health(200)
    proxy = AwsProxy(aws)
    await deploy_backup(kmock)
    replica_lag(world, 1)
    world["route53"].change_resource_record_sets(
        HostedZoneId=world["zone"],
        ChangeBatch={
            "Changes": [
                {
                    "Action": "UPSERT",
                    "ResourceRecordSet": {
                        "Name": world["record"],
                        "Type": "A",
                        "AliasTarget": {
                            "HostedZoneId": "Z0987654321XYZ",
                            "DNSName": "backup-lb.us-west-2.elb.amazonaws.com",
                            "EvaluateTargetHealth": True,
                        },
                    },
                }
            ]
        },
    )
    stop = asyncio.Event()
    controller = asyncio.create_task(fake_deployment_controller(kmock, stop, NS, NAME))
    try:
        settings = settings_for(stack, proxy.url, world, kmock, primary, backup, f"rc-{uuid.uuid4().hex[:8]}")
        async with region_workers(client, settings) as queue:
            handle = await start_region_failover(
                client,
                RegionFailoverInput(incident_id=f"RC-{world['tag']}", backup_region=BACKUP, health_checks=1),
                queue,
            )
            await approve_when_asked(handle, approver="alice", reason="go")
            result = await handle.result()
    finally:
        stop.set()
        await controller
        primary.close()
        backup.close()
        proxy.close()
    assert proxy.changes == [] and result.dns.already_current and result.dns.change_id is None
    assert len(record(world)) == 1
