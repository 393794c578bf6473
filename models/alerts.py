"""Prometheus Alertmanager's webhook payload (version 4), validated at the receiver's edge.

https://prometheus.io/docs/alerting/latest/configuration/#webhook_config
"""

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.incident import AlertNotice, AlertSummary, IncidentInput
from models.times import Timestamp

# One signal lists at most this many alerts (about 1-2 KB each: far below Temporal's 2 MB payload limit, and a
# timeline people can read); the rest are counted in AlertNotice.truncated.
MAX_ALERTS_PER_NOTICE = 100


class _Payload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")  # newer Alertmanagers may add fields


class WebhookAlert(_Payload):
    status: Literal["firing", "resolved"]
    labels: dict[str, str] = Field(min_length=1)
    annotations: dict[str, str] = {}
    startsAt: Timestamp  # noqa: N815 (Alertmanager's field names)
    endsAt: Timestamp | None = None  # noqa: N815
    generatorURL: str = ""  # noqa: N815
    fingerprint: str = ""


class AlertmanagerWebhook(_Payload):
    version: Literal["4"]
    groupKey: str = Field(min_length=1)  # noqa: N815
    truncatedAlerts: int = 0  # noqa: N815
    status: Literal["firing", "resolved"]
    receiver: str
    groupLabels: dict[str, str] = {}  # noqa: N815
    commonLabels: dict[str, str] = {}  # noqa: N815
    commonAnnotations: dict[str, str] = {}  # noqa: N815
    externalURL: str = ""  # noqa: N815
    alerts: list[WebhookAlert] = Field(min_length=1)

    def incident_id(self, occurrence: int = 1) -> str:
        return incident_id_for(self.groupKey, occurrence)

    def truncated(self) -> int:
        """Alerts of the group this notification's signal will not list: Alertmanager's own count (its
        `max_alerts`) plus those beyond what one signal carries."""
        return self.truncatedAlerts + max(0, len(self.alerts) - MAX_ALERTS_PER_NOTICE)

    def notice(self) -> AlertNotice:
        # Firing alerts first, oldest first: what a responder needs when only some can be listed.
        listed = sorted(self.alerts, key=lambda a: (a.status != "firing", a.startsAt))[:MAX_ALERTS_PER_NOTICE]
        return AlertNotice(
            group_key=self.groupKey,
            status=self.status,
            receiver=self.receiver,
            truncated=self.truncated(),
            alerts=[
                AlertSummary(
                    fingerprint=a.fingerprint or _fingerprint(a.labels),
                    status=a.status,
                    labels=a.labels,
                    annotations=a.annotations,
                    starts_at=a.startsAt,
                    ends_at=a.endsAt if a.endsAt and a.endsAt.year > 1 else None,
                )
                for a in listed
            ],
        )

    def incident_input(self, occurrence: int = 1, follows: str | None = None) -> IncidentInput:
        labels = {**self.groupLabels, **self.commonLabels}
        title = self.commonAnnotations.get("summary") or labels.get("alertname") or "Alertmanager alert group"
        service = labels.get("service")
        return IncidentInput(
            incident_id=self.incident_id(occurrence),
            title=title[:200],
            labels=labels,
            services=[service] if service else [],
            opened_by=f"Alertmanager ({self.receiver})",
            started_at=min(a.startsAt for a in self.alerts),
            follows=follows,
        )


def incident_id_for(group_key: str, occurrence: int = 1) -> str:
    """An alert group's incident: INC-AM-<hash of the groupKey>, and -2, -3 ... for each time the group fires
    again after a person resolved the previous one. Only the groupKey counts, never which alerts a
    notification carries or when they began: every notification of a group finds the same incident."""
    base = f"INC-AM-{hashlib.sha256(group_key.encode()).hexdigest()[:10]}"
    return base if occurrence == 1 else f"{base}-{occurrence}"


def _fingerprint(labels: dict[str, str]) -> str:
    return hashlib.sha256(repr(sorted(labels.items())).encode()).hexdigest()[:16]
