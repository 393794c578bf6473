"""Benchmark: DatabaseFailover on the embedded stack, start to a write verified on the new primary.

    bash scripts/bench.sh failover [--runs 3]

Each run builds a fresh stack (primary + asynchronous standby + demo app),
starts the runbook, approves the moment it asks, and reports the run's step
durations. The approval wait is
excluded; the target on this machine is under 10 s.
"""

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench._stack import report_runs
from models.approval import ApprovalRequest
from models.failover import DatabaseFailoverInput
from stack.stack import Stack
from starters._start import wait_for_approval
from starters.db_failover import start_db_failover
from workers.temporal_client import connect
from workflows.db_failover import DatabaseFailover


async def one_run() -> dict:
    state = Path(tempfile.mkdtemp(prefix="drp-bench-fo-"))
    os.chmod(state, 0o755)
    stack = Stack(state, companies=500, task_queue="drp-bench")
    try:
        stack.up(with_worker=True, log=lambda *_: None)
        client = await connect(stack.temporal_address)
        handle = await start_db_failover(
            client, DatabaseFailoverInput(incident_id=f"BENCH-FO-{int(time.time())}"), stack.task_queue
        )
        await wait_for_approval(handle, poll_seconds=0.02)
        await handle.execute_update(DatabaseFailover.approve, ApprovalRequest(approver="alice", reason="bench"))
        result = await handle.result()
        steps = {s.name: round(s.duration.total_seconds(), 2) for s in result.steps}
        return {
            "steps_s": steps,
            "total_excl_approval_s": round(sum(v for k, v in steps.items() if k != "approve"), 2),
            "lost_bytes": result.promoted.lost_bytes,
        }
    finally:
        stack.down(log=lambda *_: None)
        shutil.rmtree(state, ignore_errors=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = [await one_run() for _ in range(args.runs)]
    report_runs(runs)


if __name__ == "__main__":
    asyncio.run(main())
