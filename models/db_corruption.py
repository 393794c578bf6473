"""Input and result of the DatabaseCorruptionRecovery runbook."""

from datetime import timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.approval import ApprovalRecord
from models.durations import Duration
from models.identifiers import DatabaseName, PgName
from models.inputs import RunbookInput
from models.steps import StepRecord
from models.times import Timestamp

PROCEDURE = "db-corruption"


class DatabaseCorruptionInput(RunbookInput):
    """One JSON object, the same from the CLI, a starter script or the Web UI.

    Only `incident_id` and `database` are required. Durations accept seconds,
    "15m"-style strings or ISO 8601.
    """

    database: DatabaseName
    incident_started_at: Timestamp | None = Field(
        default=None, description="When the incident began; the run's start time if omitted."
    )
    expected_row_counts: dict[PgName, int] = Field(
        default_factory=dict,
        description="Row counts known from before the incident; verification requires them exactly.",
    )
    backup_id: str | None = Field(
        default=None,
        description="Restore this base backup (barman backup ID) instead of the newest on production's timeline: "
        "when the newest already holds the corruption. It must lie on production's timeline history.",
    )
    app_ready_timeout: Duration = timedelta(minutes=5)


class CorruptionRecoveryResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    incident_id: str
    database: str
    # "recovered_with_possible_loss": the primary was found stopped and the end of its WAL could not be
    # read (see `data_loss`), so commits after the newest recovered one may be gone.
    outcome: Literal["recovered", "no_corruption_found", "recovered_with_possible_loss"]
    corrupted_tables: list[str] = []
    findings: list[str] = []
    steps: list[StepRecord] = []
    approval: ApprovalRecord | None = None
    backup_id: str | None = None
    recovered_row_counts: dict[str, int] = {}
    newest_recovered_commit_at: Timestamp | None = None
    damaged_data_dir: str | None = None
    rto_target: timedelta
    rpo_target: timedelta
    rto_actual: timedelta | None = None
    rpo_actual: timedelta | None = None
    # Empty after any restore (PostgreSQL does not WAL-log them): reported, not compared.
    unlogged_tables: list[str] = []
    # The standby after the recovery: "streaming from the new primary (...)", "diverged: needs rebuild (...)",
    # "none configured"; None for runs from before the rebuild step.
    standby: str | None = None
    timeline: int | None = None  # the new primary's timeline
    followed_timeline: int | None = None  # production's timeline the replay followed (None: the newest)
    # What the damaged primary held that only its own pg_wal had, and what became of it: never-archived
    # segments archived and replayed, or why the end of its WAL is unknown (then `data_loss` says so).
    unarchived_wal: list[str] = []
    data_loss: str | None = None
    # Logical-replication subscriptions the seal disabled (their apply workers write too) and enabled again.
    subscriptions: list[str] = []

    @property
    def rto_met(self) -> bool | None:
        return None if self.rto_actual is None else self.rto_actual <= self.rto_target

    @property
    def rpo_met(self) -> bool | None:
        return None if self.rpo_actual is None else self.rpo_actual <= self.rpo_target
