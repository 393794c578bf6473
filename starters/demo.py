"""The README's first command: a database-corruption drill on the embedded stack.

Brings the stack up, records row counts, corrupts a table's data file on disk,
starts the runbook, approves it as the drill's operator would, and prints the
step timings, RTO and RPO, recovered row counts and the run's Web UI link.
"""

import sys
from datetime import datetime, timezone
from pathlib import Path

from models.approval import ApprovalRequest
from models.db_corruption import CorruptionRecoveryResult, DatabaseCorruptionInput
from stack.corrupt import corrupt_table
from stack.stack import DATABASE, Stack
from starters._start import wait_for_approval
from starters.db_corruption import start_db_corruption
from workers.temporal_client import connect
from workflows.db_corruption import DatabaseCorruptionRecovery

CORRUPTED_TABLE = "companies"


async def run_demo(stack: Stack) -> CorruptionRecoveryResult:
    stack.up(with_worker=True)
    pg = stack.postgres()
    with pg.connect(DATABASE) as conn:
        counts = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                  for t in ("companies", "filings", "metrics")}
    print(f"\nrow counts before the incident: {counts}")
    started = datetime.now(timezone.utc)
    damaged = corrupt_table(pg, DATABASE, CORRUPTED_TABLE)
    print(f"corrupted {CORRUPTED_TABLE}: overwrote bytes of {damaged}")

    incident = "DRILL-" + started.strftime("%Y%m%d-%H%M%S")
    client = await connect(stack.temporal_address)
    handle = await start_db_corruption(client, DatabaseCorruptionInput(
        incident_id=incident, database=DATABASE, incident_started_at=started, expected_row_counts=counts,
    ), stack.task_queue)
    print(f"\nwatch the run: {stack.ui_url}/namespaces/default/workflows/{handle.id}\n")

    step = await wait_for_approval(handle)
    if step:
        print(f"assessment done; approving {step!r} as the drill operator")
        await handle.execute_update(DatabaseCorruptionRecovery.approve,
                                    ApprovalRequest(approver="alice", reason="scheduled monthly restore drill"))
    result = await handle.result()
    print_result(result)
    print(f"\nWeb UI: {stack.ui_url}/namespaces/default/workflows/{handle.id}")
    drp = Path(sys.executable).parent / "drp"
    print(f"The stack keeps running for you to look around; stop it with: {drp} stack down")
    return result


def print_result(result: CorruptionRecoveryResult) -> None:
    print(f"\n{result.incident_id}: {result.outcome}; corrupted tables: {', '.join(result.corrupted_tables) or '-'}")
    print(f"{'step':<28} {'start (UTC)':<10} {'seconds':>8}")
    for step in result.steps:
        print(f"{step.name:<28} {step.started_at:%H:%M:%S}   {step.duration.total_seconds():>8.1f}  {step.outcome}")
    if result.rto_actual is not None:
        print(f"\nRTO {result.rto_actual.total_seconds():.1f}s (target {result.rto_target}) "
              f"{'MET' if result.rto_met else 'MISSED'}")
    if result.rpo_actual is not None:
        print(f"RPO {result.rpo_actual.total_seconds():.1f}s (target {result.rpo_target}) "
              f"{'MET' if result.rpo_met else 'MISSED'}")
    elif result.outcome == "recovered":
        print(f"RPO unknown (target {result.rpo_target}): the primary could not be sealed and no commit "
              "timestamp survived")
    if result.recovered_row_counts:
        print(f"recovered row counts: {result.recovered_row_counts}")
    if result.damaged_data_dir:
        print(f"damaged data kept for forensics at {result.damaged_data_dir}")
