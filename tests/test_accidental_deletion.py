"""AccidentalDeletionRecovery on the real stack: audit log, Redis, point-in-time
recovery of a side instance from S3 (moto) with barman-cloud, re-insert."""

import asyncio
import hashlib
import subprocess
import threading
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest
from temporalio.client import WorkflowFailureError

from models.approval import ApprovalRequest
from models.deletion import AccidentalDeletionInput
from stack.stack import DATABASE
from starters.accidental_deletion import api_key_fingerprint, start_accidental_deletion
from tests.conftest import (
    RUN_WAIT,
    activity_attempts,
    approve_when_asked,
    running_worker,
    wait_for_approval_gate,
)
from tests.test_crash_survival import spawn_worker, wait_for_activity, wait_for_poller

ROLE = "analyst"
LEAKED_KEY = "key-of-the-analyst-script"
APPROVE = ApprovalRequest(approver="bob", reason="rows verified against the CSV evidence")


def incident() -> str:
    return f"DEL-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def analyst(stack):
    """A role that may write the company tables: the one whose script goes wrong."""
    with stack.postgres().connect(DATABASE) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone():
            conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD 'analyst-pw'")
        conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON companies, filings, metrics TO {ROLE}")
    return dict(
        host="127.0.0.1",
        port=stack.config.ports.postgres,
        user=ROLE,
        password="analyst-pw",
        dbname=DATABASE,
        autocommit=True,
    )


def snapshot(stack, table: str, where: str = "true") -> dict[int, dict]:
    with stack.postgres().connect(DATABASE) as conn:
        return {r[0]: r[1] for r in conn.execute(f"SELECT id, to_jsonb(t) FROM {table} t WHERE {where} ORDER BY id")}


def can_delete(stack) -> bool:
    with stack.postgres().connect(DATABASE) as conn:
        return conn.execute("SELECT has_table_privilege(%s, 'public.companies', 'DELETE')", (ROLE,)).fetchone()[0]


def delete_as_analyst(analyst, sector: str, max_id: int) -> datetime:
    """The accident: the analyst's script deletes companies (filings and metrics cascade)."""
    started = datetime.now(UTC)
    with psycopg.connect(**analyst) as conn:
        conn.execute("DELETE FROM companies WHERE sector = %s AND id <= %s", (sector, max_id))
    return started


class Writer(threading.Thread):
    """Production keeps writing to another table while the runbook works."""

    def __init__(self, stack, first_id: int):
        super().__init__(daemon=True)
        self.stack, self.next_id, self.stop, self.written = stack, first_id, threading.Event(), []

    def run(self):
        with self.stack.postgres().connect(DATABASE) as conn:
            while not self.stop.is_set():
                conn.execute(
                    "INSERT INTO metrics (id, company_id, metric, period, value) "
                    "VALUES (%s, 1, 'live', current_date, 1)",
                    (self.next_id,),
                )
                self.written.append(self.next_id)
                self.next_id += 1
                self.stop.wait(0.05)


async def test_deleted_rows_come_back_and_nothing_written_since_is_lost(stack, client, analyst):
    sector, max_id = "Utilities", 120
    doomed = snapshot(stack, "companies", f"sector = '{sector}' AND id <= {max_id}")
    doomed_filings = snapshot(stack, "filings", f"company_id IN ({','.join(map(str, doomed))})")
    doomed_metrics = snapshot(stack, "metrics", f"company_id IN ({','.join(map(str, doomed))})")
    writer = Writer(stack, first_id=10_000_000)
    writer.start()
    window_start = delete_as_analyst(analyst, sector, max_id) - timedelta(seconds=1)
    assert not snapshot(stack, "companies", f"sector = '{sector}' AND id <= {max_id}")
    recreated = min(doomed)  # someone re-creates one deleted company by hand before the runbook runs
    with stack.postgres().connect(DATABASE) as conn:
        conn.execute(
            "INSERT INTO companies (id, name, ticker, sector) VALUES (%s, 'Re-created Co', 'RECR', 'Energy')",
            (recreated,),
        )
        conn.execute("INSERT INTO companies (id, name, ticker, sector) VALUES (90001, 'After Co', 'AFTR', 'Energy')")

    inc = incident()
    try:
        async with running_worker(client, stack) as queue:
            handle = await start_accidental_deletion(
                client,
                AccidentalDeletionInput(
                    incident_id=inc,
                    database=DATABASE,
                    window_start=window_start,
                    role=ROLE,
                    api_key_sha256=api_key_fingerprint(LEAKED_KEY),
                    heartbeat_timeout=timedelta(seconds=10),
                ),
                queue,
            )
            await wait_for_approval_gate(handle, "re-insert")
            # Containment really blocks while the run waits.
            with pytest.raises(psycopg.errors.InsufficientPrivilege), psycopg.connect(**analyst) as conn:
                conn.execute("DELETE FROM companies WHERE id = 2")
            blocked = httpx.get(f"{stack.app_url}/api/v1/companies?limit=1", headers={"X-API-Key": LEAKED_KEY})
            other = httpx.get(f"{stack.app_url}/api/v1/companies?limit=1", headers={"X-API-Key": "another-key"})
            assert blocked.status_code == 403 and other.status_code == 200
            await approve_when_asked(handle, "re-insert", APPROVE.approver, APPROVE.reason)
            await approve_when_asked(handle, "lift containment", APPROVE.approver, APPROVE.reason)
            result = await handle.result()
    finally:
        writer.stop.set()
        writer.join()

    assert result.findings.roles == [ROLE]
    assert result.findings.rows_by_table["public.companies"] == len(doomed)
    assert result.reinserted.conflicts_by_table == {"public.companies": [f"id={recreated}"]}
    assert result.reinserted.inserted_by_table["public.companies"] == len(doomed) - 1
    # Every deleted row is back exactly as it was, except the one re-created since, which is kept.
    now_companies = snapshot(stack, "companies", f"id IN ({','.join(map(str, doomed))})")
    assert {i: r for i, r in now_companies.items() if i != recreated} == {
        i: r for i, r in doomed.items() if i != recreated
    }
    assert now_companies[recreated]["name"] == "Re-created Co"
    assert snapshot(stack, "filings", f"company_id IN ({','.join(map(str, doomed))})") == doomed_filings
    assert snapshot(stack, "metrics", f"company_id IN ({','.join(map(str, doomed))})") == doomed_metrics
    # Writes made after the deletion are all still there.
    assert snapshot(stack, "companies", "id = 90001")
    live = snapshot(stack, "metrics", "metric = 'live'")
    assert set(writer.written) <= set(live)
    # Evidence, containment lifted, no side instance left.
    assert result.extracted.evidence_uri.startswith("s3://drp-backups/evidence/")
    assert result.containment_lifted and can_delete(stack)
    assert httpx.get(f"{stack.app_url}/api/v1/companies?limit=1", headers={"X-API-Key": LEAKED_KEY}).status_code == 200
    assert not [p for p in stack.pg_dir.iterdir() if ".side-" in p.name]
    assert result.rpo_actual == timedelta(0) and result.rto_actual < result.rto_target


async def test_run_survives_a_worker_killed_during_the_side_replay(stack, client, analyst, tmp_path):
    doomed = snapshot(stack, "companies", "sector = 'Healthcare' AND id <= 60")
    window_start = delete_as_analyst(analyst, "Healthcare", 60) - timedelta(seconds=1)
    inc, queue = incident(), f"crash-{uuid.uuid4().hex[:8]}"
    first = spawn_worker(stack, queue, tmp_path / "w1.log")
    second = None
    try:
        await wait_for_poller(client, queue, first)
        handle = await start_accidental_deletion(
            client,
            AccidentalDeletionInput(
                incident_id=inc,
                database=DATABASE,
                window_start=window_start,
                table="companies",
                heartbeat_timeout=timedelta(seconds=10),
            ),
            queue,
        )
        await wait_for_activity(handle, "replay_wal")
        first.kill()
        first.wait()
        second = spawn_worker(stack, queue, tmp_path / "w2.log")
        await approve_when_asked(handle, "re-insert", APPROVE.approver, APPROVE.reason)
        result = await asyncio.wait_for(handle.result(), timeout=RUN_WAIT)
    finally:
        for proc in (first, second):
            if proc and proc.poll() is None:
                proc.terminate()
                proc.wait()
    assert snapshot(stack, "companies", f"id IN ({','.join(map(str, doomed))})") == doomed
    assert result.reinserted.inserted_by_table["public.companies"] == len(doomed)
    assert not [p for p in stack.pg_dir.iterdir() if ".side-" in p.name]
    # the killed attempt timed out; the new worker watched the same replay to its end
    assert await activity_attempts(handle, "replay_wal") == [2]


async def test_cancelled_run_leaves_no_side_instance_and_no_files(stack, client, analyst):
    window_start = delete_as_analyst(analyst, "Financials", 40) - timedelta(seconds=1)
    async with running_worker(client, stack) as queue:
        handle = await start_accidental_deletion(
            client,
            AccidentalDeletionInput(
                incident_id=incident(), database=DATABASE, window_start=window_start, table="companies"
            ),
            queue,
        )
        await wait_for_approval_gate(handle, "re-insert")
        assert [p for p in stack.pg_dir.iterdir() if ".side-" in p.name]  # the side instance is up now
        await handle.cancel()
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    assert not [p for p in stack.pg_dir.iterdir() if ".side-" in p.name]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert ".side-" not in ps


@pytest.mark.parametrize(
    "change, kind",
    [
        ({"table": "no_such_table"}, "UnknownTable"),
        (
            {"window_start": datetime(2020, 1, 1, tzinfo=UTC), "window_end": datetime(2020, 1, 2, tzinfo=UTC)},
            "NoDeletionsFound",
        ),
        ({"role": "no_such_role"}, "UnknownRole"),
    ],
)
async def test_wrong_input_is_a_clear_error_and_contains_nothing(stack, client, analyst, change, kind):
    fingerprint = api_key_fingerprint("never-blocked")
    args = {
        "incident_id": incident(),
        "database": DATABASE,
        "role": ROLE,
        "api_key_sha256": fingerprint,
        "window_start": datetime.now(UTC) - timedelta(minutes=5),
        **change,
    }
    async with running_worker(client, stack) as queue:
        handle = await start_accidental_deletion(client, AccidentalDeletionInput(**args), queue)
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    assert failed.value.cause.cause.type == kind
    assert can_delete(stack)  # nothing was revoked
    assert (
        httpx.get(f"{stack.app_url}/api/v1/companies?limit=1", headers={"X-API-Key": "never-blocked"}).status_code
        == 200
    )


async def test_a_deletion_older_than_every_backup_is_refused(stack, client, analyst):
    """A backup set whose only backup was taken after the deletion cannot reach back to it."""
    window_start = delete_as_analyst(analyst, "Industrials", 30) - timedelta(seconds=1)
    late = {"destination": "s3://drp-backups/late-only"}
    barman = stack.barman()
    pg = stack.postgres()
    proc = subprocess.run(
        barman.backup_argv(pg.host, pg.port, pg.superuser)[:-2] + [late["destination"], "primary"],
        env={**barman.env(), "PGPASSWORD": stack.config.pg_password},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    async with running_worker(client, stack, backup=late) as queue:
        handle = await start_accidental_deletion(
            client,
            AccidentalDeletionInput(incident_id=incident(), database=DATABASE, window_start=window_start, role=ROLE),
            queue,
        )
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    assert failed.value.cause.cause.type == "NoBackupBeforeTarget"
    assert can_delete(stack)


def test_api_keys_are_only_ever_sent_as_fingerprints():
    assert api_key_fingerprint(LEAKED_KEY) == hashlib.sha256(LEAKED_KEY.encode()).hexdigest()
    with pytest.raises(ValueError):
        AccidentalDeletionInput(
            incident_id="X", database=DATABASE, window_start=datetime.now(UTC), api_key_sha256=LEAKED_KEY
        )


async def test_a_deletion_recovery_holds_the_database_lock_until_its_side_instance_is_gone(stack, client, analyst):
    """While a deletion recovery contains, restores its side instance and re-inserts, a corruption recovery
    or a second deletion recovery of the same database is refused (DatabaseBusy, naming the run, nothing
    changed). The lock is given back before the lift-containment approval, which may wait for days: a
    corruption recovery started then runs. All started and approved through `drp`."""
    from tests.test_archive_gaps import drp_approve, drp_start

    window_start = delete_as_analyst(analyst, "Industrials", 150) - timedelta(seconds=1)
    inc, other, second = incident(), incident(), incident()
    async with running_worker(client, stack) as queue:
        holder = await drp_start(
            client, stack, queue, "deletion", inc, "--window-start", window_start.isoformat(), "--role", ROLE
        )
        await wait_for_approval_gate(holder, "re-insert")
        pids = stack.postgres().postmaster_pid(), stack.processes.pid("app")
        for refused in (
            await drp_start(client, stack, queue, "db-corruption", other),
            await drp_start(
                client, stack, queue, "deletion", second, "--window-start", window_start.isoformat(), "--role", ROLE
            ),
        ):
            with pytest.raises(WorkflowFailureError) as busy:
                await refused.result()
            assert busy.value.cause.type == "DatabaseBusy"
            assert f"accidental-deletion-{inc}" in busy.value.cause.message
        assert (stack.postgres().postmaster_pid(), stack.processes.pid("app")) == pids  # nothing changed
        assert not can_delete(stack)  # the holder's containment is untouched

        await drp_approve(stack, queue, inc)  # re-insert
        await wait_for_approval_gate(holder, "lift containment")
        # Released before the lift gate: a corruption recovery of the same database may run now.
        after = await drp_start(client, stack, queue, "db-corruption", incident())
        assert (await after.result()).outcome == "no_corruption_found"
        await drp_approve(stack, queue, inc)  # lift containment (alice: incident commander)
        result = await holder.result()
    assert result.containment_lifted and result.reinserted.missing_after_insert == 0
    assert can_delete(stack)
