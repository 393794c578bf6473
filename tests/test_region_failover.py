"""RegionFailover end to end: moto for RDS, Route53, CloudWatch, SNS and SQS; kmock
for the backup region's Kubernetes API; local HTTP health endpoints for both regions."""

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import httpx
import kmock as kmock_module
import pytest
from kubernetes import client as k8s
from temporalio.client import WorkflowFailureError

from activities import statuspage
from models.region import RegionFailbackInput, RegionFailoverInput
from starters.region_failback import start_region_failback
from starters.region_failover import start_region_failover
from tests.conftest import CREDS, activity_attempts, approve_when_asked, wait_for_approval_gate
from tests.fakes import FakeStatuspage
from tests.test_crash_survival import ROOT
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
    world["cloudwatch"].put_metric_data(Namespace="AWS/RDS", MetricData=[{
        "MetricName": "ReplicaLag", "Value": seconds, "Timestamp": datetime.now(timezone.utc),
        "Dimensions": [{"Name": "DBInstanceIdentifier", "Value": world["replica"]}]}])


def settings_for(stack, aws, world, kmock, primary: Health, backup: Health, queue: str, home_kmock=None,
                 status_page: FakeStatuspage | None = None, **region) -> Settings:
    return Settings(**raw_settings(stack, aws, world, kmock, primary, backup, queue, home_kmock, status_page, **region))


def raw_settings(stack, aws, world, kmock, primary: Health, backup: Health, queue: str, home_kmock=None,
                 status_page: FakeStatuspage | None = None, **region) -> dict:
    base = {**stack.worker_settings(), "task_queue": queue}
    base["failover"] = {
        "primary_health_url": primary.url, "hosted_zone_id": world["zone"], "record_name": world["record"],
        "sns_topic_arn": world["topic"], "aws_endpoint_url": aws, "max_replica_lag_seconds": 60,
        "regions": {BACKUP: {"task_queue": f"{queue}-{BACKUP}", "health_url": backup.url,
                             "rds_replica_id": world["replica"], "replicas": 4,
                             "kubernetes": {"api_url": str(kmock.url).rstrip("/"), "namespace": NS,
                                            "deployment": NAME},
                             "load_balancer_dns": "backup-lb.us-west-2.elb.amazonaws.com",
                             "load_balancer_zone_id": "Z0987654321XYZ", **region}}}
    if status_page is not None:
        base["failover"].update(status_page_url=status_page.url, status_page_token=status_page.TOKEN)
    if home_kmock is not None:  # the primary region, for the way home
        base["failover"]["regions"]["us-east-1"] = {
            "task_queue": f"{queue}-us-east-1", "health_url": primary.url, "rds_replica_id": f"ci-{world['tag']}-home",
            "replicas": 6, "kubernetes": {"api_url": str(home_kmock.url).rstrip("/"), "namespace": NS,
                                          "deployment": NAME},
            "load_balancer_dns": "primary-lb.us-east-1.elb.amazonaws.com", "load_balancer_zone_id": "Z35SXDOTRQ7X7K"}
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
    await asyncio.to_thread(apps.create_namespaced_deployment, NS, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": NAME, "namespace": NS},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "ci"}},
                 "template": {"metadata": {"labels": {"app": "ci"}}, "spec": {"containers": [{"name": "api",
                                                                                             "image": "api:1"}]}}},
        "status": {"readyReplicas": replicas}})
    # One pod, so that kmock knows the pods resource (a real API server lists an empty namespace as []).
    await asyncio.to_thread(k8s.CoreV1Api(api_client(kmock)).create_namespaced_pod, NS, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{NAME}-0", "namespace": NS,
                                                          "labels": {"app": "ci"}}})


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
        settings = settings_for(stack, aws, world, kmock, primary, backup, f"rf-{uuid.uuid4().hex[:8]}",
                                status_page=status_page)
        async with region_workers(client, settings) as queue:
            handle = await start_region_failover(client, RegionFailoverInput(
                incident_id=f"RF-{world['tag']}", backup_region=BACKUP, health_checks=2,
                health_check_spacing=timedelta(milliseconds=100)), queue)
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
    queues = {e.activity_task_scheduled_event_attributes.activity_type.name:
              e.activity_task_scheduled_event_attributes.task_queue.name
              for e in history if e.HasField("activity_task_scheduled_event_attributes")}
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
    raw = raw_settings(stack, aws, world, kmock, primary, backup, f"ra-{uuid.uuid4().hex[:8]}",
                       load_balancer_dns=None, load_balancer_zone_id=None, load_balancer_ips=["203.0.113.10"])
    try:
        async with region_workers(client, Settings(**raw)) as queue:
            handle = await start_region_failover(client, RegionFailoverInput(
                incident_id=f"RA-{world['tag']}", backup_region=BACKUP, health_checks=1), queue)
            await approve_when_asked(handle, approver="alice", reason="go")
            await handle.result()
    finally:
        stop.set()
        await controller
        primary.close()
        backup.close()
    [dns] = record(world)
    assert dns["ResourceRecords"] == [{"Value": "203.0.113.10"}] and "AliasTarget" not in dns


@pytest.mark.parametrize("case", ["primary healthy", "replica lagging", "unknown region", "unknown replica",
                                  "unknown zone"])
async def test_refusals_change_nothing(stack, client, aws, world, kmock, case):
    primary, backup = Health(200 if case == "primary healthy" else None), Health(200)
    await deploy_backup(kmock)
    replica_lag(world, 900 if case == "replica lagging" else 1)
    region = {"rds_replica_id": "no-such-replica"} if case == "unknown replica" else {}
    if case == "unknown zone":
        world = {**world, "zone": "ZNOSUCHZONE"}
    settings = settings_for(stack, aws, world, kmock, primary, backup, f"rf-{uuid.uuid4().hex[:8]}", **region)
    try:
        async with region_workers(client, settings) as queue:
            handle = await start_region_failover(client, RegionFailoverInput(
                incident_id=f"RF-{uuid.uuid4().hex[:6]}", backup_region="eu-west-1" if case == "unknown region"
                else BACKUP, health_checks=2, health_check_spacing=timedelta(milliseconds=100)), queue)
            with pytest.raises(WorkflowFailureError) as failed:
                await handle.result()
    finally:
        primary.close()
        backup.close()
    expected = {"primary healthy": "PrimaryHealthy", "replica lagging": "ReplicaLagging",
                "unknown region": "UnknownRegion", "unknown replica": "UnknownReplica",
                "unknown zone": "UnknownHostedZone"}[case]
    assert failed.value.cause.cause.type == expected
    if case != "unknown zone":
        assert not record(world)
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
            settings = settings_for(stack, aws, world, kmock, primary, backup, f"rb-{uuid.uuid4().hex[:8]}",
                                    home_kmock=home_kmock)
            async with region_workers(client, settings) as queue:
                inc = f"RB-{world['tag']}"
                failover = await start_region_failover(client, RegionFailoverInput(
                    incident_id=inc, backup_region=BACKUP, health_checks=1), queue)
                await approve_when_asked(failover, approver="alice", reason="go")
                assert "starters.region_failback" in (await failover.result()).failback
                primary.status = 200  # the primary region is back
                failback = await start_region_failback(client, RegionFailbackInput(
                    incident_id=inc, serving_region=BACKUP), queue)
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


async def test_failover_survives_a_killed_backup_worker_and_a_server_restart(stack, client, aws, world, kmock,
                                                                               tmp_path):
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
        env = {**os.environ, "DRP_SETTINGS_FILE": str(settings_file), "DRP_TASK_QUEUE": backup_queue,
               "PYTHONPATH": str(ROOT)}
        return subprocess.Popen([sys.executable, "-m", "workers.main"], env=env, cwd=ROOT,
                                stdout=open(tmp_path / log, "ab"), stderr=subprocess.STDOUT)

    first, second = backup_worker("w1.log"), None
    try:
        with ThreadPoolExecutor(max_workers=8) as executor:
            async with build_worker(client, Settings(**raw), executor):
                handle = await start_region_failover(client, RegionFailoverInput(
                    incident_id=f"RK-{world['tag']}", backup_region=BACKUP, health_checks=1,
                    heartbeat_timeout=timedelta(seconds=10)), queue)
                await approve_when_asked(handle, approver="alice", reason="go")
                async with asyncio.timeout(120):
                    while not await completed(handle, "promote_rds_replica"):
                        await asyncio.sleep(0.05)
                first.kill()
                first.wait()
                stack.restart_temporal()
                second = backup_worker("w2.log")
                result = await asyncio.wait_for(handle.result(), timeout=120)
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
    assert result.dns.status == "INSYNC"
    [dns] = record(world)
    assert dns["AliasTarget"]["DNSName"].rstrip(".") == "backup-lb.us-west-2.elb.amazonaws.com"


async def completed(handle, activity_type: str) -> bool:
    history = [e async for e in handle.fetch_history_events()]
    scheduled = {e.event_id for e in history if e.HasField("activity_task_scheduled_event_attributes")
                 and e.activity_task_scheduled_event_attributes.activity_type.name == activity_type}
    return any(e.activity_task_completed_event_attributes.scheduled_event_id in scheduled for e in history
               if e.HasField("activity_task_completed_event_attributes"))


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
    raw = {**stack.worker_settings(), "task_queue": f"rds-{uuid.uuid4().hex[:8]}",
           "rds": {"region": BACKUP, "replica_id": world["replica"], "aws_endpoint_url": aws},
           "platform": {"kind": "kubernetes", "kubernetes": {"api_url": str(kmock.url).rstrip("/"), "namespace": NS,
                                                             "deployment": NAME}},
           "app": {"health_url": f"{app.url}/health", "critical_url": f"{app.url}/api/v1/companies",
                   "write_check_url": f"{app.url}/api/v1/write-check"}}
    try:
        with ThreadPoolExecutor(max_workers=8) as executor:
            async with build_worker(client, Settings(**raw), executor):
                handle = await start_db_failover(client, DatabaseFailoverInput(
                    incident_id=f"RDS-{uuid.uuid4().hex[:6]}"), raw["task_queue"])
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
