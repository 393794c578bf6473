"""DatabaseCorruptionRecovery end to end on the real stack: corruption on disk,
real pg_amcheck, barman-cloud restore from S3 (moto), WAL replay, the demo app."""

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from psycopg import sql
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.testing import ActivityEnvironment

from activities.postgres import PostgresActivities
from models.approval import ApprovalRequest
from models.db_corruption import DatabaseCorruptionInput
from models.postgres import AssessRequest
from stack.corrupt import corrupt_table
from stack.stack import DATABASE
from starters.db_corruption import start_db_corruption
from tests.conftest import row_counts, running_worker, wait_for_approval_gate
from tests.test_stack import drp
from workflows.db_corruption import DatabaseCorruptionRecovery
from workflows.search_attributes import INCIDENT_ID, PROCEDURE, SEVERITY

APPROVE = ApprovalRequest(approver="alice", reason="restore drill in the test suite")


def incident() -> str:
    return f"T-{uuid.uuid4().hex[:8]}"


def write_after_backup(stack, n: int = 25) -> None:
    """Commit rows the base backup does not hold: only WAL replay can bring them back."""
    with stack.postgres().connect(DATABASE) as conn:
        base = conn.execute("SELECT coalesce(max(id), 0) FROM companies").fetchone()[0]
        for i in range(base + 1, base + n + 1):
            conn.execute(
                "INSERT INTO companies (id, name, ticker, sector) VALUES (%s, %s, %s, 'Energy')",
                (i, f"Late Co {i}", f"L{i}"),
            )
            conn.execute(
                "INSERT INTO filings (id, company_id, form_type, filed_on, body) "
                "SELECT coalesce(max(id), 0) + 1, %s, '8-K', current_date, 'late' FROM filings",
                (i,),
            )


def processes(stack) -> tuple[int | None, int | None]:
    return stack.postgres().postmaster_pid(), stack.processes.pid("app")


async def test_corruption_on_disk_is_recovered_with_every_committed_row(stack, client):
    write_after_backup(stack)
    before = row_counts(stack)
    corrupt_table(stack.postgres(), DATABASE, "companies")
    inc = incident()
    async with running_worker(client, stack) as queue:
        handle = await start_db_corruption(
            client,
            DatabaseCorruptionInput(
                incident_id=inc,
                database=DATABASE,
                severity="P1",
                expected_row_counts={"companies": before["public.companies"]},
            ),
            queue,
        )
        await wait_for_approval_gate(handle)
        metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
        assert "approve" in metadata.current_details and "companies" in metadata.current_details
        record = await handle.execute_update(DatabaseCorruptionRecovery.approve, APPROVE)
        assert record.approver == "alice"
        result = await handle.result()

    assert result.outcome == "recovered"
    assert result.corrupted_tables == ["public.companies"]
    assert {t: result.recovered_row_counts[t] for t in before} == before
    assert row_counts(stack) == before  # production now serves the recovered data
    assert Path(result.damaged_data_dir).is_dir()  # evidence kept, not deleted
    assert [s.name for s in result.steps][:3] == ["assess", "approve", "stop application"]
    assert result.rto_actual is not None and timedelta(0) < result.rto_actual < result.rto_target
    assert result.rpo_actual == timedelta(0)  # sealed: every archived commit was replayed
    resp = httpx.get(f"{stack.app_url}/api/v1/companies?limit=1000", timeout=5)
    assert resp.status_code == 200 and len(resp.json()) == before["public.companies"]
    desc = await handle.describe()
    assert desc.typed_search_attributes[INCIDENT_ID] == inc
    assert desc.typed_search_attributes[PROCEDURE] == "db-corruption"
    assert desc.typed_search_attributes[SEVERITY] == "P1"
    assert "database corruption recovery" in (await desc.static_summary())


async def test_healthy_database_ends_the_run_without_touching_anything(stack, client):
    pids = processes(stack)
    async with running_worker(client, stack) as queue:
        handle = await start_db_corruption(
            client, DatabaseCorruptionInput(incident_id=incident(), database=DATABASE), queue
        )
        result = await handle.result()
    assert result.outcome == "no_corruption_found"
    assert [s.name for s in result.steps] == ["assess"]
    assert processes(stack) == pids  # neither the database nor the app was restarted

    # A decision for the finished run: one line saying nothing waits for it (was a bare RPCError, exit 1).
    late = await asyncio.to_thread(
        drp,
        "--state-dir",
        str(stack.state_dir),
        "approve",
        handle.id.removeprefix("db-corruption-"),
        "--by",
        "alice",
        "--reason",
        "too late",
    )
    assert late.returncode == 2, late.stderr
    assert late.stderr.strip().splitlines() == [
        f"drp: approval refused by {handle.id}: workflow execution already completed; nothing is waiting for a decision"
    ]


async def test_approval_validation_and_timeout_leave_everything_as_it_was(stack, client):
    corrupt_table(stack.postgres(), DATABASE, "metrics")
    pids, data_dir = processes(stack), stack.postgres().data_dir
    siblings = sorted(p.name for p in data_dir.parent.iterdir())
    inc = incident()
    async with running_worker(client, stack) as queue:
        inp = DatabaseCorruptionInput(incident_id=inc, database=DATABASE, approval_timeout=timedelta(seconds=3))
        handle = await start_db_corruption(client, inp, queue)
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
        assert failed.value.cause.type == "ApprovalTimeout"
        assert "nothing was changed" in failed.value.cause.message
        assert processes(stack) == pids
        assert sorted(p.name for p in data_dir.parent.iterdir()) == siblings

        # The same incident may be run again after a failed run, and this time it is approved. Its
        # approval timeout is long: the refusals below must reach a run that is still waiting.
        handle = await start_db_corruption(
            client, inp.model_copy(update={"approval_timeout": timedelta(hours=1)}), queue
        )
        await wait_for_approval_gate(handle)
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update("approve", {"approver": "alice", "reason": "   "})
        assert "reason must not be empty" in str(refused.value.cause)
        with pytest.raises(WorkflowUpdateFailedError) as outsider:  # carol is on call: not on the P0 roster
            await handle.execute_update("approve", {"approver": "carol", "reason": "I am on call"})
        assert "not on the roster" in str(outsider.value.cause) and "alice, bob, frank" in str(outsider.value.cause)
        await handle.execute_update(DatabaseCorruptionRecovery.approve, APPROVE)
        with pytest.raises(WorkflowUpdateFailedError) as twice:
            await handle.execute_update(DatabaseCorruptionRecovery.approve, APPROVE)
        assert "already approved" in str(twice.value.cause)
        result = await handle.result()
    assert result.outcome == "recovered" and result.corrupted_tables == ["public.metrics"]


async def test_unknown_database_is_a_clear_error_and_changes_nothing(stack, client):
    pids = processes(stack)
    async with running_worker(client, stack) as queue:
        handle = await start_db_corruption(
            client, DatabaseCorruptionInput(incident_id=incident(), database="no_such_db"), queue
        )
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    assert failed.value.cause.cause.type == "UnknownDatabase"
    assert "no_such_db" in failed.value.cause.cause.message
    assert processes(stack) == pids


@pytest.mark.parametrize(
    "payload, complaint",
    [
        ({"incident_id": "INC 1", "database": DATABASE}, "incident_id"),
        ({"incident_id": "INC-1"}, "database"),
        ({"incident_id": "INC-1", "database": DATABASE, "approval_timeout": "soon"}, "approval_timeout"),
        (["INC-1", DATABASE], "DatabaseCorruptionInput"),
    ],
)
async def test_malformed_input_from_the_web_ui_fails_the_run_with_the_reason(stack, client, payload, complaint):
    """The Web UI sends whatever JSON the operator typed, by workflow type name."""
    async with running_worker(client, stack) as queue:
        handle = await client.start_workflow(
            "DatabaseCorruptionRecovery", payload, id=f"ui-{incident()}", task_queue=queue
        )
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    assert failed.value.cause.type == "ValidationError"
    assert complaint in failed.value.cause.message


def test_assessment_names_a_damaged_table_whose_names_need_quoting(stack):
    """pg_amcheck's -d is a pattern and its reports name relations unquoted: a database, schema and table
    with capitals, a space, a hyphen, a quote and non-ASCII must still be checked, and the damaged table
    named as PostgreSQL quotes it, not skipped."""
    server = stack.postgres()
    database, schema, table = "Corp Intel-DB", 'Sales "Q1"', "Orders é.v2"
    with server.connect("postgres") as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(database)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    try:
        with server.connect(database) as conn:
            conn.execute("CREATE EXTENSION amcheck")
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            conn.execute(
                sql.SQL("CREATE TABLE {}.{} (id int PRIMARY KEY, body text)").format(
                    sql.Identifier(schema), sql.Identifier(table)
                )
            )
            conn.execute(
                sql.SQL("INSERT INTO {}.{} SELECT g, repeat('x', 200) FROM generate_series(1, 500) g").format(
                    sql.Identifier(schema), sql.Identifier(table)
                )
            )
            conn.execute("CREATE TABLE healthy (id int)")
            quoted = conn.execute("SELECT format('%%I.%%I', %s::text, %s::text)", (schema, table)).fetchone()[0]
        corrupt_table(server, database, quoted)

        found = ActivityEnvironment().run(PostgresActivities(server).assess_database, AssessRequest(database=database))

        assert found.server_reachable and found.amcheck_available
        assert found.corrupted_tables == [quoted]  # e.g. "Sales ""Q1"""."Orders é.v2"
        assert any(f'"{database}.{schema}.{table}"' in f for f in found.findings), found.findings
    finally:
        with server.connect("postgres") as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
