"""Start RegionFailover (playbook 4.1) with validated input and the business-key workflow ID.

python -m starters.region_failover --incident INC-4 --backup-region us-west-2
"""

import argparse
import asyncio
import os

from temporalio.client import Client, WorkflowHandle

from models.region import PROCEDURE, RegionFailoverInput
from starters._start import start_runbook
from workers.temporal_client import connect
from workflows.region_failover import RegionFailover


async def start_region_failover(client: Client, inp: RegionFailoverInput, task_queue: str) -> WorkflowHandle:
    return await start_runbook(client, PROCEDURE, inp, task_queue, run=RegionFailover.run)


async def _main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--incident", required=True)
    parser.add_argument("--backup-region", required=True)
    parser.add_argument("--override-lag", action="store_true")
    parser.add_argument("--temporal", default=os.environ.get("DRP_TEMPORAL_ADDRESS", "127.0.0.1:7233"))
    parser.add_argument("--task-queue", default=os.environ.get("DRP_TASK_QUEUE", "drp-recovery"))
    args = parser.parse_args()
    inp = RegionFailoverInput(
        incident_id=args.incident, backup_region=args.backup_region, override_lag=args.override_lag
    )
    handle = await start_region_failover(await connect(args.temporal), inp, args.task_queue)
    print(f"started {handle.id}")


if __name__ == "__main__":
    asyncio.run(_main())
