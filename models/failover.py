"""Input, result and activity messages of the DatabaseFailover runbook (playbook 4.2)."""

from datetime import timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.approval import ApprovalRecord
from models.durations import Duration
from models.identifiers import IncidentId
from models.inputs import RunbookInput
from models.playbook import Severity
from models.steps import StepRecord
from models.times import Timestamp

PROCEDURE = "db-failover"
FAILBACK = "db-failback"

# The two servers as the worker settings name them (`postgres` and `standby`);
# after a failover the "standby" is the primary, and a failback swaps them back.
Role = Literal["primary", "standby"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class DatabaseFailoverInput(RunbookInput):
    max_lag_bytes: int = Field(default=16 * 1024 * 1024, ge=0)
    max_lag: Duration = timedelta(seconds=60)
    override_lag: bool = Field(default=False, description="Promote even when the standby lags: a person's call.")
    incident_started_at: Timestamp | None = None
    approval_timeout: Duration = timedelta(minutes=30)
    app_ready_timeout: Duration = timedelta(minutes=5)


class LagCheck(_Frozen):
    max_lag_bytes: int
    max_lag_seconds: float
    override: bool = False
    replica: Role = "standby"  # the server to check; the other one is its source


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
    # The replica holds WAL its source's history never had (a fork): it can never follow it.
    diverged: bool = False
    source_timeline: int | None = None


class FenceRequest(_Frozen):
    incident_id: IncidentId
    server: Role = "primary"


class Fenced(_Frozen):
    was_running: bool
    final_lsn: str | None = None  # the old primary's last WAL position, when it could be stopped cleanly


class PromoteRequest(_Frozen):
    server: Role = "standby"
    final_lsn: str | None = None  # the fenced primary's last position, if it could be stopped
    catch_up_seconds: float = 30
    # The synchronous_standby_names this server had as a primary before a rejoin replaced its configuration
    # (DatabaseFailback): what to restore once its standby streams again.
    synchronous_standby_names: str | None = None


class Promoted(_Frozen):
    timeline: int
    promoted_at_lsn: str
    lost_bytes: int | None  # WAL the old primary had that the standby never got; None when unknown
    already_primary: bool = False
    # Synchronous replication paused at the promotion (Patroni's way: no standby exists yet, so a
    # synchronous_standby_names left set would hold every commit): the value to restore once a standby streams.
    synchronous_paused: str | None = None


class RejoinRequest(_Frozen):
    incident_id: IncidentId
    server: Role  # the fenced former primary, to become a standby of `source`
    source: Role
    # rewind: pg_rewind, a base backup if that fails; basebackup: a fresh base backup (after a restore,
    # the new primary lacks the WAL before its fork that a rewind needs).
    method: Literal["rewind", "basebackup"] = "rewind"
    # Set synchronous_standby_names on `source` to this once `server` streams, if a standby then confirms
    # synchronously (else it is left off and the result says so).
    restore_synchronous_standby_names: str | None = None


class Rejoined(_Frozen):
    method: Literal["already following", "pg_rewind", "pg_basebackup"]
    moved_aside: str | None = None  # a data directory kept instead of rewound (pg_rewind failed)
    # `server`'s own synchronous_standby_names before the rejoin replaced its configuration with the source's.
    synchronous_standby_names: str | None = None
    synchronous: str | None = None  # what became of a requested synchronous_standby_names, in words


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


class DatabaseFailbackInput(RunbookInput):
    severity: Severity = Severity.P2
    max_lag_bytes: int = Field(default=0, ge=0)
    catch_up_timeout: Duration = timedelta(minutes=10)
    approval_timeout: Duration = timedelta(hours=4)
    app_ready_timeout: Duration = timedelta(minutes=5)


class DatabaseFailbackResult(_Frozen):
    incident_id: str
    rejoined_old_primary: Rejoined
    fenced: Fenced
    promoted: Promoted
    write_check: WriteCheck
    rejoined_standby: Rejoined
    approval: ApprovalRecord
    steps: list[StepRecord]
