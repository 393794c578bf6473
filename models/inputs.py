"""The fields every runbook's input has, in one base model.

Each runbook's input (models/<runbook>.py) subclasses `RunbookInput` and may change a default (a
failback is P2 and waits longer for its approval than a failover). One JSON object, the same from the
CLI, a starter script, an incident or the Web UI; durations accept seconds, "15m"-style strings or
ISO 8601.
"""

from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field

from models.durations import Duration
from models.identifiers import IncidentId
from models.playbook import Severity


class RunbookInput(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    incident_id: IncidentId = Field(description="The incident this run belongs to; part of its workflow ID.")
    severity: Severity = Severity.P0
    approval_timeout: Duration = Field(
        default=timedelta(hours=1),
        description="No decision within this fails the run, having changed nothing past the gate.",
    )
    heartbeat_timeout: Duration = Field(
        default=timedelta(seconds=30),
        description="A long step that stops heartbeating for this long is retried on another worker.",
    )
