"""A fresh embedded stack grown to a given size, with a base backup, for one benchmark run."""

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from stack.stack import DATABASE, Stack


def grow(stack: Stack, gb: float) -> None:
    rows = int(gb * 1024**3 / 330)  # ~330 bytes per row on disk with this payload
    with stack.postgres().connect(DATABASE) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_filler (id bigint PRIMARY KEY, payload text NOT NULL)")
        conn.execute(
            "INSERT INTO bench_filler SELECT i, repeat(md5(i::text), 8) FROM generate_series(1, %s) i "
            "ON CONFLICT DO NOTHING",
            (rows,),
        )
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    print(f"database size {size / 1024**3:.2f} GiB", flush=True)


@contextlib.contextmanager
def grown_stack(gb: float):
    state = Path(tempfile.mkdtemp(prefix="drp-bench-"))
    os.chmod(state, 0o755)
    stack = Stack(state, companies=2000, task_queue="drp-bench")
    try:
        stack.up(with_worker=True)
        grow(stack, gb)
        t = time.monotonic()
        stack.base_backup()
        print(f"base backup took {time.monotonic() - t:.1f}s", flush=True)
        yield stack
    finally:
        stack.down(log=lambda *_: None)
        shutil.rmtree(state, ignore_errors=True)


def report_runs(runs: list[dict]) -> None:
    """Each run's JSON line, then the median and worst total (approval excluded)."""
    import json
    import statistics

    for run in runs:
        print(json.dumps(run), flush=True)
    totals = [r["total_excl_approval_s"] for r in runs]
    print(
        json.dumps(
            {
                "runs": len(runs),
                "median_total_excl_approval_s": statistics.median(totals),
                "max_total_excl_approval_s": max(totals),
            },
            indent=2,
        )
    )
