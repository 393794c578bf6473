"""The per-database lock's key and holder: read from PostgreSQL's control file and from Temporal.

The key is the database cluster the runbooks change: its barman server name (the name its WAL archive
is kept under) and PostgreSQL's database system identifier (from the control file; shared by the
cluster's standbys and restores, different for every initdb).
"""

from temporalio.client import Client

from adapters.pgserver import PgServer
from models.locks import LockHolder


def cluster_name(server: PgServer, server_name: str) -> str:
    """'<backup.server_name>-<database system identifier>' of the production data directory (the name
    alone when its control file cannot be read)."""
    system_id = server.control_data().get("Database system identifier")
    return f"{server_name}-{system_id}" if system_id else server_name


async def lock_holder(client: Client, lock_id: str) -> str:
    """'<procedure> run <workflow id> (incident <id>)' for the run holding the lock workflow `lock_id`."""
    desc = await client.get_workflow_handle(lock_id).describe()
    holder = LockHolder.model_validate(
        await desc.memo_value("holder", {})
        or {
            "cluster": "?",
            "workflow_id": desc.parent_id or "unknown",
            "run_id": desc.parent_run_id or "",
            "procedure": "a runbook",
            "incident_id": "unknown",
        }
    )
    return f"{holder.procedure} run {holder.workflow_id} (incident {holder.incident_id})"
