"""How every starter starts a runbook: business-key ID, no second run of a running
incident (a failed one may be retried), search attributes and a summary for the Web UI."""

from temporalio.client import Client, WorkflowHandle
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)

from workflows.search_attributes import INCIDENT_ID, PROCEDURE, SEVERITY


async def start_runbook(client: Client, run, inp, *, workflow_id: str, procedure: str, summary: str,
                        task_queue: str) -> WorkflowHandle:
    return await client.start_workflow(
        run, inp, id=workflow_id, task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
        search_attributes=TypedSearchAttributes([
            SearchAttributePair(INCIDENT_ID, inp.incident_id), SearchAttributePair(PROCEDURE, procedure),
            SearchAttributePair(SEVERITY, inp.severity.value)]),
        static_summary=summary,
    )
