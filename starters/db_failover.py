"""Start DatabaseFailover (playbook 4.2) with validated input and the business-key workflow ID.

python -m starters.db_failover --incident INC-3 [--override-lag]
"""

import argparse
import asyncio
import os

from temporalio.client import Client, WorkflowHandle

from models.failover import PROCEDURE, DatabaseFailoverInput
from starters._start import start_runbook
from workers.temporal_client import connect
from workflows.db_failover import DatabaseFailover


async def start_db_failover(client: Client, inp: DatabaseFailoverInput, task_queue: str) -> WorkflowHandle:
    return await start_runbook(client, PROCEDURE, inp, task_queue, run=DatabaseFailover.run)


async def _main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--incident", required=True)
    parser.add_argument("--override-lag", action="store_true")
    parser.add_argument("--temporal", default=os.environ.get("DRP_TEMPORAL_ADDRESS", "127.0.0.1:7233"))
    parser.add_argument("--task-queue", default=os.environ.get("DRP_TASK_QUEUE", "drp-recovery"))
    args = parser.parse_args()
    inp = DatabaseFailoverInput(incident_id=args.incident, override_lag=args.override_lag)
    handle = await start_db_failover(await connect(args.temporal), inp, args.task_queue)
    print(f"started {handle.id}")


if __name__ == "__main__":
    asyncio.run(_main())
