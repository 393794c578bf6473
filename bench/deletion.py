"""Benchmark: accidental deletion of ~10k rows in a ~1 GB database, start to rows re-inserted.

    bash scripts/bench.sh deletion [--gb 1.0] [--companies 200]

On a fresh embedded stack grown to --gb GB (bench_filler), a role deletes
--companies companies; filings and metrics cascade (10 + 40 per company, so
200 companies are 10,200 rows). AccidentalDeletionRecovery runs with the
approvals sent the moment they are asked for; the figures are the run's own
step durations and the time from start to the re-insert verified, approval
waits excluded.
"""

import argparse
import asyncio
import json
import time
from datetime import UTC, datetime, timedelta

import psycopg

from bench._stack import grown_stack
from models.approval import ApprovalRequest
from models.deletion import AccidentalDeletionInput
from stack.stack import DATABASE, Stack
from starters._start import wait_for_approval
from starters.accidental_deletion import start_accidental_deletion
from workers.temporal_client import connect
from workflows.accidental_deletion import AccidentalDeletionRecovery


async def run(stack: Stack, companies: int) -> dict:
    with stack.postgres().connect(DATABASE) as conn:
        conn.execute("CREATE ROLE bench_analyst LOGIN PASSWORD 'bench'")
        conn.execute("GRANT SELECT, DELETE ON companies, filings, metrics TO bench_analyst")
    window_start = datetime.now(UTC) - timedelta(seconds=1)
    with psycopg.connect(
        host="127.0.0.1",
        port=stack.config.ports.postgres,
        user="bench_analyst",
        password="bench",
        dbname=DATABASE,
        autocommit=True,
    ) as conn:
        deleted = conn.execute("DELETE FROM companies WHERE id <= %s", (companies,)).rowcount
    with stack.postgres().connect(DATABASE) as conn:
        cascaded = conn.execute("SELECT count(*) FROM audit_log WHERE action = 'DELETE'").fetchone()[0]
    print(f"deleted {deleted} companies, {cascaded} rows in all", flush=True)

    client = await connect(stack.temporal_address)
    t0 = time.monotonic()
    handle = await start_accidental_deletion(
        client,
        AccidentalDeletionInput(
            incident_id=f"BENCH-DEL-{int(time.time())}",
            database=DATABASE,
            window_start=window_start,
            role="bench_analyst",
            lift_approval_timeout=timedelta(seconds=1),
        ),
        stack.task_queue,
    )
    await wait_for_approval(handle, "re-insert", poll_seconds=0.02)
    t = time.monotonic()
    await handle.execute_update(
        AccidentalDeletionRecovery.approve, ApprovalRequest(approver="alice", reason="benchmark")
    )
    waited = time.monotonic() - t
    result = await handle.result()
    steps = {s.name: round(s.duration.total_seconds(), 2) for s in result.steps}
    to_verified = sum(
        v
        for k, v in steps.items()
        if k not in ("approve re-insert", "tear down side instance", "approve lifting containment", "lift containment")
    )
    return {
        "rows_deleted": cascaded,
        "rows_reinserted": sum(result.reinserted.inserted_by_table.values()),
        "start_to_reinserted_verified_s": round(to_verified, 2),
        "steps_s": steps,
        "wall_s_incl_lift_timeout": round(time.monotonic() - t0 - waited, 2),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--companies", type=int, default=200)
    args = parser.parse_args()
    with grown_stack(args.gb) as stack:
        print(json.dumps({"gb": args.gb, **await run(stack, args.companies)}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
