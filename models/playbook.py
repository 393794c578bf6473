"""The playbook's objectives, SLA and severities, loaded from playbook.yaml.

A playbook with a wrong value must stop everything before it starts: a
recovery measured against a mistyped RTO is worse than no measurement.
"""

import re
from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from models.durations import Duration
from models.templates import MESSAGE_KINDS, TemplateError, parse_template


class Severity(str, Enum):  # noqa: UP042 - not StrEnum: str()/format() of members must not change
    P0 = "P0"
    P1 = "P1"
    P2 = "P2"
    P3 = "P3"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RecoveryObjectives(_Frozen):
    rto: dict[str, Duration]
    rpo: dict[str, Duration]


class Sla(_Frozen):
    availability_percent: float = Field(gt=0, le=100)
    monthly_downtime_budget: Duration
    p99_latency: Duration
    max_error_rate_percent: float = Field(ge=0, le=100)
    support_response: dict[Severity, Duration] = {}


class SeverityPolicy(_Frozen):
    name: str
    response_time: Duration
    impact: str
    response_team: list[str] = Field(min_length=1)
    status_update_every: Duration | None = None
    status_page_update_every: Duration | None = None
    customer_notification_within: Duration | None = None
    exec_notification_within: Duration | None = None
    # Which channels (names in communication.channels) carry each kind of message.
    notify: dict[str, list[str]] = {}
    # Roles that may approve a runbook's gate at this severity: "*" for any gate, or
    # "<procedure>" / "<procedure>/<gate>" for one; the most specific key wins.
    approvers: dict[str, list[str]] = Field(min_length=1)
    # Nobody decided a pending approval within this: page the next escalation level.
    approval_escalate_after: Duration = timedelta(minutes=15)

    @field_validator("approvers")
    @classmethod
    def _default_roster(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        if "*" not in value:
            raise ValueError('needs a "*" entry: the roles that may approve any gate at this severity')
        return value


class ProcedurePolicy(_Frozen):
    """Which objectives one registered runbook (models/runbooks.py) is measured against."""

    rto: str
    rpo: str
    # Older playbooks named the workflow type here; the runbook registry names it now. Still accepted
    # when it agrees with the registry.
    workflow: str | None = None


class Person(_Frozen):
    roles: list[str] = Field(min_length=1)
    email: str | None = None


class Channel(_Frozen):
    """A destination: the secrets that reach it (webhook URL, SMTP password, API key) are the worker's settings."""

    kind: Literal["slack", "email", "sns", "statuspage"]
    to: list[str] = []  # email recipients

    @model_validator(mode="after")
    def _email_has_recipients(self) -> "Channel":
        if self.kind == "email" and not self.to:
            raise ValueError("an email channel needs `to` recipients")
        return self


class EscalationLevel(_Frozen):
    level: int = Field(ge=1)
    name: str
    after: Duration  # since the incident opened, if still unresolved
    roles: list[str] = Field(min_length=1)
    channels: list[str] = Field(min_length=1)


class Escalation(_Frozen):
    levels: list[EscalationLevel] = Field(min_length=1)
    repage_every: Duration = timedelta(minutes=5)  # the current level is paged again until someone acks

    @model_validator(mode="after")
    def _ordered(self) -> "Escalation":
        if self.levels[0].after != timedelta(0):
            raise ValueError("the first level is paged when the incident opens: its `after` must be 0s")
        for before, after in zip(self.levels, self.levels[1:], strict=False):
            if after.level != before.level + 1 or after.after <= before.after:
                raise ValueError(f"level {after.level} must follow level {before.level} and come later")
        return self


class Communication(_Frozen):
    channels: dict[str, Channel]
    templates_dir: str = "templates"  # relative to the playbook file
    # Filled by load_playbook from templates_dir, checked there: "kind" or "kind.P1" -> template text.
    templates: dict[str, str] = {}


class ClassificationRule(_Frozen):
    """Alerts whose labels all match (regular expressions, whole value) get this severity and runbook."""

    match: dict[str, str] = Field(min_length=1)
    severity: Severity
    procedure: str | None = None
    runbook_input: dict[str, Any] = {}
    input_from_labels: dict[str, str] = {}  # runbook input field -> alert label it is read from

    @field_validator("match")
    @classmethod
    def _patterns_compile(cls, value: dict[str, str]) -> dict[str, str]:
        for label, pattern in value.items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"match.{label}: {pattern!r} is not a regular expression: {err}") from None
        return value

    def matches(self, labels: dict[str, str]) -> bool:
        return all(re.fullmatch(pattern, labels.get(label, "")) for label, pattern in self.match.items())


class Classification(_Frozen):
    rules: list[ClassificationRule] = []
    # When no rule matches: the alert's own `severity` label, mapped; else the default.
    severity_labels: dict[str, Severity] = {}
    default_severity: Severity = Severity.P2


class Playbook(_Frozen):
    version: str
    recovery_objectives: RecoveryObjectives
    sla: Sla
    severities: dict[Severity, SeverityPolicy]
    procedures: dict[str, ProcedurePolicy]
    people: dict[str, Person]
    escalation: Escalation
    communication: Communication
    classification: Classification = Classification()
    postmortem_within: Duration = timedelta(hours=48)

    @model_validator(mode="after")
    def _references_resolve(self) -> "Playbook":
        missing = [s.value for s in Severity if s not in self.severities]
        if missing:
            raise ValueError(f"severities: missing {', '.join(missing)}")
        from models.runbooks import (
            BY_PROCEDURE,  # here: the registry imports models that import this module
        )

        for name, proc in self.procedures.items():
            if name not in BY_PROCEDURE:
                raise ValueError(f"procedures.{name}: not a runbook; one of {', '.join(BY_PROCEDURE)}")
            if proc.workflow is not None and proc.workflow != BY_PROCEDURE[name].workflow_type:
                raise ValueError(
                    f"procedures.{name}.workflow: {proc.workflow!r}, but the {name} runbook's workflow "
                    f"type is {BY_PROCEDURE[name].workflow_type!r} (the key can be left out)"
                )
            if proc.rto not in self.recovery_objectives.rto:
                raise ValueError(f"procedures.{name}.rto: {proc.rto!r} is not a key of recovery_objectives.rto")
            if proc.rpo not in self.recovery_objectives.rpo:
                raise ValueError(f"procedures.{name}.rpo: {proc.rpo!r} is not a key of recovery_objectives.rpo")
        channels = self.communication.channels
        roles = {role for person in self.people.values() for role in person.roles}
        for sev, policy in self.severities.items():
            for kind, names in policy.notify.items():
                if kind not in MESSAGE_KINDS:
                    raise ValueError(
                        f"severities.{sev.value}.notify.{kind}: not a message kind ({', '.join(sorted(MESSAGE_KINDS))})"
                    )
                _known(names, channels, f"severities.{sev.value}.notify.{kind}", "communication.channels")
            for action, allowed in policy.approvers.items():
                _known(allowed, roles, f"severities.{sev.value}.approvers.{action}", "any person's roles")
                procedure = action.split("/")[0]
                if action != "*" and procedure not in self.procedures:
                    raise ValueError(f"severities.{sev.value}.approvers.{action}: {procedure!r} is not a procedure")
        for level in self.escalation.levels:
            _known(level.channels, channels, f"escalation.levels[{level.level}].channels", "communication.channels")
        for i, rule in enumerate(self.classification.rules):
            if rule.procedure is not None and rule.procedure not in self.procedures:
                raise ValueError(f"classification.rules.{i}.procedure: {rule.procedure!r} is not a procedure")
        return self

    def approvers_for(self, severity: Severity, procedure: str) -> dict[str, list[str]]:
        """Who (people's handles) may decide each gate of one runbook: gate -> handles, "*" for the rest."""
        rules = self.severities[severity].approvers

        def handles(roles: list[str]) -> list[str]:
            return sorted(name for name, person in self.people.items() if set(person.roles) & set(roles))

        roster = {"*": handles(rules.get(procedure, rules["*"]))}
        prefix = f"{procedure}/"
        roster.update(
            {key.removeprefix(prefix): handles(roles) for key, roles in rules.items() if key.startswith(prefix)}
        )
        return roster

    def objectives_for(self, procedure: str) -> "Objectives":
        """RTO and RPO targets of one procedure, for its result."""
        proc = self.procedures.get(procedure)
        if proc is None:
            raise KeyError(f"procedure {procedure!r} is not in the playbook's procedures")
        return Objectives(
            rto=self.recovery_objectives.rto[proc.rto],
            rpo=self.recovery_objectives.rpo[proc.rpo],
        )


class Objectives(_Frozen):
    rto: timedelta
    rpo: timedelta


def _known(names: list[str], known, where: str, what: str) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{where}: {', '.join(map(repr, unknown))} not in {what}")


class PlaybookError(Exception):
    """The playbook file cannot be used; the message names the file and field."""


def load_playbook(path: Path | str) -> Playbook:
    """Load and validate a playbook file, or raise PlaybookError saying what is wrong where."""
    import yaml  # not imported at module level: workflows import this module's models

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise PlaybookError(f"{path}: cannot read the playbook: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise PlaybookError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise PlaybookError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        playbook = Playbook.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors())
        raise PlaybookError(f"{path}: invalid playbook: {problems}") from err
    return _with_templates(playbook, path)


def _with_templates(playbook: Playbook, path: Path) -> Playbook:
    """Read every message template now, so a typo in one stops the worker instead of a 3 a.m. notice."""
    folder = path.parent / playbook.communication.templates_dir
    texts = {}
    # <kind>.txt for every kind; <kind>.<severity>.txt where one severity says it differently
    # (the playbook's P1 customer notice offers a workaround, P0's does not).
    files = [(kind, folder / f"{kind}.txt") for kind in sorted(MESSAGE_KINDS)]
    files += [
        (f"{kind}.{sev.value}", folder / f"{kind}.{sev.value}.txt")
        for kind in sorted(MESSAGE_KINDS)
        for sev in Severity
        if (folder / f"{kind}.{sev.value}.txt").exists()
    ]
    for name, file in files:
        kind = name.split(".")[0]
        try:
            texts[name] = file.read_text()
            parse_template(kind, texts[name])
        except OSError as err:
            raise PlaybookError(f"{file}: cannot read the {kind} template: {err.strerror}") from err
        except TemplateError as err:
            raise PlaybookError(f"{file}: {err}") from err
    return playbook.model_copy(update={"communication": playbook.communication.model_copy(update={"templates": texts})})
