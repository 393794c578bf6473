"""Input, result and activity messages of the RegionFailover runbook (playbook 4.1)."""

from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field

from models.approval import ApprovalRecord
from models.durations import Duration
from models.failover import Fenced, Promoted
from models.identifiers import IncidentId
from models.inputs import RunbookInput
from models.playbook import Severity
from models.steps import StepRecord
from models.times import Timestamp

PROCEDURE = "region-failover"
FAILBACK = "region-failback"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class RegionFailoverInput(RunbookInput):
    backup_region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")
    health_checks: int = Field(default=3, ge=1, le=20)
    health_check_spacing: Duration = timedelta(seconds=10)
    override_lag: bool = False
    incident_started_at: Timestamp | None = None
    approval_timeout: Duration = timedelta(minutes=30)
    ready_timeout: Duration = timedelta(minutes=10)


class RegionPlan(_Frozen):
    """What the failover will change, checked to exist before anything changes; shown at approval."""

    backup_region: str
    task_queue: str
    database: str = "rds"  # or "self-managed": the worker settings' streaming standby
    primary_health_url: str
    max_lag_seconds: float
    replica_id: str
    hosted_zone_id: str
    record_name: str
    new_target: str
    deployment: str
    replicas: int
    health_url: str


class PrimaryCheck(_Frozen):
    url: str
    checks: int
    spacing_seconds: float


class LagRequest(_Frozen):
    region: str
    replica_id: str
    max_lag_seconds: float
    override: bool = False


class RegionRequest(_Frozen):
    incident_id: IncidentId
    region: str


class DnsSwitched(_Frozen):
    change_id: str | None  # None: the record already pointed at the target and no change of ours was known
    status: str
    record: dict
    already_current: bool = False  # nothing submitted: the record already had the target value
    resumed: bool = False  # an earlier attempt's change (from its heartbeat) was waited on, none submitted


class RdsPromoted(_Frozen):
    replica_id: str
    endpoint: str | None
    port: int = 5432
    already_promoted: bool = False


class Notified(_Frozen):
    message_id: str | None = None
    status_page_incident: str | None = None


class RegionFailoverResult(_Frozen):
    incident_id: str
    plan: RegionPlan
    replica_lag_seconds: float | None
    promoted: RdsPromoted | None = None  # database "rds"
    promoted_standby: Promoted | None = None  # database "self-managed"
    fenced: Fenced | None = None  # database "self-managed": the old primary's fence
    dns: DnsSwitched
    notified: Notified | None
    approval: ApprovalRecord
    steps: list[StepRecord]
    rto_target: timedelta
    rto_actual: timedelta
    failback: str


class RegionFailbackInput(RunbookInput):
    serving_region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$", description="Where traffic is now.")
    severity: Severity = Severity.P2
    approval_timeout: Duration = timedelta(hours=4)
    ready_timeout: Duration = timedelta(minutes=10)


class FailbackPlan(_Frozen):
    home: RegionPlan  # what the failback creates, promotes and switches to
    serving_region: str
    serving_instance: str
    serving_task_queue: str


class HomeReplica(_Frozen):
    replica_id: str
    created: bool


class FailoverHalted(_Frozen):
    """The details of a run that failed after it changed something: what was done, what not, where
    production is, and the command that goes on (and the one that goes back, where there is one)."""

    procedure: str
    incident_id: str
    failed_step: str
    error_type: str | None
    error: str
    done: list[str]  # every change made, in order, with its timing
    not_done: list[str]
    production: str
    next_command: str
    way_back: str | None = None
    steps: list[StepRecord]


class RegionFailbackResult(_Frozen):
    incident_id: str
    plan: FailbackPlan
    replica: HomeReplica
    promoted: RdsPromoted
    dns: DnsSwitched
    approval: ApprovalRecord
    steps: list[StepRecord]
