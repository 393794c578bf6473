"""Benchmark: RegionFailover, self-managed database path, start to backup region verified.

    bash scripts/bench.sh region_failover [--runs 3]

The orchestration on this machine: a fresh stack (PostgreSQL primary +
streaming standby), moto for Route53/SNS, kmock for the backup cluster (with the
tests' fake Deployment controller), local health endpoints. The approval is
sent the moment it is asked for and excluded; the split per step comes from the
run's result. The AWS and Kubernetes figures are emulator latencies, not AWS's.
"""

import argparse
import asyncio
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import kmock
from moto.moto_server.threaded_moto_server import ThreadedMotoServer

from bench._stack import report_runs
from models.approval import ApprovalRequest
from models.region import RegionFailoverInput
from stack.stack import Stack
from starters._start import wait_for_approval
from starters.region_failover import start_region_failover
from tests.test_kubernetes_platform import fake_deployment_controller
from tests.test_region_failover import NAME, NS, Health, deploy_backup
from workers.main import build_worker
from workers.settings import Settings
from workers.temporal_client import connect
from workflows.region_failover import RegionFailover

CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


async def one_run(aws: str) -> dict:
    state = Path(tempfile.mkdtemp(prefix="drp-bench-rf-"))
    os.chmod(state, 0o755)
    stack = Stack(state, companies=200, task_queue=f"bench-{uuid.uuid4().hex[:6]}")
    route53 = boto3.client("route53", region_name="us-east-1", endpoint_url=aws, **CREDS)
    zone_name = f"b{uuid.uuid4().hex[:6]}.example.com"
    zone = route53.create_hosted_zone(Name=zone_name, CallerReference=uuid.uuid4().hex)["HostedZone"]["Id"]
    primary, backup = Health(None), Health(200)
    try:
        stack.up(with_worker=False, log=lambda *_: None)
        async with kmock.KubernetesEmulator() as cluster, kmock.Server(cluster):
            await deploy_backup(cluster)
            stop = asyncio.Event()
            controller = asyncio.create_task(fake_deployment_controller(cluster, stop, NS, NAME))
            raw = {
                **stack.worker_settings(),
                "failover": {
                    "database": "self-managed",
                    "primary_health_url": primary.url,
                    "hosted_zone_id": zone,
                    "record_name": f"api.{zone_name}",
                    "aws_endpoint_url": aws,
                    "regions": {
                        "us-west-2": {
                            "task_queue": f"{stack.task_queue}-west",
                            "health_url": backup.url,
                            "rds_replica_id": "unused",
                            "replicas": 4,
                            "kubernetes": {
                                "api_url": str(cluster.url).rstrip("/"),
                                "namespace": NS,
                                "deployment": NAME,
                            },
                            "load_balancer_dns": "backup-lb.example.com",
                            "load_balancer_zone_id": "Z0987654321XYZ",
                        }
                    },
                },
            }
            settings = Settings(**raw)
            west = settings.model_copy(update={"task_queue": f"{stack.task_queue}-west"})
            client = await connect(stack.temporal_address)
            with ThreadPoolExecutor(max_workers=12) as executor:
                async with build_worker(client, settings, executor), build_worker(client, west, executor):
                    handle = await start_region_failover(
                        client,
                        RegionFailoverInput(
                            incident_id=f"BENCH-RF-{uuid.uuid4().hex[:6]}", backup_region="us-west-2", health_checks=1
                        ),
                        stack.task_queue,
                    )
                    await wait_for_approval(handle, poll_seconds=0.02)
                    await handle.execute_update(
                        RegionFailover.approve, ApprovalRequest(approver="alice", reason="bench")
                    )
                    result = await handle.result()
            stop.set()
            await controller
        steps = {s.name: round(s.duration.total_seconds(), 2) for s in result.steps}
        return {"steps_s": steps, "total_excl_approval_s": round(sum(v for k, v in steps.items() if k != "approve"), 2)}
    finally:
        primary.close()
        backup.close()
        stack.down(log=lambda *_: None)
        shutil.rmtree(state, ignore_errors=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        runs = [await one_run(f"http://{host}:{port}") for _ in range(args.runs)]
    finally:
        server.stop()
    report_runs(runs)


if __name__ == "__main__":
    asyncio.run(main())
