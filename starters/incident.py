"""Open an incident (the parent workflow) from a script: `open_incident(client, IncidentInput(...), queue)`,
or `python -m starters.incident --title ... [--severity P0] [--procedure db-corruption]` (the same
options as `drp incident open`).

The incident ID is the workflow ID; an ID that is already open is refused,
never joined by accident (alerts join by their group instead, see alerts.py).
"""

import re
from datetime import UTC, datetime

from temporalio.client import Client, WorkflowHandle
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)

from models.incident import IncidentInput
from workflows.incident import Incident
from workflows.search_attributes import INCIDENT_ID, STATUS


def incident_search_attributes(inp: IncidentInput) -> TypedSearchAttributes:
    return TypedSearchAttributes(
        [SearchAttributePair(INCIDENT_ID, inp.incident_id), SearchAttributePair(STATUS, "investigating")]
    )


async def next_incident_id(client: Client, now: datetime | None = None) -> str:
    """INC-YYYYMMDD-NNN: one more than today's highest (the playbook's numbering).

    Incidents opened by alerts share the prefix with an 8-character group hash
    (INC-YYYYMMDD-1a2b3c4d, sometimes all digits): only 3 to 6 digit numbers count."""
    day = f"INC-{(now or datetime.now(UTC)):%Y%m%d}-"
    taken = [
        int(w.id.removeprefix(day))
        async for w in client.list_workflows(f"WorkflowType = 'Incident' AND WorkflowId STARTS_WITH '{day}'")
        if re.fullmatch(r"\d{3,6}", w.id.removeprefix(day))
    ]
    return f"{day}{max(taken, default=0) + 1:03d}"


async def open_incident(client: Client, inp: IncidentInput, task_queue: str) -> WorkflowHandle:
    return await client.start_workflow(
        Incident.run,
        inp,
        id=inp.incident_id,
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        search_attributes=incident_search_attributes(inp),
        static_summary=f"incident {inp.incident_id}: {inp.title}",
    )


if __name__ == "__main__":
    import sys

    from starters.cli import main

    main(["incident", "open", *sys.argv[1:]])
