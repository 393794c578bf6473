"""Start DatabaseCorruptionRecovery the way every entry point should: validated
input, business-key workflow ID, search attributes and a summary for the Web UI.

    python -m starters.db_corruption --incident INC-1 --database corporate_intel
"""

import argparse
import asyncio
import os

from temporalio.client import Client, WorkflowHandle

from models.db_corruption import PROCEDURE, DatabaseCorruptionInput
from starters._start import start_runbook
from workers.temporal_client import connect
from workflows.db_corruption import DatabaseCorruptionRecovery


async def start_db_corruption(client: Client, inp: DatabaseCorruptionInput, task_queue: str) -> WorkflowHandle:
    """Start the runbook; a second start for a running incident fails instead of running twice."""
    return await start_runbook(client, PROCEDURE, inp, task_queue, run=DatabaseCorruptionRecovery.run)


async def _main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--incident", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--severity", default="P0")
    parser.add_argument("--temporal", default=os.environ.get("DRP_TEMPORAL_ADDRESS", "127.0.0.1:7233"))
    parser.add_argument("--task-queue", default=os.environ.get("DRP_TASK_QUEUE", "drp-recovery"))
    args = parser.parse_args()
    inp = DatabaseCorruptionInput(incident_id=args.incident, database=args.database, severity=args.severity)
    handle = await start_db_corruption(await connect(args.temporal), inp, args.task_queue)
    print(f"started {handle.id} (run {handle.result_run_id})")


if __name__ == "__main__":
    asyncio.run(_main())
