"""The alert receiver: a real Prometheus Alertmanager posts its webhook to `drp alerts serve`'s app;
authentication, validation and signal-with-start keyed by the alert group."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from aiohttp import web

from adapters.processes import free_port, wait_for_port
from models.alerts import incident_id_for
from models.config import AlertReceiverSettings
from starters.alerts import PATH, build_app, sign
from tests.conftest import running_worker, terminate_runs
from tests.notify_world import ROOT, incident_settings, short_playbook
from workflows.incident import Incident

TOKEN, SECRET = "bearer-for-tests", "hmac-for-tests"


@pytest.fixture
async def receiver(client):
    """The receiver app on a free port, sending to a task queue the test names; counts what it answered."""
    answers: list[int] = []

    @web.middleware
    async def count(request, handler):
        response = await handler(request)
        answers.append(response.status)
        return response

    async def start(queue: str) -> str:
        app = build_app(client, AlertReceiverSettings(bearer_token=TOKEN, hmac_secret=SECRET), queue)
        app.middlewares.append(count)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}{PATH}"

    runners: list[web.AppRunner] = []
    start.answers = answers
    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def alertmanager():
    """A real Alertmanager (Debian's prometheus-alertmanager) routing every alert to `url` with the bearer token."""
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    assert binary, "prometheus-alertmanager is not installed: scripts/test.sh installs it (apt-get)"
    procs, folder = [], Path(tempfile.mkdtemp(prefix="drp-am-"))

    def start(url: str) -> str:
        config = {
            "route": {
                "receiver": "drp",
                "group_by": ["alertname", "cluster"],
                "group_wait": "500ms",
                "group_interval": "1s",
                "repeat_interval": "2s",
            },
            "receivers": [
                {
                    "name": "drp",
                    "webhook_configs": [
                        {
                            "url": url,
                            "send_resolved": True,
                            "http_config": {"authorization": {"type": "Bearer", "credentials": TOKEN}},
                        }
                    ],
                }
            ],
        }
        (folder / "alertmanager.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={folder / 'alertmanager.yml'}",
                    f"--storage.path={folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--cluster.listen-address=",
                    "--log.level=warn",
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(folder / "alertmanager.log", "w"),
            )
        )
        wait_for_port(port, what="Alertmanager")
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)
    shutil.rmtree(folder, ignore_errors=True)


def alert(name: str, instance: str, ends_at: datetime | None = None) -> dict:
    now = datetime.now(UTC)
    body = {
        "labels": {
            "alertname": name,
            "cluster": "c1",
            "instance": instance,
            "severity": "warning",
            "service": "corporate-intel-api",
        },
        "annotations": {"summary": f"{name} on c1"},
        "startsAt": (now - timedelta(seconds=5)).isoformat(),
    }
    if ends_at:
        body["endsAt"] = ends_at.isoformat()
    return body


async def incidents_on(client, queue: str) -> list:
    return [w async for w in client.list_workflows(f"WorkflowType = 'Incident' AND TaskQueue = '{queue}'")]


async def until(check, timeout: float = 300, what: str = "condition"):
    async with asyncio.timeout(timeout):
        while not (result := await check()):
            await asyncio.sleep(0.2)
        return result


async def test_alertmanager_webhooks_open_one_incident_per_group_and_resolve_it(
    stack, client, notify_world, receiver, alertmanager, tmp_path
):
    playbook = short_playbook(tmp_path)
    name = f"DiskAlmostFull{uuid.uuid4().hex[:6]}"
    async with running_worker(
        client, stack, settings=lambda q: incident_settings(stack, q, notify_world, playbook)
    ) as queue:
        am = alertmanager(await receiver(queue))
        async with httpx.AsyncClient(base_url=am) as http:
            (await http.post("/api/v2/alerts", json=[alert(name, "db1")])).raise_for_status()
            [incident] = await until(lambda: incidents_on(client, queue))
            handle = client.get_workflow_handle(incident.id)

            # The same alert again, and a second alert of the same group (other instance): the same incident.
            (await http.post("/api/v2/alerts", json=[alert(name, "db1"), alert(name, "db2")])).raise_for_status()

            async def both_alerts():
                status = await handle.query(Incident.status)
                return sum(e.kind == "alert" and "firing" in e.text for e in status.timeline) == 2 and status

            status = await until(both_alerts)

            async def repeated():
                return len(receiver.answers) >= 3  # first, the group of two, Alertmanager's repeat

            await until(repeated)
            assert len(await incidents_on(client, queue)) == 1
            assert status.severity.value == "P2" and status.procedure is None  # label severity=warning
            assert status.title == f"{name} on c1"

            ended = datetime.now(UTC)
            (
                await http.post("/api/v2/alerts", json=[alert(name, "db1", ended), alert(name, "db2", ended)])
            ).raise_for_status()

            async def resolved():
                status = await handle.query(Incident.status)
                return any("every alert of the group has resolved" in e.text for e in status.timeline)

            await until(resolved)
    assert set(receiver.answers) == {202}
    assert incident.id.startswith("INC-AM-")
    await terminate_runs(client, queue)


def payload(group: str, status: str = "firing", **changes) -> dict:
    body = {
        "version": "4",
        "groupKey": group,
        "status": status,
        "receiver": "drp",
        "groupLabels": {"alertname": "X"},
        "commonLabels": {"alertname": "X", "severity": "info"},
        "commonAnnotations": {},
        "externalURL": "",
        "truncatedAlerts": 0,
        "alerts": [
            {
                "status": status,
                "labels": {"alertname": "X", "severity": "info"},
                "annotations": {},
                "startsAt": "2026-11-28T10:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "fingerprint": "f1",
            }
        ],
    }
    body.update(changes)
    return body


async def test_receiver_refuses_strangers_and_malformed_payloads_and_starts_nothing(client, receiver):
    queue = f"test-{uuid.uuid4().hex[:10]}"  # no worker: what matters is what reaches Temporal
    url = await receiver(queue)
    group = f'{{}}:{{alertname="{uuid.uuid4().hex}"}}'
    body = json.dumps(payload(group)).encode()
    async with httpx.AsyncClient() as http:

        async def post(data: bytes, **headers):
            return await http.post(url, content=data, headers={"Content-Type": "application/json", **headers})

        assert (await post(body)).status_code == 401
        assert (await post(body, Authorization="Bearer wrong")).status_code == 401
        assert (await post(body, **{"X-DRP-Signature": sign("wrong", body)})).status_code == 401
        bad = await post(b"{not json", Authorization=f"Bearer {TOKEN}")
        assert bad.status_code == 400 and "not an Alertmanager webhook" in bad.json()["error"]
        for broken, field in (
            (payload(group, version="3"), "version"),
            (payload(group, alerts=[]), "alerts"),
            (payload(group, status="bogus"), "status"),
        ):
            answer = await post(json.dumps(broken).encode(), Authorization=f"Bearer {TOKEN}")
            assert answer.status_code == 400 and any(p.startswith(field) for p in answer.json()["problems"])
        orphan = await post(json.dumps(payload(group, "resolved")).encode(), Authorization=f"Bearer {TOKEN}")
        assert orphan.status_code == 202 and "no open incident" in orphan.json()["note"]
        assert await incidents_on(client, queue) == []

        first = await post(body, **{"X-DRP-Signature": sign(SECRET, body)})
        again = await post(body, Authorization=f"Bearer {TOKEN}")
    assert first.status_code == again.status_code == 202
    assert first.json()["incident_id"] == again.json()["incident_id"]
    assert first.json()["incident_id"] == incident_id_for(group)
    started = await until(lambda: incidents_on(client, queue))
    assert len(started) == 1
    await terminate_runs(client, queue)


async def test_drp_alerts_serve_needs_a_secret_and_accepts_an_authenticated_webhook(stack, client):
    from tests.test_stack import drp

    base = {**os.environ, "DRP_SETTINGS_FILE": str(stack.settings_file)}
    refused = await asyncio.to_thread(drp, "alerts", "serve", env=base)
    assert refused.returncode == 2 and "never runs unauthenticated" in refused.stderr
    port, queue = free_port(), f"test-{uuid.uuid4().hex[:10]}"
    env = {**base, "DRP_ALERTS__BEARER_TOKEN": TOKEN, "DRP_ALERTS__PORT": str(port), "DRP_TASK_QUEUE": queue}
    server = subprocess.Popen(
        [sys.executable, "-m", "starters.cli", "alerts", "serve"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.to_thread(wait_for_port, port, what="drp alerts serve")
        async with httpx.AsyncClient() as http:
            answer = await http.post(
                f"http://127.0.0.1:{port}{PATH}",
                json=payload(f"g-{uuid.uuid4().hex}"),
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
        assert answer.status_code == 202
        [incident] = await until(lambda: incidents_on(client, queue))
        assert incident.id == answer.json()["incident_id"]
        await terminate_runs(client, queue)
    finally:
        server.terminate()
        server.wait(10)
