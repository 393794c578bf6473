"""Start AccidentalDeletionRecovery with validated input and the business-key workflow ID.

    python -m starters.accidental_deletion --incident INC-2 --database corporate_intel \
        --window-start 2026-11-28T14:00:00Z --role analyst --api-key-file key.txt
"""

import argparse
import asyncio
import os

from pydantic import ValidationError
from temporalio.client import Client, WorkflowHandle

from models.deletion import PROCEDURE, AccidentalDeletionInput, api_key_fingerprint
from starters._start import start_runbook
from workers.temporal_client import connect
from workflows.accidental_deletion import AccidentalDeletionRecovery


async def start_accidental_deletion(client: Client, inp: AccidentalDeletionInput, task_queue: str) -> WorkflowHandle:
    return await start_runbook(client, PROCEDURE, inp, task_queue, run=AccidentalDeletionRecovery.run)


async def _main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--incident", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--window-start", required=True, help="with a zone: 2026-11-28T14:00:00Z")
    parser.add_argument("--window-end", help="default: the run's start")
    parser.add_argument("--table")
    parser.add_argument("--role")
    parser.add_argument("--api-key-file", help="file holding the key to block (read here, only its hash is sent)")
    parser.add_argument("--temporal", default=os.environ.get("DRP_TEMPORAL_ADDRESS", "127.0.0.1:7233"))
    parser.add_argument("--task-queue", default=os.environ.get("DRP_TASK_QUEUE", "drp-recovery"))
    args = parser.parse_args()
    fingerprint = api_key_fingerprint(open(args.api_key_file).read()) if args.api_key_file else None
    try:
        inp = AccidentalDeletionInput.model_validate(
            {
                k: v
                for k, v in {
                    "incident_id": args.incident,
                    "database": args.database,
                    "window_start": args.window_start,
                    "window_end": args.window_end,
                    "table": args.table,
                    "role": args.role,
                    "api_key_sha256": fingerprint,
                }.items()
                if v is not None
            }
        )
    except ValidationError as err:
        parser.exit(
            2, "invalid input: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()) + "\n"
        )
    handle = await start_accidental_deletion(await connect(args.temporal), inp, args.task_queue)
    print(f"started {handle.id}")


if __name__ == "__main__":
    asyncio.run(_main())
