"""The README's first command: a database-corruption drill on the embedded stack, run as an incident.

Brings the stack up, records row counts, corrupts a table's data file on disk,
and opens an incident the way an alert would (labels alertname
PostgresDataCorruption, datname corporate_intel): the playbook classifies it
P0 and starts DatabaseCorruptionRecovery as its child. The drill approves the
restore as the on-duty DBA, confirms the recovery as incident commander, and
prints the step timings, RTO and RPO, recovered row counts, where the messages
went, the post-incident report and the Web UI links.
"""

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path

from temporalio.service import RPCError

from adapters.reports import read_report
from models.approval import ApprovalRequest
from models.db_corruption import PROCEDURE, CorruptionRecoveryResult
from models.incident import IncidentInput, IncidentStatus, ResolveRequest
from models.runbooks import BY_PROCEDURE
from stack.corrupt import corrupt_table
from stack.stack import DATABASE, Stack
from starters._start import wait_for_approval
from starters.incident import open_incident
from workers.clients import build_s3
from workers.settings import Settings
from workers.temporal_client import connect
from workflows.db_corruption import DatabaseCorruptionRecovery
from workflows.incident import Incident

CORRUPTED_TABLE = "companies"


async def run_demo(stack: Stack) -> CorruptionRecoveryResult:
    stack.up(with_worker=True)
    pg = stack.postgres()
    with pg.connect(DATABASE) as conn:
        counts = {
            t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("companies", "filings", "metrics")
        }
    print(f"\nrow counts before the incident: {counts}")
    started = datetime.now(UTC)
    damaged = corrupt_table(pg, DATABASE, CORRUPTED_TABLE)
    print(f"corrupted {CORRUPTED_TABLE}: overwrote bytes of {damaged}")

    incident_id = "DRILL-" + started.strftime("%Y%m%d-%H%M%S")
    client = await connect(stack.temporal_address)
    incident = await open_incident(
        client,
        IncidentInput(
            incident_id=incident_id,
            title="Monthly restore drill: companies table corrupted on disk",
            labels={"alertname": "PostgresDataCorruption", "datname": DATABASE},
            services=["corporate-intel-api"],
            runbook_input={"incident_started_at": started.isoformat(), "expected_row_counts": counts},
            opened_by="drp demo",
        ),
        stack.task_queue,
    )
    print(f"\nwatch the incident: {await _link(stack, incident)}\n")

    # The playbook classifies the alert as a P0 db-corruption incident; its child has the registry's ID.
    runbook = client.get_workflow_handle(BY_PROCEDURE[PROCEDURE].workflow_id(incident_id))
    step = await _when_started(lambda: wait_for_approval(runbook))
    if step:
        print(f"assessment done; approving {step!r} as bob, the DBA on the P0 roster")
        await runbook.execute_update(
            DatabaseCorruptionRecovery.approve,
            ApprovalRequest(approver="bob", reason="scheduled monthly restore drill"),
        )
    result = CorruptionRecoveryResult.model_validate(await runbook.result())
    print_result(result)
    await _incident_when(incident, lambda s: s.status == "recovered")
    await incident.execute_update(Incident.resolve, ResolveRequest(by="alice", reason="drill verified"))
    status = await _incident_when(incident, lambda s: s.report_uri is not None)
    print(
        f"\nincident {status.status}; its messages went to the stack's mailbox ({stack.mailbox_dir}) and to SNS "
        "in moto. Slack and the status page are not configured on the embedded stack: the report's timeline "
        "lists those messages as FAILED with the setting that is missing."
    )
    settings = Settings(**stack.worker_settings())
    print("\n" + (read_report(build_s3(settings), settings.reports_destination, incident_id) or ""))
    print(f"Web UI: {await _link(stack, incident)} (the incident)\n        {await _link(stack, runbook)} (the runbook)")
    drp = Path(sys.executable).parent / "drp"
    print(
        f"The stack keeps running for you to look around; `{drp} report {incident_id}` prints the report "
        f"again; stop the stack with: {drp} --state-dir {stack.state_dir} stack down"
    )
    return result


async def _link(stack: Stack, handle) -> str:
    """The Web UI's page of a run: its history, addressed by workflow and run ID."""
    run_id = (await handle.describe()).run_id
    return f"{stack.ui_url}/namespaces/default/workflows/{handle.id}/{run_id}/history"


async def _when_started(poll, timeout: float = 60):
    """`await poll()` (a poll of the runbook), retried until the incident has started the runbook."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await poll()
            except RPCError:  # the incident has not started it yet
                await asyncio.sleep(0.1)


async def _incident_when(incident, check, timeout: float = 60) -> IncidentStatus:
    async with asyncio.timeout(timeout):
        while not check(status := await incident.query(Incident.status)):
            await asyncio.sleep(0.1)
    return status


def print_result(result: CorruptionRecoveryResult) -> None:
    print(f"\n{result.incident_id}: {result.outcome}; corrupted tables: {', '.join(result.corrupted_tables) or '-'}")
    print(f"{'step':<28} {'start (UTC)':<10} {'seconds':>8}")
    for step in result.steps:
        print(f"{step.name:<28} {step.started_at:%H:%M:%S}   {step.duration.total_seconds():>8.1f}  {step.outcome}")
    if result.rto_actual is not None:
        print(
            f"\nRTO {result.rto_actual.total_seconds():.1f}s (target {result.rto_target}) "
            f"{'MET' if result.rto_met else 'MISSED'}"
        )
    if result.rpo_actual is not None:
        print(
            f"RPO {result.rpo_actual.total_seconds():.1f}s (target {result.rpo_target}) "
            f"{'MET' if result.rpo_met else 'MISSED'}"
        )
    elif result.outcome == "recovered":
        print(
            f"RPO unknown (target {result.rpo_target}): the primary could not be sealed and no commit "
            "timestamp survived"
        )
    if result.recovered_row_counts:
        print(f"recovered row counts: {result.recovered_row_counts}")
    if result.damaged_data_dir:
        print(f"damaged data kept for forensics at {result.damaged_data_dir}")
