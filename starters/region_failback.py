"""Start RegionFailback: home again after RegionFailover.

python -m starters.region_failback --incident INC-4 --serving-region us-west-2
"""

import argparse
import asyncio
import os

from temporalio.client import Client, WorkflowHandle

from models.region import FAILBACK, RegionFailbackInput
from starters._start import start_runbook
from workers.temporal_client import connect
from workflows.region_failback import RegionFailback


async def start_region_failback(client: Client, inp: RegionFailbackInput, task_queue: str) -> WorkflowHandle:
    return await start_runbook(client, FAILBACK, inp, task_queue, run=RegionFailback.run)


async def _main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--incident", required=True)
    parser.add_argument("--serving-region", required=True)
    parser.add_argument("--temporal", default=os.environ.get("DRP_TEMPORAL_ADDRESS", "127.0.0.1:7233"))
    parser.add_argument("--task-queue", default=os.environ.get("DRP_TASK_QUEUE", "drp-recovery"))
    args = parser.parse_args()
    inp = RegionFailbackInput(incident_id=args.incident, serving_region=args.serving_region)
    handle = await start_region_failback(await connect(args.temporal), inp, args.task_queue)
    print(f"started {handle.id}")


if __name__ == "__main__":
    asyncio.run(_main())
