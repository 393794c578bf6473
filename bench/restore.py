"""Benchmark: the runbook's restore-and-replay against doing the same by hand.

    bash scripts/bench.sh [--gb 1.0] [--wal-mb 256]

Builds a database of about --gb GB on a fresh embedded stack, takes a base
backup to S3 (moto), writes --wal-mb MB of WAL after it, then in one run:
- by hand: barman-cloud-restore into a new directory, recovery.signal +
   restore_command, start, wait for promotion (what an operator would type);
- the runbook: corrupt a table, start DatabaseCorruptionRecovery, approve at
   once, and read the restore and replay step durations from its result;
Order: one by-hand warm-up (caches), the runbook, then by hand twice more from
the same base backup over the same timeline-1 WAL the runbook replayed; the
better of those two is the reference, so noise cannot flatter the runbook.
Prints a JSON summary; BENCHMARKS.md records the figures.
"""

import argparse
import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

from adapters.pgserver import run_as
from adapters.processes import free_port
from bench._stack import grown_stack
from models.approval import ApprovalRequest
from models.db_corruption import DatabaseCorruptionInput
from stack.corrupt import corrupt_table
from stack.stack import DATABASE, Stack
from starters._start import wait_for_approval
from starters.db_corruption import start_db_corruption
from workers.temporal_client import connect
from workflows.db_corruption import DatabaseCorruptionRecovery


def write_wal(stack: Stack, mb: int) -> None:
    with stack.postgres().connect(DATABASE) as conn:
        start = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        batch = 0
        while True:
            conn.execute("UPDATE bench_filler SET payload = md5(payload) WHERE id %% 1000 = %s", (batch % 1000,))
            batch += 1
            written = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (start,)).fetchone()[0]
            if written >= mb * 1024**2:
                break
        conn.execute("SELECT pg_switch_wal()")


def restore_by_hand(stack: Stack, target: Path, backup_id: str) -> dict:
    """The same barman-cloud restore and PostgreSQL recovery, typed by an operator.

    Replays timeline 1 only ('current'), which after the runbook holds exactly
    the WAL the runbook replayed before it promoted to timeline 2.
    """
    barman, pg = stack.barman(), stack.postgres()
    t0 = time.monotonic()
    barman.list_backups()  # the operator looks up the newest backup too
    subprocess.run(run_as(pg.os_user, barman.restore_argv(backup_id, target)), env=barman.env(), check=True)
    t_restore = time.monotonic() - t0
    subprocess.run(run_as(pg.os_user, ["chmod", "700", str(target)]), check=True)
    restore_command = barman.restore_command().replace("'", "''")
    with open(target / "postgresql.auto.conf", "a") as conf:
        conf.write(
            f"restore_command = '{restore_command}'\nrecovery_target_timeline = 'current'\n"
            "recovery_target_action = 'promote'\n"
        )
    (target / "recovery.signal").touch()
    (target / "pg_wal").mkdir(exist_ok=True)
    if pg.os_user:
        subprocess.run(["chown", "-R", f"{pg.os_user}:", str(target)], check=True)
    server = pg.at(target, port=free_port())
    t1 = time.monotonic()
    server.start(wait=False)
    while True:
        try:
            with server.connect() as conn:
                if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    break
        except Exception:  # noqa: BLE001 (starting up)
            pass
        time.sleep(0.05)
    t_replay = time.monotonic() - t1
    server.stop()
    shutil.rmtree(target)
    return {"restore_s": round(t_restore, 2), "replay_s": round(t_replay, 2), "total_s": round(t_restore + t_replay, 2)}


async def runbook(stack: Stack) -> dict:
    corrupt_table(stack.postgres(), DATABASE, "companies")
    client = await connect(stack.temporal_address)
    t0 = time.monotonic()
    handle = await start_db_corruption(
        client, DatabaseCorruptionInput(incident_id=f"BENCH-{int(time.time())}", database=DATABASE), stack.task_queue
    )
    await wait_for_approval(handle, poll_seconds=0.02)
    t_wait = time.monotonic()
    await handle.execute_update(
        DatabaseCorruptionRecovery.approve, ApprovalRequest(approver="alice", reason="benchmark")
    )
    approval_wait = time.monotonic() - t_wait
    result = await handle.result()
    wall = time.monotonic() - t0 - approval_wait
    steps = {s.name: s.duration.total_seconds() for s in result.steps}
    return {
        "restore_s": round(steps["restore base backup"], 2),
        "replay_s": round(steps["replay WAL"], 2),
        "total_s": round(steps["restore base backup"] + steps["replay WAL"], 2),
        "steps_s": {k: round(v, 2) for k, v in steps.items()},
        "run_wall_s_excl_approval": round(wall, 2),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--wal-mb", type=int, default=256)
    args = parser.parse_args()
    with grown_stack(args.gb) as stack:
        write_wal(stack, args.wal_mb)
        backup_id = stack.barman().list_backups()[-1]["backup_id"]
        scratch = stack.pg_dir / "bench-by-hand"
        warm_up = restore_by_hand(stack, scratch, backup_id)  # fills the caches the runbook would profit from
        print("by hand (warm-up, less WAL):", warm_up, flush=True)
        run = await runbook(stack)
        print("runbook:", run, flush=True)
        by_hand_1 = restore_by_hand(stack, scratch, backup_id)
        print("by hand:", by_hand_1, flush=True)
        by_hand_2 = restore_by_hand(stack, scratch, backup_id)
        print("by hand:", by_hand_2, flush=True)
        manual = min(by_hand_1["total_s"], by_hand_2["total_s"])
        summary = {
            "gb": args.gb,
            "wal_mb": args.wal_mb,
            "by_hand_warm_up": warm_up,
            "by_hand": [by_hand_1, by_hand_2],
            "runbook": run,
            "ratio_runbook_to_best_by_hand": round(run["total_s"] / manual, 3),
            "orchestration_overhead_pct": round(100 * (run["total_s"] - manual) / manual, 1),
        }
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
