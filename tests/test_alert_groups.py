"""Alert groups through the receiver's door (HTTP POST of Alertmanager's webhook): one incident per group
whatever alerts a notification carries, a new linked incident when a resolved group fires again, and
storms of thousands of alerts in one body."""

import json
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import yaml
from aiohttp import web
from temporalio.client import Client

from adapters.processes import free_port
from adapters.reports import read_report
from models.alerts import incident_id_for
from models.config import AlertReceiverSettings
from models.incident import IncidentStatus, ResolveRequest
from starters.alerts import PATH, build_app
from tests.conftest import running_worker, terminate_runs
from tests.notify_world import incident_settings, short_playbook
from tests.test_alerts import TOKEN, incidents_on, receiver, until  # noqa: F401 (receiver: fixture)
from workers.clients import build_s3
from workers.temporal_client import data_converter
from workflows.incident import Incident
from workflows.search_attributes import STATUS

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def webhook(group: str, alerts: list[dict], status: str = "firing", severity: str = "warning", **extra) -> dict:
    labels = {"alertname": "GroupEdge", "severity": severity}
    return {
        "version": "4",
        "groupKey": group,
        "status": status,
        "receiver": "drp",
        "groupLabels": labels,
        "commonLabels": labels,
        "commonAnnotations": {"summary": "edge group"},
        "externalURL": "",
        "truncatedAlerts": 0,
        "alerts": alerts,
        **extra,
    }


def one(instance: str, starts: datetime, status: str = "firing", severity: str = "warning") -> dict:
    return {
        "status": status,
        "labels": {"alertname": "GroupEdge", "instance": instance, "severity": severity},
        "annotations": {},
        "startsAt": starts.isoformat(),
        "endsAt": starts.isoformat() if status == "resolved" else "0001-01-01T00:00:00Z",
        "fingerprint": f"fp-{instance}",
    }


def lasting_playbook(tmp_path):
    """The short playbook, but a resolved incident stays open for its postmortem reminder (as in production)."""
    path = short_playbook(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["postmortem_within"] = "1h"
    path.write_text(yaml.safe_dump(raw))
    return path


async def timeline(client, incident_id: str) -> list[str]:
    status = await client.get_workflow_handle(incident_id).query(Incident.status, result_type=IncidentStatus)
    return [f"{e.kind}: {e.text}" for e in status.timeline]


async def test_a_group_whose_alerts_began_on_two_dates_is_one_incident(client, receiver):
    queue = f"test-{uuid.uuid4().hex[:10]}"  # no worker: what matters is which incident each notice reaches
    url = await receiver(queue)
    group = f'{{}}:{{alertname="GroupEdge{uuid.uuid4().hex[:6]}"}}'
    before, after = datetime(2026, 11, 27, 23, 50, tzinfo=UTC), datetime(2026, 11, 28, 0, 10, tzinfo=UTC)
    async with httpx.AsyncClient() as http:
        both = await http.post(url, json=webhook(group, [one("a", before), one("b", after)]), headers=AUTH)
        later_only = await http.post(url, json=webhook(group, [one("b", after)]), headers=AUTH)
        resolved = await http.post(
            url,
            json=webhook(group, [one("a", before, "resolved"), one("b", after, "resolved")], "resolved"),
            headers=AUTH,
        )
    assert both.status_code == later_only.status_code == resolved.status_code == 202
    assert (
        both.json()["incident_id"]
        == later_only.json()["incident_id"]
        == resolved.json()["incident_id"]
        == incident_id_for(group)
    )
    started = await until(lambda: incidents_on(client, queue))
    assert [w.id for w in started] == [incident_id_for(group)]
    await terminate_runs(client, queue)


async def test_a_resolved_group_that_fires_again_opens_a_new_linked_incident(
    stack, client, notify_world, receiver, tmp_path
):
    playbook = lasting_playbook(tmp_path)
    group = f'{{}}:{{alertname="GroupEdge{uuid.uuid4().hex[:6]}"}}'
    first, second, third = (incident_id_for(group, n) for n in (1, 2, 3))
    async with (
        running_worker(client, stack, settings=lambda q: incident_settings(stack, q, notify_world, playbook)) as queue,
        httpx.AsyncClient() as http,
    ):
        url = await receiver(queue)

        async def post(body):
            answer = await http.post(url, json=body, headers=AUTH)
            assert answer.status_code == 202, answer.text
            return answer.json()

        async def resolve(incident_id: str) -> datetime:
            handle = client.get_workflow_handle(incident_id)
            await until(lambda: _ready(handle))
            await handle.execute_update(Incident.resolve, ResolveRequest(by="alice", reason="fixed by hand"))
            await until(lambda: _resolved_attribute(client, incident_id))
            return datetime.now(UTC)

        began = datetime.now(UTC) - timedelta(seconds=5)
        assert (await post(webhook(group, [one("a", began)])))["incident_id"] == first
        resolved_at = await resolve(first)

        # Fires again, with an alert that began after the person's resolution: a new incident, linked both ways.
        again = await post(webhook(group, [one("a", resolved_at + timedelta(seconds=1))]))
        assert again["incident_id"] == second and first in again["note"]
        assert any(f"follows {first}" in line and "fired again" in line for line in await timeline(client, second))
        assert await until(lambda: _has(client, first, f"fired again after this incident was resolved: {second}"))
        # Its repeats join it.
        assert (await post(webhook(group, [one("a", resolved_at + timedelta(seconds=1))])))["incident_id"] == second

        # A repeat of alerts that never stopped firing, after a person resolved the second: a third incident
        # saying so, not a line lost in a closed one.
        await resolve(second)
        repeat = await post(webhook(group, [one("a", began)]))
        assert repeat["incident_id"] == third
        assert any("never stopped firing" in line for line in await timeline(client, third))
        assert await until(lambda: _has(client, second, third))
        # A resolved notice goes to the latest incident and opens nothing.
        done = await post(webhook(group, [one("a", began, "resolved")], "resolved"))
        assert done["incident_id"] == third
        assert {w.id for w in await incidents_on(client, queue)} == {first, second, third}
    await terminate_runs(client, queue)


async def _ready(handle) -> bool:
    status = await handle.query(Incident.status, result_type=IncidentStatus)
    return status.severity is not None


async def _resolved_attribute(client, incident_id: str) -> bool:
    desc = await client.get_workflow_handle(incident_id).describe()
    return desc.typed_search_attributes.get(STATUS) in ("resolved", "closed")


async def _has(client, incident_id: str, text: str) -> bool:
    return any(text in line for line in await timeline(client, incident_id))


async def test_a_storm_of_thousands_of_alerts_is_accepted_and_the_rest_counted(
    stack, client, notify_world, receiver, tmp_path
):
    playbook = short_playbook(tmp_path)
    group = f'{{}}:{{alertname="Storm{uuid.uuid4().hex[:6]}"}}'
    began = datetime.now(UTC) - timedelta(seconds=5)
    alerts = [
        {
            **one(f"host-{i:05d}", began, severity="high"),
            "annotations": {"description": "disk almost full on a host of the fleet " * 4},
        }
        for i in range(3000)
    ]
    body = json.dumps(webhook(group, alerts, severity="high", truncatedAlerts=500)).encode()
    assert len(body) > 1 << 20  # over the old 1 MiB limit that answered 413
    async with (
        running_worker(client, stack, settings=lambda q: incident_settings(stack, q, notify_world, playbook)) as queue,
        httpx.AsyncClient(timeout=60) as http,
    ):
        url = await receiver(queue)
        answer = await http.post(url, content=body, headers={**AUTH, "Content-Type": "application/json"})
        assert answer.status_code == 202, answer.text
        incident_id = answer.json()["incident_id"]
        not_listed = 500 + 3000 - 100
        assert await until(lambda: _has(client, incident_id, f"{not_listed} more alerts of the group are not listed"))
        # The status update the incident sends says so too.
        assert await until(lambda: _slack_says(notify_world, f"{not_listed} more not listed (truncated)"), timeout=300)
        handle = client.get_workflow_handle(incident_id)
        await handle.execute_update(Incident.resolve, ResolveRequest(by="alice", reason="storm over"))
        await handle.result()
    report = read_report(
        build_s3(incident_settings(stack, "q", notify_world, playbook)), "s3://drp-backups/reports", incident_id
    )
    assert f"{not_listed} more alerts of the group are not listed" in report


async def _slack_says(world, text: str) -> bool:
    return any(text in t for t in world.slack_texts())


async def test_the_receiver_answers_503_only_when_temporal_cannot_be_reached():
    """Alertmanager retries 5xx and never 4xx: Temporal down is 503 (sending again helps); a body that can
    never be accepted is 4xx."""
    down = await Client.connect(f"127.0.0.1:{free_port()}", lazy=True, data_converter=data_converter)
    runner = web.AppRunner(build_app(down, AlertReceiverSettings(bearer_token=TOKEN), "nowhere"))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            url = f"http://127.0.0.1:{port}{PATH}"
            body = webhook('{}:{alertname="Down"}', [one("a", datetime.now(UTC))])
            unreachable = await http.post(url, json=body, headers=AUTH)
            malformed = await http.post(url, json={**body, "version": "3"}, headers=AUTH)
    finally:
        await runner.cleanup()
    assert unreachable.status_code == 503 and "send again" in unreachable.json()["error"]
    assert malformed.status_code == 400
