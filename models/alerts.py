"""Prometheus Alertmanager's webhook payload (version 4), validated at the receiver's edge.

https://prometheus.io/docs/alerting/latest/configuration/#webhook_config
"""

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.incident import AlertNotice, AlertSummary, IncidentInput
from models.times import Timestamp


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

    def incident_id(self) -> str:
        """The same alert group always maps to the same incident: INC-<date it began>-<group hash>.

        Repeats and new alerts of a group carry the same groupKey, and the group's
        earliest alert keeps its start time, so they all land in one incident."""
        began = min(a.startsAt for a in self.alerts)
        return f"INC-{began:%Y%m%d}-{hashlib.sha256(self.groupKey.encode()).hexdigest()[:8]}"

    def notice(self) -> AlertNotice:
        return AlertNotice(group_key=self.groupKey, status=self.status, receiver=self.receiver, alerts=[
            AlertSummary(fingerprint=a.fingerprint or _fingerprint(a.labels), status=a.status, labels=a.labels,
                         annotations=a.annotations, starts_at=a.startsAt,
                         ends_at=a.endsAt if a.endsAt and a.endsAt.year > 1 else None)
            for a in self.alerts])

    def incident_input(self) -> IncidentInput:
        labels = {**self.groupLabels, **self.commonLabels}
        title = (self.commonAnnotations.get("summary") or labels.get("alertname") or "Alertmanager alert group")
        service = labels.get("service")
        return IncidentInput(incident_id=self.incident_id(), title=title[:200], labels=labels,
                             services=[service] if service else [], opened_by=f"Alertmanager ({self.receiver})",
                             started_at=min(a.startsAt for a in self.alerts))


def _fingerprint(labels: dict[str, str]) -> str:
    return hashlib.sha256(repr(sorted(labels.items())).encode()).hexdigest()[:16]
