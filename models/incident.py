"""The Incident workflow's contract: how an incident opens, what people send it,
what it reports (playbook sections 2, 5 and 6)."""

from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.approval import ApprovalRecord
from models.identifiers import IncidentId, not_blank
from models.playbook import EscalationLevel, Severity
from models.steps import StepRecord
from models.times import Timestamp

IncidentState = Literal[
    "investigating", "recovering", "awaiting approval", "recovered", "runbook failed", "resolved", "closed"
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AlertSummary(_Frozen):
    fingerprint: str
    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = {}
    starts_at: Timestamp
    ends_at: Timestamp | None = None


class AlertNotice(_Frozen):
    """One Alertmanager notification of a group, as the receiver passed it on (signal `alert`).

    `truncated`: alerts of the group this notice does not list (Alertmanager's `truncatedAlerts` under its
    `max_alerts`, plus what the receiver left out to keep the signal small)."""

    group_key: str
    status: Literal["firing", "resolved"]
    receiver: str
    alerts: list[AlertSummary]
    truncated: int = 0


class IncidentInput(_Frozen):
    """Opening an incident: from an alert, `drp incident open`, a starter script or the Web UI.

    Leave `severity` and `procedure` empty to classify from `labels` with the
    playbook's rules; set them to override the rules. `procedure: none` opens
    an incident without a runbook (people work it; the cadence still runs).

    An incident that stays open for days continues as new before its history
    grows large (when Temporal suggests it, or after `continue_as_new_after`
    history events if set); the next run gets the same input plus `carried`.
    """

    incident_id: IncidentId
    title: str = Field(min_length=1, max_length=200)
    severity: Severity | None = None
    procedure: str | None = None
    runbook_input: dict[str, Any] = {}
    labels: dict[str, str] = {}
    services: list[str] = []
    opened_by: str = "operator"
    started_at: Timestamp | None = None
    follows: str | None = Field(
        default=None,
        max_length=500,
        description=(
            "The earlier incident of the same alert group that a person resolved before the group fired again "
            "(set by the alert receiver), and how it recurred."
        ),
    )
    continue_as_new_after: int | None = Field(default=None, ge=50)
    carried: "IncidentCarry | None" = None  # set by the incident itself when it continues as new


class PlanRequest(_Frozen):
    labels: dict[str, str] = {}
    severity: Severity | None = None
    procedure: str | None = None


class IncidentPlan(_Frozen):
    """Everything the playbook says about one incident, resolved once by an activity (workflows read no files)."""

    severity: Severity
    severity_name: str
    impact: str
    classified_by: str
    procedure: str | None
    workflow: str | None
    runbook_input: dict[str, Any] = {}
    notify: dict[str, list[str]] = {}
    status_update_every: timedelta | None = None
    status_page_update_every: timedelta | None = None
    # Deadlines from the playbook; the incident sends both notices when it opens, well within them.
    customer_notice_within: timedelta | None = None
    exec_notice_within: timedelta | None = None
    levels: list[EscalationLevel]
    repage_every: timedelta
    approval_escalate_after: timedelta
    postmortem_after: timedelta
    responders: list[str]  # everyone in the playbook's people: who may acknowledge
    resolvers: list[str]  # the severity's approver roster: who may resolve or re-classify
    incident_commander: str | None = None
    rto_target: timedelta | None = None
    rpo_target: timedelta | None = None


class AckRequest(_Frozen):
    by: str = Field(max_length=200)
    note: str = Field(default="", max_length=2000)

    _named = field_validator("by")(not_blank)


class AckRecord(_Frozen):
    level: int
    by: str
    at: Timestamp


class ResolveRequest(_Frozen):
    by: str = Field(max_length=200)
    reason: str = Field(max_length=2000)

    _named = field_validator("by", "reason")(not_blank)


class SeverityChange(_Frozen):
    severity: Severity
    by: str = Field(max_length=200)
    reason: str = Field(max_length=2000)

    _named = field_validator("by", "reason")(not_blank)


class RunbookProgress(_Frozen):
    """A runbook's step progress, signalled up to its incident (signal `runbook_progress`)."""

    seq: int
    current_step: str | None
    completed: list[StepRecord]
    awaiting_approval: str | None = None
    decisions: list[ApprovalRecord] = []


class TimelineEvent(_Frozen):
    at: Timestamp
    kind: str  # opened, alert, runbook, step, approval, escalation, page, ack, message, messages (folded
    # at a continue-as-new: workflows/cadence.carried_timeline), severity, resolved, report
    text: str


class IncidentStatus(_Frozen):
    incident_id: str
    title: str
    severity: Severity | None  # None only while the incident is still being classified
    status: IncidentState
    level: int
    acknowledged_level: int
    procedure: str | None
    current_step: str | None
    awaiting_approval: str | None
    timeline: list[TimelineEvent]
    report_uri: str | None = None
    run: int = 1  # 2 and more once the incident has continued as new


class IncidentCarry(_Frozen):
    """The state an incident hands to its next run when it continues as new: the escalation and
    cadence clocks keep counting from `opened_at`, the ticks already sent are not sent again, and
    the timeline, acknowledgements and the runbook's outcome reach the report."""

    plan: IncidentPlan
    opened_at: Timestamp
    status: IncidentState
    timeline: list[TimelineEvent]
    level: int
    level_since: Timestamp | None
    acked_level: int
    fired: list[str]  # keys of the schedule's items already done (only those still on the schedule)
    alerts: dict[str, str] = {}
    progress: RunbookProgress | None = None
    steps_recorded: int = 0
    pending_approval: tuple[str, Timestamp] | None = None
    runbook_id: str | None = None  # the child runbook's workflow ID; it had finished when the incident continued
    runbook_result: dict[str, Any] | None = None
    runbook_error: str | None = None
    labels: tuple[str, str, str] | None = None  # search attributes as last upserted
    run: int = 1  # this incident's run number, 1 for the first
    truncated_alerts: int = 0  # alerts of the group the last notice did not list (Alertmanager's max_alerts)


class IncidentResult(_Frozen):
    incident_id: str
    severity: Severity
    status: IncidentState
    opened_at: Timestamp
    resolved_at: Timestamp
    report_uri: str
    timeline: list[TimelineEvent]


class ReportRequest(_Frozen):
    incident_id: str
    title: str
    plan: IncidentPlan
    status: IncidentState
    opened_at: Timestamp
    resolved_at: Timestamp
    resolved_by: str
    resolution: str
    services: list[str] = []
    timeline: list[TimelineEvent]
    runbook_result: dict[str, Any] | None = None
    runbook_error: str | None = None


IncidentInput.model_rebuild()
