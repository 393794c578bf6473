"""Work entering through every door (the `drp` CLI, `temporal workflow start` as the Web UI does it) either
does the right thing or is refused with one clear line, changing nothing."""

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.service import RPCError

from stack.stack import DATABASE
from tests.conftest import running_worker
from tests.test_stack import drp

TEMPORAL = Path(sys.executable).parent / "temporal"


def cli_env(stack, queue: str) -> dict:
    return {**os.environ, "DRP_TASK_QUEUE": queue}


async def scheduled_activities(handle) -> list[str]:
    return [
        e.activity_task_scheduled_event_attributes.activity_type.name
        async for e in handle.fetch_history_events()
        if e.HasField("activity_task_scheduled_event_attributes")
    ]


async def test_a_time_without_a_zone_on_the_cli_is_one_line_and_starts_nothing(stack, client):
    incident = f"TZ-{uuid.uuid4().hex[:8]}"
    done = await asyncio.to_thread(
        drp,
        "--state-dir",
        str(stack.state_dir),
        "start",
        "deletion",
        "--incident",
        incident,
        "--database",
        DATABASE,
        "--window-start",
        "2026-11-29T07:00:00",
        "--window-end",
        "2026-11-29T09:00:00+01:00",
        env=cli_env(stack, f"test-{uuid.uuid4().hex[:10]}"),
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "window_start" in done.stderr and "add Z or an offset" in done.stderr
    with pytest.raises(RPCError):  # nothing was started
        await client.get_workflow_handle(f"accidental-deletion-{incident}").describe()


@pytest.mark.parametrize(
    "workflow_type, body",
    [
        (
            "AccidentalDeletionRecovery",
            {"database": DATABASE, "window_start": "2026-11-29T07:00:00", "window_end": "2026-11-29T09:00:00+01:00"},
        ),
        ("DatabaseCorruptionRecovery", {"database": DATABASE, "incident_started_at": "2026-11-29T08:25:00"}),
        ("DatabaseCorruptionRecovery", {"database": DATABASE, "no_such_field": 1}),
    ],
)
async def test_bad_input_from_the_web_ui_fails_the_run_at_once(stack, client, workflow_type, body):
    """`temporal workflow start --input` is what the Web UI's Start Workflow sends: a bad input fails the run
    with a ValidationError before any step, instead of failing its workflow task for ever."""
    incident = f"UI-{uuid.uuid4().hex[:8]}"
    async with running_worker(client, stack) as queue:
        start = await asyncio.to_thread(
            subprocess.run,
            [
                str(TEMPORAL),
                "workflow",
                "start",
                "--address",
                stack.temporal_address,
                "--task-queue",
                queue,
                "--type",
                workflow_type,
                "--workflow-id",
                f"ui-{incident}",
                "--input",
                json.dumps({"incident_id": incident, **body}),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert start.returncode == 0, start.stderr
        handle = client.get_workflow_handle(f"ui-{incident}")
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(handle.result(), timeout=30)
    assert failed.value.cause.type == "ValidationError"
    assert await scheduled_activities(handle) == []
    if "window_start" in body or "incident_started_at" in body:
        assert "add Z or an offset" in failed.value.cause.message


async def test_an_undecodable_payload_fails_the_run_at_once(stack, client):
    """Not JSON at all: the decoding error, whatever its kind, is a ValidationError that fails the run."""
    incident = f"UI-{uuid.uuid4().hex[:8]}"
    async with running_worker(client, stack) as queue:
        start = await asyncio.to_thread(
            subprocess.run,
            [
                str(TEMPORAL),
                "workflow",
                "start",
                "--address",
                stack.temporal_address,
                "--task-queue",
                queue,
                "--type",
                "AccidentalDeletionRecovery",
                "--workflow-id",
                f"ui-{incident}",
                "--input",
                "not json",
                "--input-meta",
                "encoding=binary/plain",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert start.returncode == 0, start.stderr
        handle = client.get_workflow_handle(f"ui-{incident}")
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(handle.result(), timeout=30)
    assert failed.value.cause.type == "ValidationError"
    assert await scheduled_activities(handle) == []


def test_every_command_reads_settings_from_the_state_dir(tmp_path):
    """`drp --state-dir X audit install` reads X's settings like every other command: without them, one line."""
    env = {k: v for k, v in os.environ.items() if k != "DRP_SETTINGS_FILE"}
    done = drp(
        "--state-dir", str(tmp_path), "audit", "install", "--database", "corp-intel", "--tables", "Orders", env=env
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"drp: no settings in {tmp_path}: {tmp_path}/settings.json does not exist (`drp --state-dir {tmp_path} "
        "stack up` writes it; or set DRP_SETTINGS_FILE)"
    ]
    bad = drp("--state-dir", str(tmp_path), "audit", "install", "--database", "x", "--tables", 'a."b', env=env)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "drp: --tables: 'a.\"b': a quoted name is not closed"
    ]
