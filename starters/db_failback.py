"""Start DatabaseFailback: home again after DatabaseFailover.

python -m starters.db_failback --incident INC-3
"""

import argparse
import asyncio
import os

from temporalio.client import Client, WorkflowHandle

from models.failover import FAILBACK, DatabaseFailbackInput
from starters._start import start_runbook
from workers.temporal_client import connect
from workflows.db_failback import DatabaseFailback


async def start_db_failback(client: Client, inp: DatabaseFailbackInput, task_queue: str) -> WorkflowHandle:
    return await start_runbook(client, FAILBACK, inp, task_queue, run=DatabaseFailback.run)


async def _main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--incident", required=True)
    parser.add_argument("--temporal", default=os.environ.get("DRP_TEMPORAL_ADDRESS", "127.0.0.1:7233"))
    parser.add_argument("--task-queue", default=os.environ.get("DRP_TASK_QUEUE", "drp-recovery"))
    args = parser.parse_args()
    handle = await start_db_failback(
        await connect(args.temporal), DatabaseFailbackInput(incident_id=args.incident), args.task_queue
    )
    print(f"started {handle.id}")


if __name__ == "__main__":
    asyncio.run(_main())
