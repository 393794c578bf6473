"""NotifyActivities: the notification port. One message, one channel, at most once per key.

The Incident workflow names a message by (incident, cadence tick, channel).
A ledger in Redis records every key that was delivered; a retry (after a
timeout, a worker crash or a Temporal restart) finds the key there and sends
nothing. What remains is the moment between the provider accepting a message
and the ledger write: a crash exactly there can repeat that one message.

Adapters speak the real protocols: a Slack incoming webhook (JSON `text`),
SMTP (a deterministic Message-ID, so mail systems can fold a repeat), AWS SNS
(a FIFO topic gets the key as its deduplication ID) and the Atlassian
Statuspage API (one page incident per drp incident, found again by its ID).
"""

import hashlib
import smtplib
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime

import httpx
from temporalio import activity

from adapters import statuspage
from adapters.errors import refused
from models.config import NotifySettings
from models.errors import ErrorKind
from models.notify import Delivery, Notification
from models.playbook import Channel, Playbook
from models.templates import RenderedMessage, render

LEDGER_PREFIX = "drp:notify:"


class NotifyActivities:
    def __init__(self, playbook: Playbook, settings: NotifySettings, redis, http: httpx.Client, sns=None):
        self.playbook = playbook
        self.settings = settings
        self.redis = redis
        self.http = http
        self.sns = sns

    @activity.defn
    def send_notification(self, n: Notification) -> Delivery:
        """One message on one channel (Slack, email, SNS, Statuspage), rendered from the playbook's template.

        Idempotent by `n.key` (incident/tick/channel): a key already in the Redis delivery ledger is not sent
        again (`already_sent`). Non-retryable: NoRedis, UnknownChannel, ChannelNotConfigured, ChannelRejected;
        network errors are retried.
        """
        if self.redis is None:
            raise refused(
                ErrorKind.NoRedis,
                "notifications need redis_url: the delivery ledger that prevents double posts lives there",
            )
        recorded = self.redis.get(LEDGER_PREFIX + n.key)
        if recorded is not None:
            return Delivery.model_validate_json(recorded).model_copy(update={"already_sent": True})
        channel = self.playbook.communication.channels.get(n.channel)
        if channel is None:
            raise refused(
                ErrorKind.UnknownChannel, f"channel {n.channel!r} is not in the playbook's communication.channels"
            )
        context = {"status_page_url": self.settings.status_page_public_url, "alerts": "-", **n.context}
        templates = self.playbook.communication.templates
        message = render(n.kind, templates.get(f"{n.kind}.{context.get('severity')}", templates[n.kind]), context)
        reference = {"slack": self._slack, "email": self._email, "sns": self._sns, "statuspage": self._statuspage}[
            channel.kind
        ](n, channel, message)
        delivery = Delivery(
            key=n.key,
            channel=n.channel,
            kind=n.kind,
            subject=message.subject,
            sent_at=datetime.now(UTC),
            reference=reference,
        )
        self.redis.set(LEDGER_PREFIX + n.key, delivery.model_dump_json(), ex=self.settings.ledger_ttl_days * 86400)
        activity.logger.info("notification sent", extra={"key": n.key, "channel": n.channel})
        return delivery

    def _slack(self, n: Notification, channel: Channel, message: RenderedMessage) -> str:
        url = _required(self.settings.slack_webhook_url, "slack_webhook_url", n.channel)
        resp = self.http.post(url.get_secret_value(), json={"text": f"*{message.subject}*\n{message.body}"})
        _raise_for(resp, n.channel)
        return "slack"

    def _email(self, n: Notification, channel: Channel, message: RenderedMessage) -> str:
        s = self.settings
        host = _required(s.smtp_host, "smtp_host", n.channel)
        mail = EmailMessage()
        mail["From"], mail["To"], mail["Subject"] = s.email_from, ", ".join(channel.to), message.subject
        mail["Date"] = format_datetime(datetime.now(UTC))
        mail["Message-ID"] = f"<{_digest(n.key)[:40]}@drp>"  # same key, same ID
        mail["X-DRP-Incident"], mail["X-DRP-Key"] = n.incident_id, n.key
        mail.set_content(message.body)
        try:
            with smtplib.SMTP(host, s.smtp_port, timeout=15) as smtp:
                if s.smtp_starttls:
                    smtp.starttls()
                if s.smtp_username and s.smtp_password:
                    smtp.login(s.smtp_username, s.smtp_password.get_secret_value())
                smtp.send_message(mail)
        except smtplib.SMTPRecipientsRefused as err:
            raise refused(
                ErrorKind.ChannelRejected, f"{n.channel}: the SMTP server refused {sorted(err.recipients)}"
            ) from err
        except smtplib.SMTPAuthenticationError as err:
            raise refused(
                ErrorKind.ChannelRejected, f"{n.channel}: SMTP login refused; check smtp_username/smtp_password"
            ) from err
        return mail["Message-ID"]

    def _sns(self, n: Notification, channel: Channel, message: RenderedMessage) -> str:
        topic = _required(self.settings.sns_topic_arn, "sns_topic_arn", n.channel)
        if self.sns is None:
            raise refused(ErrorKind.ChannelNotConfigured, f"{n.channel}: no SNS client")
        extra = {}
        if topic.endswith(".fifo"):
            extra = {"MessageGroupId": n.incident_id, "MessageDeduplicationId": _digest(n.key)[:64]}
        subject = " ".join(message.subject.split())[:100]  # SNS: one line, at most 100 characters
        return self.sns.publish(
            TopicArn=topic,
            Subject=subject,
            Message=message.body,
            MessageAttributes={
                "incident_id": {"DataType": "String", "StringValue": n.incident_id},
                "idempotency_key": {"DataType": "String", "StringValue": n.key},
            },
            **extra,
        )["MessageId"]

    def _statuspage(self, n: Notification, channel: Channel, message: RenderedMessage) -> str:
        api = _required(self.settings.status_page_api, "status_page_api", n.channel)
        token = _required(self.settings.status_page_token, "status_page_token", n.channel)
        try:
            return statuspage.open_or_update(
                self.http,
                api,
                token.get_secret_value(),
                n.incident_id,
                n.context.get("title", n.incident_id),
                message.body,
                status=n.status_page_status,
            )
        except httpx.HTTPStatusError as err:
            _raise_for(err.response, n.channel)
            raise


def _required(value, name: str, channel: str):
    if value is None:
        raise refused(ErrorKind.ChannelNotConfigured, f"{channel}: set notify.{name} in the worker's settings")
    return value


def _raise_for(resp: httpx.Response, channel: str) -> None:
    """4xx other than 429 will not get better by retrying: say so; everything else is retried."""
    if resp.is_success:
        return
    if 400 <= resp.status_code < 500 and resp.status_code != 429:
        raise refused(ErrorKind.ChannelRejected, f"{channel}: HTTP {resp.status_code} {resp.text[:200]!r}")
    resp.raise_for_status()


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
