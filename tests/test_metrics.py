"""Metrics: the worker's SDK Prometheus endpoint carries Temporal's metrics and the runbook outcome/RTO
metrics after a run; the alert receiver counts its requests and their latencies."""

import asyncio
import json
import re
import time
import uuid

import httpx
from aiohttp import web
from temporalio.client import WorkflowFailureError

from models.config import AlertReceiverSettings
from starters.alerts import PATH, build_app
from tests.deploy_helpers import address, free_port, queue, worker
from tests.deploy_workflows import SecretEcho, SecretInput
from workers.settings import TemporalSettings
from workers.temporal_client import connect


async def scrape_until(url: str, *patterns: str, timeout: float = 120) -> str:
    """GET url until every regex matches (the exporter may lag the run by an export interval)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            text = (await http.get(url)).text
            missing = [p for p in patterns if not re.search(p, text, re.MULTILINE)]
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} lacks {missing} after {timeout}s:\n{text[-3000:]}")
            await asyncio.sleep(0.5)


async def test_worker_metrics_endpoint_has_sdk_and_runbook_outcome_metrics(dev_server):
    port = free_port()
    settings = TemporalSettings(
        temporal_address=address(dev_server), metrics={"worker_bind_address": f"127.0.0.1:{port}"}
    )
    client = await connect(settings=settings, metrics=True)
    task_queue = queue()
    async with worker(client, task_queue):
        await client.execute_workflow(
            SecretEcho.run, SecretInput(note="ok"), id=f"m-{uuid.uuid4().hex[:8]}", task_queue=task_queue
        )
        try:
            await client.execute_workflow(
                SecretEcho.run, SecretInput(note="no", fail=True), id=f"m-{uuid.uuid4().hex[:8]}", task_queue=task_queue
            )
        except WorkflowFailureError:
            pass
        text = await scrape_until(
            f"http://127.0.0.1:{port}/metrics",
            r'^temporal_workflow_completed_total\{.*workflow_type="SecretEcho".*\} 1',
            r'^temporal_activity_execution_latency_count\{.*activity_type="echo"',
            r'^temporal_worker_task_slots_available\{.*task_queue="' + task_queue + '"',  # DrpWorkerDown's rule
            r'^drp_workflow_outcomes_total\{(?=.*outcome="recovered")(?=.*rto_met="true")'
            r'(?=.*workflow_type="SecretEcho")(?=.*task_queue="' + task_queue + r'").*\} 1',
            r'^drp_workflow_outcomes_total\{(?=.*outcome="failed")(?=.*error_type="DeployTestRefusal").*\} 1',
            r'^drp_runbook_rto_seconds_sum\{.*workflow_type="SecretEcho".*\} 42',
        )
    assert "temporal_request" in text  # client RPC metrics too


async def test_receiver_counts_requests_and_latencies(dev_server):
    settings = AlertReceiverSettings(port=free_port(), bearer_token="receiver-token")
    task_queue = queue()
    runner = web.AppRunner(
        build_app(await connect(settings=TemporalSettings(temporal_address=address(dev_server))), settings, task_queue)
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    base = f"http://127.0.0.1:{settings.port}"
    alert = {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="M{uuid.uuid4().hex[:6]}"}}',
        "status": "firing",
        "receiver": "drp",
        "groupLabels": {"alertname": "X"},
        "commonLabels": {"alertname": "X"},
        "commonAnnotations": {},
        "externalURL": "",
        "truncatedAlerts": 0,
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "X", "severity": "info"},
                "annotations": {},
                "startsAt": "2026-11-28T10:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "fingerprint": "f1",
            }
        ],
    }
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            assert (await http.post(base + PATH, content=b"{}")).status_code == 401
            auth = {"Authorization": "Bearer receiver-token"}
            assert (await http.post(base + PATH, content=b"{}", headers=auth)).status_code == 400
            accepted = await http.post(base + PATH, content=json.dumps(alert), headers=auth)
            assert accepted.status_code == 202, accepted.text
            text = (await http.get(base + "/metrics")).text
    finally:
        await runner.cleanup()
        async for run in dev_server.list_workflows(f"TaskQueue = '{task_queue}'"):
            await dev_server.get_workflow_handle(run.id).terminate("test ended")
    for status in ("401", "400", "202"):
        assert re.search(
            r'^drp_receiver_requests_total\{method="POST",path="/alerts",status="' + status + r'"\} 1\.0',
            text,
            re.MULTILINE,
        ), text
    assert re.search(
        r'^drp_receiver_request_duration_seconds_count\{method="POST",path="/alerts"\} 3\.0', text, re.MULTILINE
    ), text
