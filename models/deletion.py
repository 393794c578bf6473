"""Input, result and activity messages of the AccidentalDeletionRecovery runbook."""

from datetime import datetime, timedelta
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from models.approval import ApprovalRecord
from models.durations import Duration
from models.identifiers import IncidentId, PgName
from models.playbook import Severity
from models.steps import StepRecord

PROCEDURE = "accidental-deletion"

# schema.table or table
TableName = Annotated[str, StringConstraints(pattern=r"^([A-Za-z_][A-Za-z0-9_$]{0,62}\.)?[A-Za-z_][A-Za-z0-9_$]{0,62}$")]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class AccidentalDeletionInput(BaseModel):
    """What is known when the runbook starts. The API key is given only as its
    SHA-256 fingerprint (`drp start deletion --api-key` computes it), so no key
    ever reaches a workflow history."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    incident_id: IncidentId
    database: PgName
    window_start: datetime
    window_end: datetime | None = Field(default=None, description="Defaults to the run's start.")
    table: TableName | None = None
    role: PgName | None = None
    api_key_sha256: Sha256Hex | None = None
    severity: Severity = Severity.P1
    incident_started_at: datetime | None = None
    approval_timeout: Duration = timedelta(hours=1)
    lift_approval_timeout: Duration = timedelta(hours=1)
    heartbeat_timeout: Duration = timedelta(seconds=30)

    @model_validator(mode="after")
    def _window_is_ordered(self) -> "AccidentalDeletionInput":
        if self.window_end is not None and self.window_end <= self.window_start:
            raise ValueError("window_end must be after window_start")
        return self


class DeletionQuery(_Frozen):
    """Which audit-log deletions a step is about (the same query everywhere)."""

    database: PgName
    window_start: datetime
    window_end: datetime
    table: TableName | None = None
    role: PgName | None = None


class DeletionFindings(_Frozen):
    rows_by_table: dict[str, int]
    roles: list[str]
    first_deleted_at: datetime
    target_xid: int  # the earliest-committing deleting transaction: recovery stops just before it
    target_commit_at: datetime
    backup_id: str  # the newest base backup that ended before the target


class ContainRequest(_Frozen):
    incident_id: IncidentId
    database: PgName
    role: PgName | None = None
    api_key_sha256: Sha256Hex | None = None


class Containment(_Frozen):
    role: str | None = None
    revoked: list[tuple[str, str]] = []  # (table, privilege) pairs taken from the role
    api_key_sha256: str | None = None


class ExtractRequest(_Frozen):
    incident_id: IncidentId
    query: DeletionQuery
    side_port: int


class Extracted(_Frozen):
    rows_by_table: dict[str, int]
    dependent_rows_by_table: dict[str, int] = {}
    not_in_side_instance: int = 0  # deleted rows created after the recovery target: not recoverable by PITR
    sample: dict[str, list[str]] = {}
    evidence_uri: str


class ReinsertRequest(_Frozen):
    incident_id: IncidentId
    query: DeletionQuery
    side_port: int


class Reinserted(_Frozen):
    inserted_by_table: dict[str, int]
    conflicts_by_table: dict[str, list[str]] = {}
    missing_after_insert: int = 0


class DeletionRecoveryResult(_Frozen):
    incident_id: str
    database: str
    findings: DeletionFindings
    containment: Containment
    containment_lifted: bool
    extracted: Extracted
    reinserted: Reinserted
    approvals: list[ApprovalRecord] = []
    steps: list[StepRecord] = []
    rto_target: timedelta
    rpo_target: timedelta
    rto_actual: timedelta
    rpo_actual: timedelta | None = None
