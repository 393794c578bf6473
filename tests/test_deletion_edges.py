"""AccidentalDeletionRecovery at the edges, through the doors operators use (`drp` CLI): names PostgreSQL
allows (mixed case, spaces, quotes, non-ASCII), a deletion inside a long transaction, generated and identity
columns, multi-megabyte values, partitioned tables, and tables the audit log names that are gone."""

import asyncio
import os
import subprocess
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError

from models.approval import ApprovalRequest
from models.deletion import DeletionRecoveryResult
from stack.stack import DATABASE
from tests.conftest import RUN_WAIT, running_worker, wait_for_approval_gate
from tests.test_accidental_deletion import ROLE, analyst, can_delete  # noqa: F401 (fixture)
from tests.test_input_edges import TEMPORAL
from tests.test_stack import drp
from workflows._runbook import Runbook

SCHEMA, TABLE = 'Sales "EU" Ü', "Orders Ü"
PRINTED = '"Sales ""EU"" Ü"."Orders Ü"'  # as PostgreSQL prints it (format('%I.%I'))
BIG = 3 << 20  # bytes of an incompressible TOASTed value: a few of them exceed Temporal's payload limit


def incident() -> str:
    return f"EDGE-{uuid.uuid4().hex[:8]}"


def pg(stack, autocommit: bool = True) -> psycopg.Connection:
    return stack.postgres().connect(DATABASE, autocommit=autocommit)


def cli(stack, queue: str, *args: str):
    return drp("--state-dir", str(stack.state_dir), *args, env={**os.environ, "DRP_TASK_QUEUE": queue})


async def run_to_the_end(client, stack, queue: str, inc: str, *start_args: str, refuse_first: bool = False):
    """`drp start deletion`, then `drp approve` at the re-insert gate; returns the run's handle and result."""
    started = await asyncio.to_thread(
        cli, stack, queue, "start", "deletion", "--incident", inc, "--database", DATABASE, *start_args
    )
    assert started.returncode == 0, started.stderr
    handle = client.get_workflow_handle(f"accidental-deletion-{inc}", result_type=DeletionRecoveryResult)
    await wait_for_approval_gate(handle, "re-insert", timeout=RUN_WAIT)
    if refuse_first:  # someone off the roster, from the Temporal CLI (as the Web UI sends it): refused for good
        refused = await asyncio.to_thread(
            subprocess.run,
            [
                str(TEMPORAL),
                "workflow",
                "update",
                "execute",
                "--address",
                stack.temporal_address,
                "--workflow-id",
                handle.id,
                "--name",
                "approve",
                "--input",
                '{"approver": "mallory", "reason": "x"}',
                "-o",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode != 0 and "not on the roster" in refused.stdout + refused.stderr
        with pytest.raises(WorkflowUpdateFailedError) as failed:
            await handle.execute_update(Runbook.approve, ApprovalRequest(approver="mallory", reason="x"))
        assert failed.value.cause.type == "NotOnRoster" and failed.value.cause.non_retryable
        assert (await handle.query(Runbook.progress)).awaiting_approval == "re-insert"
    approved = await asyncio.to_thread(cli, stack, queue, "approve", inc, "--by", "bob", "--reason", "checked")
    assert approved.returncode == 0, approved.stderr
    return handle, await asyncio.wait_for(handle.result(), timeout=RUN_WAIT)


async def largest_payload(handle) -> int:
    sizes = [0]
    async for e in handle.fetch_history_events():
        for field in ("activity_task_completed_event_attributes", "activity_task_scheduled_event_attributes"):
            if e.HasField(field):
                attrs = getattr(e, field)
                payloads = attrs.result if field.startswith("activity_task_completed") else attrs.input
                sizes += [p.ByteSize() for p in payloads.payloads]
    return max(sizes)


@pytest.fixture(scope="module")
def weird_table(stack):
    """A table whose schema and name need quoting, with an identity key, a generated column and TOAST values;
    its audit trigger installed with `drp --state-dir ... audit install`, the name given as PostgreSQL prints it."""
    with pg(stack) as conn:
        conn.execute('CREATE SCHEMA IF NOT EXISTS "Sales ""EU"" Ü"')
        conn.execute(
            'CREATE TABLE IF NOT EXISTS "Sales ""EU"" Ü"."Orders Ü" ('
            " id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, customer text NOT NULL,"
            " qty int NOT NULL, price numeric(12, 2) NOT NULL,"
            " total numeric GENERATED ALWAYS AS (qty * price) STORED, attachment text)"
        )
    done = drp("--state-dir", str(stack.state_dir), "audit", "install", "--database", DATABASE, "--tables", PRINTED)
    assert done.returncode == 0, done.stderr
    return f"{SCHEMA}.{TABLE}"


def weird_rows(stack) -> dict[int, tuple]:
    with pg(stack) as conn:
        return {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT id, customer, qty, price, total, md5(attachment), length(attachment) "
                'FROM "Sales ""EU"" Ü"."Orders Ü" ORDER BY id'
            )
        }


async def test_deletion_in_a_long_transaction_of_a_table_with_quoted_names_comes_back_whole(stack, client, weird_table):
    inc = incident()
    with pg(stack) as conn:
        ids = [
            r[0]
            for r in conn.execute(
                'INSERT INTO "Sales ""EU"" Ü"."Orders Ü" (customer, qty, price, attachment) '
                "SELECT 'customer ' || g, g, 9.99, CASE WHEN g <= 2 THEN "
                "(SELECT string_agg(md5(random()::text || s), '') FROM generate_series(1, %s) s) ELSE 'small' END "
                "FROM generate_series(1, 6) g RETURNING id",
                (BIG // 32,),
            )
        ]
    before = weird_rows(stack)
    doomed = {i: before[i] for i in ids[:4]}  # the two multi-megabyte rows among them

    # The accident, inside a long transaction: BEGIN; DELETE; (the window starts here); COMMIT.
    with pg(stack, autocommit=False) as long_tx, pg(stack) as other:
        long_tx.execute('DELETE FROM "Sales ""EU"" Ü"."Orders Ü" WHERE id = ANY(%s)', (list(doomed),))
        window_start = other.execute("SELECT clock_timestamp()").fetchone()[0]
        long_tx.commit()
        statement_times = [
            r[0]
            for r in other.execute(
                "SELECT \"timestamp\" FROM audit_log WHERE action = 'DELETE' AND schema_name = %s "
                "AND relation_name = %s AND (row_data->>'id')::bigint = ANY(%s)",
                (SCHEMA, TABLE, list(doomed)),
            )
        ]
    assert len(statement_times) == 4 and max(statement_times) < window_start  # the statement ran before the window
    assert not set(doomed) & set(weird_rows(stack))

    async with running_worker(client, stack) as queue:
        handle, result = await run_to_the_end(
            client, stack, queue, inc, "--window-start", window_start.isoformat(), "--table", PRINTED, refuse_first=True
        )
    assert result.findings.rows_by_table == {PRINTED: 4}
    assert result.reinserted.inserted_by_table == {PRINTED: 4} and result.reinserted.conflicts_by_table == {}
    # Every row back as it was: same identity values, the generated total computed again, the big values intact.
    assert weird_rows(stack) == before
    # Rows travelled through S3 only: no payload in the run's history comes near Temporal's limit.
    assert await largest_payload(handle) < 64 * 1024
    assert any(len(s) > 0 for s in result.extracted.sample.values())


async def test_a_table_typed_without_quotes_is_found_and_a_wrong_one_changes_nothing(stack, client, analyst):
    with pg(stack) as conn:
        conn.execute('CREATE TABLE IF NOT EXISTS public."Orders" (id int PRIMARY KEY)')
    typed = await asyncio.to_thread(
        drp,
        "--state-dir",
        str(stack.state_dir),
        "audit",
        "install",
        "--database",
        DATABASE,
        "--tables",
        "Orders, public.Orders",
    )  # as typed
    assert typed.returncode == 0, typed.stderr
    with pg(stack) as conn:
        assert conn.execute(
            "SELECT 1 FROM pg_trigger WHERE tgrelid = 'public.\"Orders\"'::regclass AND tgname = 'audit_row_change'"
        ).fetchone()
    missing = await asyncio.to_thread(
        drp, "--state-dir", str(stack.state_dir), "audit", "install", "--database", DATABASE, "--tables", '"orders"'
    )  # quoted: exactly that name
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "table 'orders' does not exist" in missing.stderr and "Traceback" not in missing.stderr

    async with running_worker(client, stack) as queue:
        inc = incident()
        started = await asyncio.to_thread(
            cli,
            stack,
            queue,
            "start",
            "deletion",
            "--incident",
            inc,
            "--database",
            DATABASE,
            "--role",
            ROLE,
            "--window-start",
            (datetime.now(UTC) - timedelta(minutes=5)).isoformat(),
            "--table",
            '"orders"',
        )
        assert started.returncode == 0, started.stderr
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(client.get_workflow_handle(f"accidental-deletion-{inc}").result(), timeout=RUN_WAIT)
    assert failed.value.cause.cause.type == "UnknownTable"
    assert can_delete(stack)  # nothing was contained


async def test_a_deleted_from_table_dropped_since_fails_at_once_naming_it(stack, client, analyst):
    with pg(stack) as conn:
        conn.execute('CREATE TABLE "Gone Table" (id int PRIMARY KEY)')
        conn.execute('INSERT INTO "Gone Table" VALUES (1), (2)')
        conn.execute(f'GRANT SELECT, DELETE ON "Gone Table" TO {ROLE}')
    done = drp(
        "--state-dir",
        str(stack.state_dir),
        "audit",
        "install",
        "--database",
        DATABASE,
        "--tables",
        'public."Gone Table"',
    )
    assert done.returncode == 0, done.stderr
    window_start = datetime.now(UTC)
    with psycopg.connect(**analyst) as conn:
        conn.execute('DELETE FROM "Gone Table"')
    with pg(stack) as conn:
        conn.execute('DROP TABLE "Gone Table"')
    async with running_worker(client, stack) as queue:
        inc = incident()
        started = await asyncio.to_thread(
            cli,
            stack,
            queue,
            "start",
            "deletion",
            "--incident",
            inc,
            "--database",
            DATABASE,
            "--role",
            ROLE,
            "--window-start",
            window_start.isoformat(),
        )
        assert started.returncode == 0, started.stderr
        handle = client.get_workflow_handle(f"accidental-deletion-{inc}")
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(handle.result(), timeout=RUN_WAIT)
    assert failed.value.cause.cause.type == "UnknownTable"
    assert 'public."Gone Table"' in failed.value.cause.cause.message
    assert can_delete(stack)


@pytest.fixture(scope="module")
def partitioned(stack):
    with pg(stack) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS readings (id int, taken date, reading text, PRIMARY KEY (id, taken))"
            " PARTITION BY RANGE (taken)"
        )
        conn.execute(
            "CREATE TABLE IF NOT EXISTS readings_2026_10 PARTITION OF readings "
            "FOR VALUES FROM ('2026-10-01') TO ('2026-11-01')"
        )
        conn.execute(
            "CREATE TABLE IF NOT EXISTS readings_2026_11 PARTITION OF readings "
            "FOR VALUES FROM ('2026-11-01') TO ('2026-12-01')"
        )
        conn.execute(
            "INSERT INTO readings SELECT g, date '2026-10-01' + g, 'r' || g FROM generate_series(1, 50) g "
            "ON CONFLICT DO NOTHING"
        )
    done = drp("--state-dir", str(stack.state_dir), "audit", "install", "--database", DATABASE, "--tables", "readings")
    assert done.returncode == 0, done.stderr


def readings(stack) -> dict:
    with pg(stack) as conn:
        return {(r[0], r[1]): r[2] for r in conn.execute("SELECT id, taken, reading FROM readings")}


@pytest.mark.parametrize(
    "named, deleted, expected",
    [
        ("readings", "id BETWEEN 25 AND 36", {"public.readings_2026_10": 6, "public.readings_2026_11": 6}),
        ("public.readings_2026_11", "id BETWEEN 40 AND 44", {"public.readings_2026_11": 5}),
    ],
)
async def test_a_partitioned_table_is_recovered_by_its_parent_or_a_partition(
    stack, client, partitioned, named, deleted, expected
):
    before = readings(stack)
    window_start = datetime.now(UTC)
    with pg(stack) as conn:
        conn.execute(f"DELETE FROM readings WHERE {deleted}")
    assert len(readings(stack)) == len(before) - sum(expected.values())
    async with running_worker(client, stack) as queue:
        _, result = await run_to_the_end(
            client, stack, queue, incident(), "--window-start", window_start.isoformat(), "--table", named
        )
    assert result.findings.rows_by_table == expected
    assert result.reinserted.inserted_by_table == expected
    assert readings(stack) == before
