"""Input, result and activity messages of the AccidentalDeletionRecovery runbook."""

import hashlib
from datetime import timedelta
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from models.approval import ApprovalRecord
from models.durations import Duration
from models.identifiers import DatabaseName, IncidentId, PgName, Table
from models.inputs import RunbookInput
from models.playbook import Severity
from models.steps import StepRecord
from models.times import Timestamp

PROCEDURE = "accidental-deletion"
WINDOW_DOC = (
    "Start of the window in which the rows disappeared, with a zone (Z or +01:00). A deletion is in the window "
    "when its transaction COMMITTED in it (pg_xact_commit_timestamp), not when the DELETE statement ran: a DELETE "
    "inside a long transaction takes effect, for everyone else, only at its COMMIT. The audit log's statement "
    "time is never later than the commit, so a window that starts after the DELETE but before the COMMIT "
    "still finds it."
)

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


def api_key_fingerprint(api_key: str) -> str:
    """What the runbook and Redis see of a key: its SHA-256, never the key."""
    return hashlib.sha256(api_key.strip().encode()).hexdigest()


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class AccidentalDeletionInput(RunbookInput):
    """What is known when the runbook starts. The API key is given only as its
    SHA-256 fingerprint (`drp start deletion --api-key` computes it), so no key
    ever reaches a workflow history."""

    database: DatabaseName
    window_start: Timestamp = Field(description=WINDOW_DOC)
    window_end: Timestamp | None = Field(
        default=None, description="End of the window (exclusive); defaults to the run's start. See window_start."
    )
    table: Table | None = Field(
        default=None,
        description=(
            "The table the rows were deleted from, as typed (Orders, public.Orders) or as PostgreSQL prints it "
            '("Orders", public."Orders"); a partitioned table\'s parent or one of its partitions.'
        ),
    )
    role: PgName | None = None
    api_key_sha256: Sha256Hex | None = None
    severity: Severity = Severity.P1
    incident_started_at: Timestamp | None = None
    lift_approval_timeout: Duration = timedelta(hours=1)

    @model_validator(mode="after")
    def _window_is_ordered(self) -> "AccidentalDeletionInput":
        if self.window_end is not None and self.window_end <= self.window_start:
            raise ValueError("window_end must be after window_start")
        return self


class DeletionQuery(_Frozen):
    """Which audit-log deletions a step is about (the same query everywhere)."""

    database: DatabaseName
    window_start: Timestamp
    window_end: Timestamp
    table: Table | None = None
    role: PgName | None = None


class DeletionFindings(_Frozen):
    rows_by_table: dict[str, int]
    roles: list[str]
    first_deleted_at: Timestamp
    target_xid: int  # the earliest-committing deleting transaction: recovery stops just before it
    target_commit_at: Timestamp
    backup_id: str  # the newest base backup that ended before the target


class ContainRequest(_Frozen):
    incident_id: IncidentId
    database: DatabaseName
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
    conflicts_by_table: dict[str, list[str]] = {}  # the first keys of each table's conflicts
    conflict_count_by_table: dict[str, int] = {}  # all of them
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
