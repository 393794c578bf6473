"""Messages of the per-database lock (workflows/database_lock.py)."""

from pydantic import BaseModel, ConfigDict


class LockHolder(BaseModel):
    """Who holds a database cluster's lock: the runbook run that changes it."""

    model_config = ConfigDict(frozen=True)

    cluster: str
    workflow_id: str
    run_id: str
    procedure: str
    incident_id: str
