"""The notification port's adapters over their real protocols: SMTP to aiosmtpd, SNS to moto (read
back through a subscribed SQS queue), the Slack webhook and Statuspage fakes that check the request
format; the delivery ledger in the stack's Redis; template errors caught when the playbook loads."""

import uuid

import httpx
import pytest
import redis
import yaml
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.notify import NotifyActivities
from models.config import NotifySettings
from models.notify import Notification
from models.playbook import PlaybookError, load_playbook
from tests.notify_world import ROOT

CONTEXT = {
    "incident_id": "INC-N1",
    "title": "API down",
    "severity": "P0",
    "severity_name": "Critical",
    "status": "recovering",
    "next_steps": "restoring",
    "timestamp": "2026-11-28 10:00:00 UTC",
    "services": "corporate-intel-api",
    "impact": "outage",
    "started_at": "2026-11-28 09:58:00 UTC",
    "next_update": "10:15:00 UTC",
    "level": "1",
    "level_name": "On-Call Engineer",
    "duration": "2m00s",
}


@pytest.fixture
def port(stack, notify_world):
    """send_notification with the world's endpoints and the stack's Redis, run as a real activity."""
    import boto3

    settings = NotifySettings(**notify_world.settings)
    sns = boto3.client(
        "sns",
        region_name="us-east-1",
        endpoint_url=settings.aws_endpoint_url,
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    with httpx.Client(timeout=5) as http:
        activities = NotifyActivities(
            load_playbook(ROOT / "playbook.yaml"), settings, redis.Redis.from_url(stack.redis_url), http, sns
        )
        yield lambda n: ActivityEnvironment().run(activities.send_notification, n), activities


def note(kind: str, channel: str, **changes) -> Notification:
    key = f"INC-N{uuid.uuid4().hex[:6]}/{kind}-0/{channel}"
    return Notification(
        **{"key": key, "incident_id": "INC-N1", "kind": kind, "channel": channel, "context": CONTEXT, **changes}
    )


def test_slack_gets_one_message_per_key_however_often_it_is_retried(port, notify_world):
    send, _ = port
    n = note("status_update", "incidents_slack")
    first, again = send(n), send(n)
    assert not first.already_sent and again.already_sent and again.sent_at == first.sent_at
    [message] = notify_world.slack.messages
    assert message["text"].startswith("*[P0] INC-N1 status update*\n")
    assert "Status Update: 2026-11-28 10:00:00 UTC - recovering - restoring" in message["text"]


def test_email_reaches_a_real_smtp_server_with_a_stable_message_id(port, notify_world):
    send, _ = port
    n = note("customer_notice", "customer_email")
    delivery = send(n)
    [(rcpts, mail)] = notify_world.mail.messages
    assert rcpts == ["customers@corporate-intel.example"]
    assert mail["Subject"] == "Service Disruption - Corporate Intelligence Platform"
    assert mail["Message-ID"] == delivery.reference and mail["X-DRP-Key"] == n.key
    body = mail.get_content()
    assert "affecting corporate-intel-api" in body and "https://status.corporate-intel.com" in body


def test_a_severity_can_have_its_own_template(port, notify_world):
    send, _ = port
    send(note("customer_notice", "customer_email", context={**CONTEXT, "severity": "P1"}))
    [(_, mail)] = notify_world.mail.messages
    assert mail["Subject"] == "Degraded performance - Corporate Intelligence Platform"  # customer_notice.P1.txt


def test_sns_publishes_subject_message_and_the_idempotency_key(port, notify_world):
    send, _ = port
    n = note("page", "oncall_pager")
    delivery = send(n)
    [page] = notify_world.pages()
    assert page["MessageId"] == delivery.reference
    assert page["Subject"] == "[P0] PAGE level 1 (On-Call Engineer): API down"
    assert page["MessageAttributes"]["idempotency_key"]["Value"] == n.key
    assert "drp ack INC-N1" in page["Message"]


def test_status_page_incident_is_opened_updated_and_resolved(port, notify_world):
    send, _ = port
    send(note("customer_notice", "status_page"))
    send(note("status_page", "status_page", status_page_status="identified"))
    send(note("resolution", "status_page", status_page_status="resolved"))
    [incident] = notify_world.page.incidents.values()
    assert incident["name"] == "API down [INC-N1]" and incident["status"] == "resolved"
    assert len(incident["updates"]) == 3 and "Status: recovering" in incident["updates"][1]


def test_what_retrying_cannot_fix_fails_at_once_with_the_reason(port, notify_world, stack):
    send, activities = port
    activities.settings = activities.settings.model_copy(update={"slack_webhook_url": None})
    with pytest.raises(ApplicationError) as missing:
        send(note("status_update", "incidents_slack"))
    assert missing.value.type == "ChannelNotConfigured" and "notify.slack_webhook_url" in str(missing.value)
    with pytest.raises(ApplicationError) as unknown:
        send(note("status_update", "no_such_channel"))
    assert unknown.value.type == "UnknownChannel"
    activities.settings = activities.settings.model_copy(update={"status_page_token": SecretStr("wrong")})
    with pytest.raises(ApplicationError) as refused:
        send(note("status_page", "status_page"))
    assert refused.value.type == "ChannelRejected" and "HTTP 401" in str(refused.value)
    assert notify_world.slack.messages == [] and notify_world.page.incidents == {}


@pytest.mark.parametrize(
    "template, error",
    [
        ("Status Update: $timestamp - $stauts\n", "unknown placeholder(s) $stauts"),
        ("Subject: $incident_id costs $5\nbody\n", "invalid placeholder syntax"),
    ],
)
def test_a_template_mistake_stops_the_playbook_from_loading(tmp_path, template, error):
    templates = tmp_path / "templates"
    templates.mkdir()
    for file in (ROOT / "templates").iterdir():
        (templates / file.name).write_text(file.read_text())
    (templates / "status_update.txt").write_text(template)
    raw = yaml.safe_load((ROOT / "playbook.yaml").read_text())
    (tmp_path / "playbook.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(PlaybookError) as err:
        load_playbook(tmp_path / "playbook.yaml")
    assert str(templates / "status_update.txt") in str(err.value) and error in str(err.value)
