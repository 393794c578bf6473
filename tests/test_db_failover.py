"""DatabaseFailover on a real primary and synchronous streaming standby.

A stack of its own (PostgreSQL pair, S3, Redis, demo app; the session's
Temporal): a failover changes which server is the primary, and the other
tests need theirs to stay put.
"""

import asyncio
import os
import signal
import threading
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
from temporalio.client import WorkflowFailureError

from models.db_corruption import DatabaseCorruptionInput
from models.failover import DatabaseFailbackInput, DatabaseFailoverInput
from models.region import RegionFailoverInput
from stack.corrupt import corrupt_table
from stack.stack import DATABASE
from starters.db_corruption import start_db_corruption
from starters.db_failback import start_db_failback
from starters.db_failover import start_db_failover
from starters.region_failover import start_region_failover
from tests.conftest import approve_when_asked, own_stack, running_worker, wait_for_approval_gate
from tests.test_archive_gaps import drp_start
from tests.test_kubernetes_platform import fake_deployment_controller
from tests.test_region_failover import (
    BACKUP,
    NAME,
    NS,
    Health,
    deploy_backup,
    raw_settings,
    record,
    region_workers,
)
from workers.settings import Settings
from workflows.db_failover import DatabaseFailover


@pytest.fixture(scope="module")
def pair():
    with own_stack("drp-test-failover-", companies=50, synchronous_standby=True) as s:
        yield s


class AcknowledgedWriter(threading.Thread):
    """Commits rows on the primary until it dies; remembers every commit the server acknowledged."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.acknowledged = server, []

    def run(self):
        try:
            with self.server.connect(DATABASE) as conn:
                while True:
                    self.acknowledged.append(
                        conn.execute("INSERT INTO app_write_checks DEFAULT VALUES RETURNING id").fetchone()[0]
                    )
        except psycopg.Error:
            return  # the primary is gone


def incident() -> str:
    return f"FO-{uuid.uuid4().hex[:8]}"


async def test_a_lagging_standby_is_refused_and_nothing_changes(pair, client):
    primary, standby = pair.postgres(), pair.standby()
    with standby.connect() as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
    try:
        with primary.connect(DATABASE) as conn:
            conn.execute("INSERT INTO app_write_checks DEFAULT VALUES")
        async with running_worker(client, pair) as queue:
            handle = await start_db_failover(
                client, DatabaseFailoverInput(incident_id=incident(), max_lag_bytes=0), queue
            )
            with pytest.raises(WorkflowFailureError) as failed:
                await handle.result()
    finally:
        with standby.connect() as conn:
            conn.execute("SELECT pg_wal_replay_resume()")
    assert failed.value.cause.cause.type == "StandbyLagging"
    assert "override_lag" in failed.value.cause.cause.message
    assert primary.is_running()
    with standby.connect() as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]


async def test_failover_after_the_primary_crashes_loses_no_acknowledged_commit(pair, client):
    primary, standby = pair.postgres(), pair.standby()
    writer = AcknowledgedWriter(primary)
    writer.start()
    async with asyncio.timeout(120):
        while len(writer.acknowledged) <= 10:  # some commits acknowledged, more in flight
            await asyncio.sleep(0.05)
    os.kill(primary.postmaster_pid(), signal.SIGKILL)  # the primary dies mid-write
    writer.join(timeout=30)
    assert len(writer.acknowledged) > 10

    inc = incident()
    async with running_worker(client, pair) as queue:
        handle = await start_db_failover(client, DatabaseFailoverInput(incident_id=inc), queue)
        await approve_when_asked(handle, approver="bob", reason="primary down")
        result = await handle.result()
        progress = await handle.query(DatabaseFailover.progress)
    assert progress.total_steps == len(result.steps) == 8  # the Web UI's "Step n/N" reached N

    assert not result.before.primary_reachable and result.fenced.final_lsn is None
    assert result.promoted.lost_bytes is None  # a crashed primary's end is unknown; the count below is the proof
    with standby.connect(DATABASE) as conn:
        assert not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
        present = {r[0] for r in conn.execute("SELECT id FROM app_write_checks")}
    assert set(writer.acknowledged) <= present  # synchronous replication: nothing acknowledged is lost
    # The old primary is fenced: stopped, and it would come back read-only.
    assert not primary.is_running() and (primary.data_dir / "standby.signal").exists()
    # The application now writes to the promoted standby.
    assert result.write_check.served_by_port == standby.port
    resp = httpx.post(f"{pair.app_url}/api/v1/write-check")
    assert resp.status_code == 201 and resp.json()["server_port"] == standby.port
    assert "pg_rewind" in result.failback


async def test_failback_restores_the_topology_with_the_data_written_in_between(pair, client):
    """Runs after the failover above: the standby serves, the old primary is fenced."""
    primary, standby = pair.postgres(), pair.standby()
    with standby.connect(DATABASE) as conn:
        in_between = [
            conn.execute("INSERT INTO app_write_checks DEFAULT VALUES RETURNING id").fetchone()[0] for _ in range(25)
        ]
    async with running_worker(client, pair) as queue:
        handle = await start_db_failback(client, DatabaseFailbackInput(incident_id=incident()), queue)
        await approve_when_asked(handle, approver="bob", reason="region back")
        result = await handle.result()

    assert result.rejoined_old_primary.method == "pg_rewind"
    assert result.write_check.served_by_port == primary.port
    with primary.connect(DATABASE) as conn:
        assert not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
        present = {r[0] for r in conn.execute("SELECT id FROM app_write_checks")}
    assert set(in_between) <= present  # written on the standby while it was primary
    with standby.connect() as conn:
        in_recovery, sender = conn.execute(
            "SELECT pg_is_in_recovery(), (SELECT sender_port FROM pg_stat_wal_receiver)"
        ).fetchone()
    assert in_recovery and sender == primary.port  # the original topology is back


async def test_region_failover_can_promote_the_self_managed_standby(pair, client, aws, world, kmock):
    """RegionFailover with `failover.database = self-managed`: the standby of the pair is promoted
    (after the failback above, the original topology is back), then DNS and the backup cluster."""
    primary, standby = pair.postgres(), pair.standby()
    down, backup = Health(None), Health(200)
    await deploy_backup(kmock)
    stop = asyncio.Event()
    controller = asyncio.create_task(fake_deployment_controller(kmock, stop, NS, NAME))
    raw = raw_settings(pair, aws, world, kmock, down, backup, f"rs-{uuid.uuid4().hex[:8]}")
    raw["failover"]["database"] = "self-managed"
    try:
        async with region_workers(client, Settings(**raw)) as queue:
            handle = await start_region_failover(
                client, RegionFailoverInput(incident_id=incident(), backup_region=BACKUP, health_checks=1), queue
            )
            await wait_for_approval_gate(handle)
            # It holds the database lock: a DatabaseFailover of the same pair, from `drp`, is refused.
            other = await drp_start(
                client, pair, queue, "failover", incident(), temporal=client.service_client.config.target_host
            )
            with pytest.raises(WorkflowFailureError) as busy:
                await other.result()
            assert busy.value.cause.type == "DatabaseBusy" and handle.id in busy.value.cause.message
            assert primary.is_running()  # nothing changed
            await approve_when_asked(handle, approver="alice", reason="region down")
            result = await handle.result()
    finally:
        stop.set()
        await controller
        down.close()
        backup.close()
    assert result.promoted is None and result.promoted_standby.lost_bytes == 0
    assert not primary.is_running() and (primary.data_dir / "standby.signal").exists()
    with standby.connect() as conn:
        assert not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
    assert record(world)[0]["AliasTarget"]["DNSName"].rstrip(".") == "backup-lb.us-west-2.elb.amazonaws.com"
    assert "starters.db_failback" in result.failback


async def test_failback_rebuilds_from_a_base_backup_when_pg_rewind_cannot_and_keeps_the_old_directory(pair, client):
    """Runs after the region failover above (the standby serves). The old primary's pg_control is
    made unreadable, so pg_rewind fails; the directory is moved aside, not deleted, and rebuilt."""
    primary = pair.postgres()
    control = primary.data_dir / "global" / "pg_control"
    control.rename(control.with_name("pg_control.hidden"))  # pg_rewind refuses a cluster without it
    async with running_worker(client, pair) as queue:
        handle = await start_db_failback(client, DatabaseFailbackInput(incident_id=incident()), queue)
        await approve_when_asked(handle, approver="bob", reason="home")
        result = await handle.result()
    assert result.rejoined_old_primary.method == "pg_basebackup"
    aside = Path(result.rejoined_old_primary.moved_aside)
    assert (aside / "global" / "pg_control.hidden").exists()  # the old directory, intact, kept
    assert result.write_check.served_by_port == primary.port


async def test_a_corruption_recovery_after_failovers_follows_production_timeline_and_keeps_every_commit(pair, client):
    """Runs last: the failovers and failbacks above moved production several timelines past the pair's
    only base backup (timeline 1). The restore must replay along production's own history, through
    every history file and segment those promotions archived, and lose nothing."""
    primary = pair.postgres()
    with primary.connect(DATABASE) as conn:
        timeline = int(conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0][:8], 16)
        acknowledged = [
            conn.execute("INSERT INTO app_write_checks DEFAULT VALUES RETURNING id").fetchone()[0] for _ in range(20)
        ]
    assert timeline >= 3
    corrupt_table(primary, DATABASE, "metrics")
    async with running_worker(client, pair) as queue:
        handle = await start_db_corruption(
            client, DatabaseCorruptionInput(incident_id=incident(), database=DATABASE), queue
        )
        await approve_when_asked(handle, approver="bob", reason="restore after failovers")
        result = await handle.result()
    assert result.outcome == "recovered" and result.followed_timeline == timeline
    assert result.timeline > timeline and result.standby.startswith("streaming from the new primary")
    with primary.connect(DATABASE) as conn:
        present = {r[0] for r in conn.execute("SELECT id FROM app_write_checks WHERE id = ANY(%s)", (acknowledged,))}
    assert present == set(acknowledged)


async def test_after_that_recovery_a_failover_promotes_the_rebuilt_standby_with_no_commit_lost(pair, client):
    """Runs after the recovery above, which rebuilt the standby from the restored primary: the
    standby must be a healthy, synchronous copy of the new timeline that a failover can promote."""
    primary, standby = pair.postgres(), pair.standby()
    writer = AcknowledgedWriter(primary)
    writer.start()
    async with running_worker(client, pair) as queue:
        handle = await start_db_failover(client, DatabaseFailoverInput(incident_id=incident()), queue)
        await approve_when_asked(handle, approver="bob", reason="failover after a restore")
        result = await handle.result()
    writer.join(timeout=60)
    assert not result.before.diverged and result.promoted.lost_bytes == 0
    with standby.connect(DATABASE) as conn:
        assert not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
        present = {r[0] for r in conn.execute("SELECT id FROM app_write_checks")}
    assert writer.acknowledged and set(writer.acknowledged) <= present
