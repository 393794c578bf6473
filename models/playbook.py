"""The playbook's objectives, SLA and severities, loaded from playbook.yaml.

A playbook with a wrong value must stop everything before it starts: a
recovery measured against a mistyped RTO is worse than no measurement.
"""

from datetime import timedelta
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.durations import Duration


class Severity(str, Enum):
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

class ProcedurePolicy(_Frozen):
    workflow: str
    rto: str
    rpo: str

class Playbook(_Frozen):
    version: str
    recovery_objectives: RecoveryObjectives
    sla: Sla
    severities: dict[Severity, SeverityPolicy]
    procedures: dict[str, ProcedurePolicy]

    @model_validator(mode="after")
    def _references_resolve(self) -> "Playbook":
        missing = [s.value for s in Severity if s not in self.severities]
        if missing:
            raise ValueError(f"severities: missing {', '.join(missing)}")
        for name, proc in self.procedures.items():
            if proc.rto not in self.recovery_objectives.rto:
                raise ValueError(f"procedures.{name}.rto: {proc.rto!r} is not a key of recovery_objectives.rto")
            if proc.rpo not in self.recovery_objectives.rpo:
                raise ValueError(f"procedures.{name}.rpo: {proc.rpo!r} is not a key of recovery_objectives.rpo")
        return self

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
        return Playbook.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()
        )
        raise PlaybookError(f"{path}: invalid playbook: {problems}") from err
