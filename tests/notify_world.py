"""Everything an incident talks to, for real where it can run here: an SMTP server
(aiosmtpd), SNS through moto with an SQS queue subscribed, and the named fakes
for Slack and Statuspage. Plus a playbook with the durations shrunk to seconds."""

import json
import uuid
from email import message_from_bytes, policy
from pathlib import Path

import boto3
import yaml
from aiosmtpd.controller import Controller

from adapters.processes import free_port
from tests.conftest import CREDS, worker_settings
from tests.fakes import FakeSlackWebhook, FakeStatuspage

ROOT = Path(__file__).resolve().parent.parent


class Mailbox:
    """A real SMTP server on a free port; keeps every message it accepted."""

    def __init__(self):
        self.messages = []
        outer = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's hook name)
                outer.messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content, policy=policy.default)))
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def close(self):
        self.controller.stop()


class NotifyWorld:
    def __init__(self, aws: str):
        self.slack, self.page, self.mail = FakeSlackWebhook(), FakeStatuspage(), Mailbox()
        tag = uuid.uuid4().hex[:6]
        self.sns = boto3.client("sns", region_name="us-east-1", endpoint_url=aws, **CREDS)
        self.sqs = boto3.client("sqs", region_name="us-east-1", endpoint_url=aws, **CREDS)
        self.topic = self.sns.create_topic(Name=f"oncall-{tag}")["TopicArn"]
        self.queue = self.sqs.create_queue(QueueName=f"oncall-{tag}")["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=self.queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        self.sns.subscribe(TopicArn=self.topic, Protocol="sqs", Endpoint=arn)
        self.settings = {
            "slack_webhook_url": self.slack.url,
            "smtp_host": "127.0.0.1",
            "smtp_port": self.mail.port,
            "sns_topic_arn": self.topic,
            "aws_endpoint_url": aws,
            "status_page_api": self.page.url,
            "status_page_token": self.page.TOKEN,
        }
        self._pages: list[dict] = []

    def pages(self) -> list[dict]:
        """SNS messages so far (drained from the subscribed queue), in arrival order."""
        while True:
            got = self.sqs.receive_message(QueueUrl=self.queue, MaxNumberOfMessages=10).get("Messages", [])
            if not got:
                return self._pages
            for m in got:
                self._pages.append(json.loads(m["Body"]))
                self.sqs.delete_message(QueueUrl=self.queue, ReceiptHandle=m["ReceiptHandle"])

    def slack_texts(self) -> list[str]:
        return [m["text"] for m in self.slack.messages]

    def close(self):
        self.slack.close()
        self.page.close()
        self.mail.close()


# Escalation levels that never come during a test: a test that is not about the level timers must
# not race them (a loaded machine can take minutes to get where a quick one takes seconds).
NO_ESCALATION = ("0s", "1h", "2h", "3h")


def short_playbook(folder: Path, levels: tuple[str, ...] = NO_ESCALATION, repage_every: str = "1h", **p0) -> Path:
    """The shipped playbook with P0's clocks in seconds (and any P0 field overridden). The escalation
    levels' `after` and the re-page interval are only short when a test passes them: the test is about them."""
    raw = yaml.safe_load((ROOT / "playbook.yaml").read_text())
    raw["communication"]["templates_dir"] = str(ROOT / "templates")
    raw["severities"]["P0"].update(
        {"status_update_every": "2s", "status_page_update_every": "3s", "approval_escalate_after": "2s", **p0}
    )
    raw["escalation"]["repage_every"] = repage_every
    for level, after in zip(raw["escalation"]["levels"], levels, strict=True):
        level["after"] = after
    raw["postmortem_within"] = "1s"
    path = folder / "playbook.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def incident_settings(stack, queue: str, world: NotifyWorld, playbook: Path):
    s = worker_settings(stack, queue)
    return s.model_copy(update={"playbook_path": playbook, "notify": s.notify.model_validate(world.settings)})
