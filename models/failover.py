"""Input, result and activity messages of the DatabaseFailover runbook (playbook 4.2)."""

from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from models.approval import ApprovalRecord
from models.durations import Duration
from models.identifiers import IncidentId
from models.playbook import Severity
from models.steps import StepRecord

PROCEDURE = "db-failover"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class DatabaseFailoverInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    incident_id: IncidentId
    severity: Severity = Severity.P0
    max_lag_bytes: int = Field(default=16 * 1024 * 1024, ge=0)
    max_lag: Duration = timedelta(seconds=60)
    override_lag: bool = Field(default=False, description="Promote even when the standby lags: a person's call.")
    incident_started_at: datetime | None = None
    approval_timeout: Duration = timedelta(minutes=30)
    heartbeat_timeout: Duration = timedelta(seconds=30)
    app_ready_timeout: Duration = timedelta(minutes=5)


class LagCheck(_Frozen):
    max_lag_bytes: int
    max_lag_seconds: float
    override: bool = False


class StandbyStatus(_Frozen):
    host: str
    port: int
    in_recovery: bool
    streaming: bool
    timeline: int
    receive_lsn: str | None
    replay_lsn: str | None
    primary_reachable: bool
    primary_lsn: str | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    synchronous: bool = False


class FenceRequest(_Frozen):
    incident_id: IncidentId


class Fenced(_Frozen):
    was_running: bool
    final_lsn: str | None = None  # the old primary's last WAL position, when it could be stopped cleanly


class PromoteRequest(_Frozen):
    final_lsn: str | None = None  # the fenced primary's last position, if it could be stopped
    catch_up_seconds: float = 30


class Promoted(_Frozen):
    timeline: int
    promoted_at_lsn: str
    lost_bytes: int | None  # WAL the old primary had that the standby never got; None when unknown
    already_primary: bool = False


class RepointRequest(_Frozen):
    incident_id: IncidentId
    host: str
    port: int


class WriteCheck(_Frozen):
    status: int
    served_by_port: int


class DatabaseFailoverResult(_Frozen):
    incident_id: str
    before: StandbyStatus
    fenced: Fenced
    promoted: Promoted
    write_check: WriteCheck
    approval: ApprovalRecord
    steps: list[StepRecord]
    rto_target: timedelta
    rpo_target: timedelta
    rto_actual: timedelta
    failback: str
