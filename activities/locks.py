"""LockActivities: what the per-database lock (workflows/database_lock.py) needs to know.

The lock's key is the database cluster this worker's runbooks change (adapters/locks.py); a refusal
names the run that holds the lock, read from Temporal itself.
"""

from temporalio import activity
from temporalio.client import Client

from adapters.locks import cluster_name, lock_holder
from adapters.pgserver import PgServer


class LockActivities:
    def __init__(self, client: Client | None, server: PgServer, server_name: str):
        self.client = client
        self.server = server
        self.server_name = server_name

    @activity.defn
    def cluster(self) -> str:
        """'<backup.server_name>-<database system identifier>' of the production data directory (the name
        alone when its control file cannot be read)."""
        return cluster_name(self.server, self.server_name)

    @activity.defn
    async def holder(self, lock_id: str) -> str:
        """'<procedure> run <workflow id> (incident <id>)' for the run holding `lock_id`."""
        if self.client is None:
            raise RuntimeError("LockActivities.holder needs a Temporal client")
        return await lock_holder(self.client, lock_id)
