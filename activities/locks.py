"""LockActivities: what the per-database lock (workflows/database_lock.py) needs to know.

The lock's key is the database cluster this worker's runbooks change: its
barman server name (the name its WAL archive is kept under) and PostgreSQL's
database system identifier (from the control file; shared by the cluster's
standbys and restores, different for every initdb). A refusal names the run
that holds the lock, read from Temporal itself.
"""

from temporalio import activity
from temporalio.client import Client

from activities.pgserver import PgServer
from models.locks import LockHolder


class LockActivities:
    def __init__(self, client: Client | None, server: PgServer, server_name: str):
        self.client = client
        self.server = server
        self.server_name = server_name

    @activity.defn
    def cluster(self) -> str:
        """'<backup.server_name>-<database system identifier>' of the production data directory (the name
        alone when its control file cannot be read)."""
        system_id = self.server.control_data().get("Database system identifier")
        return f"{self.server_name}-{system_id}" if system_id else self.server_name

    @activity.defn
    async def holder(self, lock_id: str) -> str:
        """'<procedure> run <workflow id> (incident <id>)' for the run holding `lock_id`."""
        desc = await self.client.get_workflow_handle(lock_id).describe()
        holder = LockHolder.model_validate(await desc.memo_value("holder", {}) or {
            "cluster": "?", "workflow_id": desc.parent_id or "unknown", "run_id": desc.parent_run_id or "",
            "procedure": "a runbook", "incident_id": "unknown"})
        return f"{holder.procedure} run {holder.workflow_id} (incident {holder.incident_id})"
