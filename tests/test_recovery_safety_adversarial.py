"""Adversarial tests for "recovery that never loses a commit on a real archive" (issue 10).

Each test reproduces one way an earlier version of the recovery left production
in a state nobody was told about, or destroyed what an operator needs to put it
back; each docstring says what used to happen. They run after
test_recovery_safety.py, on the same session stack.
"""

import asyncio
import threading
import time
import uuid
from datetime import timedelta

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities.postgres import PostgresActivities
from adapters.sealing import read_seal, unseal
from models.db_corruption import DatabaseCorruptionInput
from models.postgres import SealRequest
from stack.corrupt import corrupt_table
from stack.stack import DATABASE
from starters.db_corruption import start_db_corruption
from tests.conftest import (
    approve_when_asked,
    own_stack,
    rebuild_standby,
    running_worker,
)
from workers.settings import Settings
from workflows._runbook import Runbook


def incident() -> str:
    return f"BR-{uuid.uuid4().hex[:8]}"


def datallowconn(server, database: str) -> bool:
    with server.connect("template1") as conn:
        return conn.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (database,)).fetchone()[0]


def test_a_seal_retried_after_the_primary_went_down_keeps_the_list_of_databases_it_fenced(stack):
    """seal_primary writes the marker with `fenced_databases`, then closes them (ALTER DATABASE ...
    ALLOW_CONNECTIONS false, committed on production). If that attempt fails (here ArchiveLagging) and the
    damaged primary goes down before the retry (a crash, an OOM kill, an operator's pg_ctl stop), the retry
    takes the `not self.server.is_running()` branch and OVERWRITES the marker with `fenced_databases: []`
    (activities/postgres.py, "found stopped"). `drp unseal` then reopens "no databases": production comes
    back with every database still closed to every client, and nothing says so."""
    pg = stack.postgres()
    acts = PostgresActivities(pg, archive_wait_seconds=1)
    inc = incident()
    with pg.connect() as conn:
        conn.execute("ALTER SYSTEM SET archive_command = 'false'")  # the archive is failing during the seal
        conn.execute("SELECT pg_reload_conf()")
    try:
        with pg.connect(DATABASE) as conn:
            conn.execute("INSERT INTO app_write_checks DEFAULT VALUES")
        with pytest.raises(ApplicationError) as lagging:
            acts.seal_primary(SealRequest(incident_id=inc, database=DATABASE))
        assert lagging.value.type == "ArchiveLagging"
        fenced = read_seal(pg.data_dir)["fenced_databases"]
        assert DATABASE in fenced and not datallowconn(pg, DATABASE)

        pg.stop(mode="immediate")  # the damaged primary dies before the activity's retry
        acts.seal_primary(SealRequest(incident_id=inc, database=DATABASE))  # the retry

        marker = read_seal(pg.data_dir)
        print("marker after the retry:", marker)
        done = unseal(pg)
        print("unseal said:", done)
        assert datallowconn(pg, DATABASE), f"after `drp unseal` ({done!r}) {DATABASE} still refuses connections"
        assert marker["fenced_databases"] == fenced, "the retry forgot which databases the seal closed"
    finally:
        if not pg.is_running():
            pg.start()
            pg.wait_ready(dbname="template1")
        with pg.connect("template1") as conn:
            conn.execute("ALTER SYSTEM RESET archive_command")
            conn.execute("SELECT pg_reload_conf()")
            for (name,) in conn.execute("SELECT datname FROM pg_database WHERE NOT datistemplate").fetchall():
                conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        from adapters.sealing import marker_path

        marker_path(pg.data_dir).unlink(missing_ok=True)


async def test_a_failure_after_the_swap_does_not_report_nothing_was_changed(stack, client):
    """_report_failure (workflows/db_corruption.py) only writes notes for failures BEFORE the swap, and
    for "swapped but the application not started". A failure after `start application` (here the
    application never answers its critical endpoint within app_ready_timeout) produces no note at all,
    so the run says "State left: nothing was changed" although production was replaced by the restore,
    the damaged directory moved aside, the application started on it, and the standby (never rebuilt:
    that step comes later) is left diverged."""
    corrupt_table(stack.postgres(), DATABASE, "metrics")
    raw = stack.worker_settings()
    inc = incident()

    def settings(queue):  # the application comes back unhealthy: its critical endpoint fails
        return Settings(
            **{
                **raw,
                "task_queue": queue,
                "app": {
                    **raw["app"],
                    "critical_url": raw["app"]["health_url"].replace("/health", "/api/v1/does-not-exist"),
                },
            }
        )

    async with running_worker(client, stack, settings=settings) as queue:
        handle = await start_db_corruption(
            client,
            DatabaseCorruptionInput(incident_id=inc, database=DATABASE, app_ready_timeout=timedelta(seconds=10)),
            queue,
        )
        await approve_when_asked(handle)
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    message = failed.value.cause.message
    print("failure message:", message)
    data_dir = stack.postgres().data_dir
    damaged = data_dir.with_name(f"{data_dir.name}.damaged-{inc}")
    assert damaged.exists() and stack.postgres().is_running()  # what really happened: swapped in
    assert "nothing was changed" not in message, f"the run swapped production but reports: {message}"
    assert str(damaged) in message or "swapped" in message or "restored data" in message


@pytest.fixture(scope="module")
def sync_pair():
    with own_stack("drp-test-break-sync-", companies=50, synchronous_standby=True) as s:
        yield s


async def test_a_synchronous_standby_is_still_synchronous_after_a_recovery(sync_pair, client):
    """With a synchronous standby (synchronous_standby_names = 'drp_standby', in the base backup), the
    "rebuild standby" step (rejoin_as_standby: pg_rewind --write-recovery-conf with a conninfo that has
    no application_name) brings the standby back as 'walreceiver', which synchronous_standby_names does
    not name. The run reports "recovered" and "streaming from the new primary (pg_rewind)", yet every
    commit on the recovered production waits for a synchronous standby that will never confirm: the
    application hangs on its first write (observed: a single INSERT waited until cancelled). Had the
    backup predated the setting, production would instead silently run without synchronous replication."""
    primary = sync_pair.postgres()
    with primary.connect() as conn:
        before = conn.execute("SELECT sync_state FROM pg_stat_replication").fetchall()
    assert before == [("sync",)]
    sync_pair.base_backup()  # the nightly backup, taken with synchronous replication configured
    corrupt_table(primary, DATABASE, "metrics")
    async with running_worker(client, sync_pair) as queue:
        handle = await start_db_corruption(
            client, DatabaseCorruptionInput(incident_id=incident(), database=DATABASE), queue
        )
        await approve_when_asked(handle)
        async with asyncio.timeout(480):
            result = await handle.result()
    assert result.outcome == "recovered"
    print("standby:", result.standby)
    with primary.connect() as conn:
        names = conn.execute("SHOW synchronous_standby_names").fetchone()[0]
        after = conn.execute("SELECT application_name, sync_state FROM pg_stat_replication").fetchall()
    print("synchronous_standby_names:", repr(names), "replication:", after)
    notices = []
    with primary.connect(DATABASE) as conn:  # one commit on the "recovered" production
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))

        def cancel(pid=conn.info.backend_pid):  # statement_timeout does not end a synchronous-commit wait
            with primary.connect("template1") as other:
                other.execute("SELECT pg_cancel_backend(%s)", (pid,))

        timer = threading.Timer(10, cancel)
        timer.start()
        started = time.monotonic()
        conn.execute("INSERT INTO app_write_checks DEFAULT VALUES")
        took = time.monotonic() - started
        timer.cancel()
    print(f"one commit took {took:.1f}s; notices: {notices}")
    assert took < 5, f"a commit on the recovered production waits for a standby that never confirms: {notices}"
    assert [s for _, s in after] == ["sync"], (
        f"production lost its synchronous standby: synchronous_standby_names={names!r}, replication={after}"
    )


async def test_an_unlogged_partition_of_a_logged_table_does_not_fail_the_verification(stack, client):
    """USER_TABLES (activities/postgres.py) counts partitioned parents (relkind 'p') as WAL-logged
    tables: relpersistence is a property of each partition, and a logged parent may have UNLOGGED
    partitions. The seal counts the parent with the unlogged partition's rows; the restore has that
    partition empty (by PostgreSQL's design), so verification fails "N rows restored, M expected" and
    production is left stopped and sealed: issue 10's case 8 again, one level down."""
    with stack.postgres().connect(DATABASE) as conn:
        conn.execute("CREATE TABLE events (id int NOT NULL) PARTITION BY RANGE (id)")
        conn.execute("CREATE TABLE events_kept PARTITION OF events FOR VALUES FROM (0) TO (1000)")
        conn.execute("CREATE UNLOGGED TABLE events_cache PARTITION OF events FOR VALUES FROM (1000) TO (2000)")
        conn.execute("INSERT INTO events SELECT g FROM generate_series(1, 1500) g")
    corrupt_table(stack.postgres(), DATABASE, "metrics")
    async with running_worker(client, stack) as queue:
        handle = await start_db_corruption(
            client, DatabaseCorruptionInput(incident_id=incident(), database=DATABASE), queue
        )
        await approve_when_asked(handle)
        try:
            result = await handle.result()
        except WorkflowFailureError as err:
            print("failed:", err.cause.message)
            print(
                "production running:",
                stack.postgres().is_running(),
                "sealed:",
                read_seal(stack.postgres().data_dir) is not None,
            )
            raise
    assert result.outcome == "recovered"
    assert "public.events_cache" in result.unlogged_tables
    with stack.postgres().connect(DATABASE) as conn:
        assert conn.execute("SELECT count(*) FROM events_kept").fetchone()[0] == 999


async def test_the_standby_rebuild_never_rewinds_a_standby_that_took_writes(stack, client):
    """rejoin_as_standby (activities/replication.py), the "rebuild standby" step, stops the standby and
    runs pg_rewind on it without looking at what it is. During a long recovery, with production sealed
    and down, the standby is exactly what a person (or RegionFailover, which takes no database lock)
    promotes to serve again. The step then rewinds that promoted server onto the restore: every commit
    it acknowledged is destroyed, no copy is kept (only a failed pg_rewind moves the directory aside),
    and the result says "streaming from the new primary (pg_rewind)"."""
    rebuild_standby(stack)  # a streaming standby to promote, whatever the tests before left
    corrupt_table(stack.postgres(), DATABASE, "metrics")
    standby = stack.standby()
    async with running_worker(client, stack) as queue:
        handle = await start_db_corruption(
            client, DatabaseCorruptionInput(incident_id=incident(), database=DATABASE), queue
        )
        await approve_when_asked(handle)
        async with asyncio.timeout(300):
            while (await handle.query(Runbook.progress)).current_step not in (
                "restore base backup",
                "replay WAL",
                "verify restore",
            ):
                await asyncio.sleep(0.1)
        with standby.connect("template1") as conn:  # production is down: someone promotes the standby
            conn.execute("SELECT pg_promote(wait => true)")
            conn.execute(f'ALTER DATABASE "{DATABASE}" WITH ALLOW_CONNECTIONS true')
        with standby.connect(DATABASE) as conn:
            acknowledged = [
                conn.execute("INSERT INTO app_write_checks DEFAULT VALUES RETURNING id").fetchone()[0]
                for _ in range(10)
            ]
        result = await handle.result()
    print("outcome:", result.outcome, "standby:", result.standby)
    assert result.standby.startswith("promoted by someone during the recovery, not touched")
    kept = list(standby.data_dir.parent.glob(f"{standby.data_dir.name}.before-rejoin-*"))
    with standby.connect("template1") as conn:
        in_recovery = conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
    if in_recovery:  # rewound: are the promoted server's commits anywhere?
        with stack.postgres().connect(DATABASE) as conn:
            there = {r[0] for r in conn.execute("SELECT id FROM app_write_checks WHERE id = ANY(%s)", (acknowledged,))}
        assert there == set(acknowledged) or kept, (
            f"the promoted standby was rewound ({result.standby}); {len(acknowledged)} commits it acknowledged "
            "exist nowhere, and no copy of its directory was kept"
        )
    with standby.connect(DATABASE) as conn:  # the promoted server's commits are where they were
        assert len(conn.execute("SELECT id FROM app_write_checks WHERE id = ANY(%s)", (acknowledged,)).fetchall()) == 10
    rebuild_standby(stack)  # a person decided: this copy goes (kept aside), the standby comes from production


async def test_corruption_already_in_the_newest_backup_leaves_a_way_to_recover_from_an_older_one(stack, client):
    """Corruption is often found days after it happened, so the newest base backup holds the damaged page
    too (barman-cloud-backup copies it as is). restore_base_backup always takes the newest backup on the
    timeline; the restore fails verification and production stays sealed. The activity supports
    `backup_id`, and NoBackupOnTimeline even says "name one with backup_id", but DatabaseCorruptionInput
    has no such field (extra="forbid"): no run of this runbook can ever recover this database."""
    corrupt_table(stack.postgres(), DATABASE, "metrics")
    stack.base_backup()  # the nightly backup ran after the damage, before anyone noticed
    older = stack.barman().list_backups()[0]["backup_id"]
    async with running_worker(client, stack) as queue:
        handle = await start_db_corruption(
            client, DatabaseCorruptionInput(incident_id=incident(), database=DATABASE), queue
        )
        await approve_when_asked(handle)
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    print("failed:", failed.value.cause.type, failed.value.cause.message[:600])
    assert failed.value.cause.type == "VerificationFailed"
    # The way out: a new run (it reuses the seal) restoring an older backup on production's history.
    async with running_worker(client, stack) as queue:
        handle = await start_db_corruption(
            client, DatabaseCorruptionInput(incident_id=incident(), database=DATABASE, backup_id=older), queue
        )
        await approve_when_asked(handle)
        result = await handle.result()
    assert result.outcome == "recovered" and result.backup_id == older


async def test_drp_unseal_is_refused_while_a_recovery_holds_the_database(stack, client):
    """`drp unseal` used to check only the marker: a person could start the damaged primary again beside
    the restore being replayed, and the run's last word then contradicted itself. It now asks Temporal
    whether the database lock is held and refuses, naming the run, changing nothing."""
    from tests.test_recovery_safety import drp

    corrupt_table(stack.postgres(), DATABASE, "metrics")
    inc = incident()
    async with running_worker(client, stack) as queue:
        handle = await start_db_corruption(client, DatabaseCorruptionInput(incident_id=inc, database=DATABASE), queue)
        await approve_when_asked(handle)
        async with asyncio.timeout(300):
            while (await handle.query(Runbook.progress)).current_step not in (
                "restore base backup",
                "replay WAL",
                "verify restore",
            ):
                await asyncio.sleep(0.1)
        refused = drp(stack, "unseal")
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert f"db-corruption-{inc}" in refused.stderr and "nothing was changed" in refused.stderr
        assert read_seal(stack.postgres().data_dir) is not None  # still sealed: the run goes on
        assert (await handle.result()).outcome == "recovered"
