"""Recovery on the archive as the field meets it (issue: never lose an acknowledged commit).

Each test is one of the inputs that used to fail: a restore whose verification
fails, a WAL gap, other writers, two runs for one database, an archive that
cannot be read, an UNLOGGED table, the standby after a recovery. Every test
counts what was acknowledged before and what is there after, the archive's
timeline history files, and the state production is left in on failure.
"""

import asyncio
import os
import pwd
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import psycopg
import pytest
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import WorkflowFailureError

from adapters.barman import ARCHIVE_UNREADABLE
from adapters.pgserver import run_as
from adapters.sealing import marker_path, read_seal
from models.db_corruption import DatabaseCorruptionInput
from models.failover import DatabaseFailoverInput
from stack.corrupt import corrupt_table
from stack.stack import BUCKET, DATABASE, DUMMY_AWS
from starters.db_corruption import start_db_corruption
from starters.db_failover import start_db_failover
from tests.conftest import (
    approve_when_asked,
    own_stack,
    rebuild_standby,
    row_counts,
    running_worker,
    wait_for_approval_gate,
)
from workers.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def incident() -> str:
    return f"RS-{uuid.uuid4().hex[:8]}"


def s3(stack):
    return boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url=stack.moto_url,
        aws_access_key_id=DUMMY_AWS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_AWS["AWS_SECRET_ACCESS_KEY"],
    )


def wal_keys(stack) -> list[str]:
    prefix = f"{DATABASE}/primary/wals/"
    pages = s3(stack).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def history_files(stack) -> set[str]:
    return {Path(k).name for k in wal_keys(stack) if k.endswith(".history")}


def acknowledged_rows(stack, n: int, marker: str) -> list[int]:
    """Commit n companies one transaction each; return the ids the server acknowledged."""
    ids = []
    with stack.postgres().connect(DATABASE) as conn:
        base = conn.execute("SELECT coalesce(max(id), 0) FROM companies").fetchone()[0]
        for i in range(base + 1, base + n + 1):
            conn.execute(
                "INSERT INTO companies (id, name, ticker, sector) VALUES (%s, %s, %s, 'Energy')",
                (i, f"{marker} {i}", f"A{i}"),
            )
            ids.append(i)
    return ids


def archive_now(stack) -> str:
    """Close the current WAL segment and wait until the archiver has it; returns its name."""
    with stack.postgres().connect(DATABASE) as conn:
        segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
        deadline = time.monotonic() + 300  # an upper bound, not a timing assumption
        while time.monotonic() < deadline:
            last = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]
            if last and last[:24] >= segment:
                return segment
            conn.execute("SELECT pg_sleep(0.1)")
    raise AssertionError(f"{segment} never archived")


def present(stack, ids: list[int]) -> set[int]:
    with stack.postgres().connect(DATABASE) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM companies WHERE id = ANY(%s)", (ids,))}


def drp(stack, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRP_SETTINGS_FILE": str(stack.settings_file)}
    return subprocess.run(
        [sys.executable, "-m", "starters.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env
    )


async def recover(client, queue: str, inc: str, **fields):
    handle = await start_db_corruption(
        client, DatabaseCorruptionInput(incident_id=inc, database=DATABASE, **fields), queue
    )
    await approve_when_asked(handle)
    return handle


async def test_a_failed_restore_archives_nothing_and_production_comes_back_with_every_commit(stack, client):
    before_ids = acknowledged_rows(stack, 10, "before")
    corrupt_table(stack.postgres(), DATABASE, "metrics")
    histories, data_dir = history_files(stack), stack.postgres().data_dir
    inc = incident()
    async with running_worker(client, stack) as queue:
        handle = await recover(client, queue, inc, expected_row_counts={"companies": 1})  # wrong on purpose
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    cause = failed.value.cause
    assert cause.type == "VerificationFailed"
    assert "State left" in cause.message and "drp unseal" in cause.message
    # The promoted restore archived nothing: no foreign timeline in production's archive.
    assert history_files(stack) == histories
    restore = data_dir.with_name(f"{data_dir.name}.restore-{inc}")
    assert (restore / "PG_VERSION").exists() and not (restore / "postmaster.pid").exists()  # kept, stopped
    assert not stack.postgres().is_running() and read_seal(data_dir)["incident_id"] == inc
    assert "sealed by incident" in dict((p, h) for p, _, h in stack.status())["postgres"]

    # The operator abandons the recovery: production comes back as it was, open to writers.
    done = drp(stack, "unseal")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and not marker_path(data_dir).exists()
    after_ids = acknowledged_rows(stack, 10, "after unseal")
    archive_now(stack)

    # A second run recovers along production's own timeline with every acknowledged commit.
    async with running_worker(client, stack) as queue:
        result = await (await recover(client, queue, incident())).result()
    assert result.outcome == "recovered"
    assert present(stack, before_ids + after_ids) == set(before_ids + after_ids)
    assert len(history_files(stack) - histories) == 1  # exactly the one timeline that became production


async def test_a_wal_gap_is_refused_and_a_later_run_still_requires_the_sealed_wal(stack, client):
    acknowledged = acknowledged_rows(stack, 5, "pre-gap")
    gap = archive_now(stack)
    acknowledged += acknowledged_rows(stack, 5, "post-gap")
    corrupt_table(stack.postgres(), DATABASE, "filings")
    histories = history_files(stack)
    client_s3, key = s3(stack), next(k for k in wal_keys(stack) if Path(k).name.startswith(gap))
    body = client_s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    client_s3.delete_object(Bucket=BUCKET, Key=key)
    try:
        async with running_worker(client, stack) as queue:
            handle = await recover(client, queue, incident())
            with pytest.raises(WorkflowFailureError) as failed:
                await handle.result()
        assert failed.value.cause.type == "ReplayIncomplete"
        assert history_files(stack) == histories  # the refused restore archived no timeline
    finally:
        client_s3.put_object(Bucket=BUCKET, Key=key, Body=body)

    # Production stays sealed by the first run; a new incident reuses that seal and must reach its WAL.
    assert not stack.postgres().is_running()
    async with running_worker(client, stack) as queue:
        result = await (await recover(client, queue, incident())).result()
    assert result.outcome == "recovered" and result.rpo_actual.total_seconds() == 0
    assert present(stack, acknowledged) == set(acknowledged)


async def test_other_writers_are_fenced_and_every_acknowledged_commit_survives(stack, client):
    corrupt_table(stack.postgres(), DATABASE, "metrics")
    acknowledged, stop = [], threading.Event()

    def writer():  # a client writing straight into the database, not through the app, as superuser
        while not stop.is_set():
            try:
                with stack.postgres().connect(DATABASE, timeout=2) as conn:
                    while not stop.is_set():
                        acknowledged.append(
                            conn.execute("INSERT INTO app_write_checks DEFAULT VALUES RETURNING id").fetchone()[0]
                        )
            except psycopg.Error:
                stop.wait(0.05)  # fenced, stopped or swapped: try again

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        async with running_worker(client, stack) as queue:
            handle = await recover(client, queue, incident())
            result = await handle.result()
    finally:
        stop.set()
        thread.join(timeout=30)
    assert result.outcome == "recovered"
    with stack.postgres().connect(DATABASE) as conn:
        there = {r[0] for r in conn.execute("SELECT id FROM app_write_checks WHERE id = ANY(%s)", (acknowledged,))}
        assert conn.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()[0]
    assert acknowledged and there == set(acknowledged)


async def test_a_second_run_for_the_same_database_is_refused_naming_the_first(stack, client):
    corrupt_table(stack.postgres(), DATABASE, "metrics")
    first, second = incident(), incident()
    pids = stack.postgres().postmaster_pid(), stack.processes.pid("app")
    async with running_worker(client, stack) as queue:
        holder = await start_db_corruption(client, DatabaseCorruptionInput(incident_id=first, database=DATABASE), queue)
        await wait_for_approval_gate(holder)
        other = await start_db_corruption(client, DatabaseCorruptionInput(incident_id=second, database=DATABASE), queue)
        with pytest.raises(WorkflowFailureError) as refused:
            await other.result()
        assert refused.value.cause.type == "DatabaseBusy"
        assert f"db-corruption-{first}" in refused.value.cause.message
        assert (stack.postgres().postmaster_pid(), stack.processes.pid("app")) == pids  # nothing changed
        await approve_when_asked(holder)
        assert (await holder.result()).outcome == "recovered"
        # Released at the end: the next run for this database may start.
        again = await start_db_corruption(client, DatabaseCorruptionInput(incident_id=second, database=DATABASE), queue)
        assert (await again.result()).outcome == "no_corruption_found"


def test_restore_command_stops_recovery_on_an_unreadable_archive_and_keeps_absent_meaning_absent(stack, tmp_path):
    barman = stack.barman()
    segment = Path(next(k for k in wal_keys(stack) if not k.endswith(".history"))).name.split(".")[0]

    def run(barman, name):
        command = barman.restore_command(tries=2).replace("%f", name).replace("%p", str(tmp_path / name))
        return subprocess.run(["sh", "-c", command], env=barman.env(), capture_output=True, text=True, timeout=120)

    assert run(barman, segment).returncode == 0 and (tmp_path / segment).stat().st_size == 16 * 1024 * 1024
    assert run(barman, "0000000F000000FF000000FE").returncode == 1  # truly absent: "end of archive"
    down = barman.__class__(**{**barman.__dict__, "endpoint_url": "http://127.0.0.1:1"})
    unreadable = run(down, segment)
    assert unreadable.returncode == 126  # PostgreSQL stops with FATAL instead of ending recovery here
    assert ARCHIVE_UNREADABLE in unreadable.stderr


async def test_unlogged_tables_are_named_at_approval_and_do_not_fail_the_verification(stack, client):
    with stack.postgres().connect(DATABASE) as conn:
        conn.execute("CREATE UNLOGGED TABLE IF NOT EXISTS session_cache (id int PRIMARY KEY)")
        conn.execute("INSERT INTO session_cache SELECT g FROM generate_series(1, 100) g ON CONFLICT DO NOTHING")
    before = row_counts(stack)
    corrupt_table(stack.postgres(), DATABASE, "metrics")
    async with running_worker(client, stack) as queue:
        handle = await start_db_corruption(
            client, DatabaseCorruptionInput(incident_id=incident(), database=DATABASE), queue
        )
        await wait_for_approval_gate(handle)
        metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
        assert "UNLOGGED" in metadata.current_details and "session_cache" in metadata.current_details
        await approve_when_asked(handle)
        result = await handle.result()
    assert result.outcome == "recovered" and result.unlogged_tables == ["public.session_cache"]
    assert row_counts(stack) == before
    with stack.postgres().connect(DATABASE) as conn:
        assert conn.execute("SELECT count(*) FROM session_cache").fetchone()[0] == 0  # by PostgreSQL's design


async def test_the_standby_follows_the_recovered_primary(stack, client):
    corrupt_table(stack.postgres(), DATABASE, "metrics")
    async with running_worker(client, stack) as queue:
        result = await (await recover(client, queue, incident())).result()
    assert result.outcome == "recovered" and result.standby.startswith("streaming from the new primary")
    ids = acknowledged_rows(stack, 3, "after recovery")
    async with asyncio.timeout(300):  # an upper bound: the standby replays what the new primary commits
        while True:
            with stack.standby().connect(DATABASE) as conn:
                if len(conn.execute("SELECT id FROM companies WHERE id = ANY(%s)", (ids,)).fetchall()) == 3:
                    break
            await asyncio.sleep(0.1)  # poll interval, not a wait for time to pass
    assert dict((p, h) for p, _, h in stack.status())["standby"] == "up (streaming)"


@pytest.fixture
def forked_pair():
    """A primary and a standby whose histories forked: the standby received WAL past the point where
    the primary's timeline began (what a restore that ignores the standby leaves behind)."""
    with own_stack("drp-test-fork-", companies=20) as s:
        old, new = s.postgres(), s.standby()  # `new` becomes the primary on timeline 2
        new.stop()
        with old.connect(DATABASE) as conn:
            conn.execute("INSERT INTO app_write_checks DEFAULT VALUES")  # only the old timeline has this
        old.stop()
        new.start()  # still a standby: promotion starts timeline 2 where its WAL ends, before old's last write
        with new.connect() as conn:
            conn.execute("SELECT pg_promote(wait => true)")
        with new.connect(DATABASE) as conn:
            conn.execute("INSERT INTO app_write_checks DEFAULT VALUES")  # timeline 2 moves on
        conninfo = f"host={new.host} port={new.port} user={new.superuser} password={new.password}"
        with open(old.data_dir / "postgresql.auto.conf", "a") as conf:
            conf.write(f"primary_conninfo = '{conninfo}'\n")
        subprocess.run(run_as(old.os_user, ["touch", str(old.data_dir / "standby.signal")]), check=True)
        old.start()
        yield s, new, old


async def test_failover_refuses_a_diverged_standby_even_with_override_lag(forked_pair, client):
    stack, primary, diverged_standby = forked_pair
    raw = stack.worker_settings()

    def settings(queue):
        return Settings(
            **{
                **raw,
                "task_queue": queue,
                "postgres": {**raw["postgres"], "port": primary.port, "data_dir": str(primary.data_dir)},
                "standby": {"port": diverged_standby.port, "data_dir": str(diverged_standby.data_dir)},
            }
        )

    async with running_worker(client, stack, settings=settings) as queue:
        handle = await start_db_failover(
            client, DatabaseFailoverInput(incident_id=incident(), override_lag=True), queue
        )
        with pytest.raises(WorkflowFailureError) as refused:
            await handle.result()
    cause = refused.value.cause.cause
    assert cause.type == "StandbyDiverged" and "even with override_lag" in cause.message
    with primary.connect() as conn:  # nothing changed: the primary serves, the standby was not promoted
        assert not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
    with diverged_standby.connect() as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]


async def test_a_tablespace_outside_the_data_directory_is_restored_beside_it_and_swapped_with_it(stack, client):
    location = stack.pg_dir.parent / "tablespaces" / "fast"
    location.mkdir(parents=True, exist_ok=True)
    user = pwd.getpwnam(stack.config.os_user)
    for path in (location.parent, location):
        os.chown(path, user.pw_uid, user.pw_gid)
    with stack.postgres().connect(DATABASE) as conn:
        conn.execute(f"CREATE TABLESPACE fast LOCATION '{location}'")
        conn.execute("CREATE TABLE hot (id int PRIMARY KEY) TABLESPACE fast")
        conn.execute("INSERT INTO hot SELECT g FROM generate_series(1, 500) g")
    stack.base_backup()  # a tablespace created after the newest backup is refused (TablespaceNotInBackup)
    with stack.postgres().connect(DATABASE) as conn:
        conn.execute("INSERT INTO hot SELECT g FROM generate_series(501, 600) g")  # only in WAL
    before = row_counts(stack)
    corrupt_table(stack.postgres(), DATABASE, "metrics")
    inc = incident()
    async with running_worker(client, stack) as queue:
        result = await (await recover(client, queue, inc)).result()
    assert result.outcome == "recovered" and row_counts(stack) == before
    with stack.postgres().connect(DATABASE) as conn:
        assert conn.execute("SELECT count(*) FROM hot").fetchone()[0] == 600
        assert conn.execute("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'fast'").fetchone()[
            0
        ] == str(location)
    damaged = location.with_name(f"fast.damaged-{inc}")
    assert any(damaged.iterdir())  # production's tablespace kept beside it, as evidence
    # The stack's standby shares the host: it cannot hold the tablespace at the same path. Leave the
    # session's stack as the next tests expect it: no tablespace, a streaming standby.
    with stack.postgres().connect(DATABASE) as conn:
        conn.execute("DROP TABLE hot")
        conn.execute("DROP TABLESPACE fast")
    rebuild_standby(stack)
