"""How every starter starts a runbook: business-key ID, no second run of a running
incident (a failed one may be retried), search attributes and a summary for the Web UI,
all read from the runbook's one description (models/runbooks.py)."""

import asyncio
from typing import Any

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)

from models.inputs import RunbookInput
from models.runbooks import runbook
from workflows._runbook import Runbook
from workflows.search_attributes import INCIDENT_ID, PROCEDURE, SEVERITY


async def start_runbook(
    client: Client, procedure: str, inp: RunbookInput, task_queue: str, *, run: Any = None
) -> WorkflowHandle:
    """Start the runbook `procedure` names (a procedure name or an older alias) with a validated input;
    `run`, the workflow's run method, types the handle's result (else the registered type name is used)."""
    spec = runbook(procedure)
    return await client.start_workflow(
        run or spec.workflow_type,
        inp,
        id=spec.workflow_id(inp.incident_id),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(INCIDENT_ID, inp.incident_id),
                SearchAttributePair(PROCEDURE, spec.procedure),
                SearchAttributePair(SEVERITY, inp.severity.value),
            ]
        ),
        static_summary=spec.summary(inp),
    )


async def wait_for_approval(handle: WorkflowHandle, step: str | None = None, poll_seconds: float = 0.1) -> str | None:
    """Wait until a run asks for approval (of `step`, when given); None if the run ended first.

    Every runbook answers the `progress` query, so this serves them all; callers bound it with
    asyncio.timeout."""
    while True:
        progress = await handle.query(Runbook.progress)
        if progress.awaiting_approval and step in (None, progress.awaiting_approval):
            return progress.awaiting_approval
        if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
            return None
        await asyncio.sleep(poll_seconds)
