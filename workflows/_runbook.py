"""What every runbook shares: the approval gate and its Update, the progress
query, step tracking, the search attributes the Web UI shows, and the
progress signal to the incident that started it."""

import asyncio
from datetime import timedelta

from temporalio import workflow

from models.approval import ApprovalRecord, ApprovalRequest
from models.incident import RunbookProgress
from models.platform import StopAppRequest
from models.playbook import Severity
from workflows import _options as opt
from workflows._steps import Progress, StepTracker
from workflows.approval import ApprovalGate
from workflows.search_attributes import INCIDENT_ID, PROCEDURE, SEVERITY

with workflow.unsafe.imports_passed_through():
    from activities.platform import PlatformActivities
    from activities.playbook import PlaybookActivities

from workflows.incident import Incident  # its progress signal, by reference


class Runbook:
    STEPS: int

    def __init__(self) -> None:
        self.steps = StepTracker(total=self.STEPS, on_change=self._tell_incident)
        self.gate = ApprovalGate(on_change=self._tell_incident)
        self._progress_seq = 0

    async def prepare(self, incident_id: str, procedure: str, severity: Severity) -> None:
        """Label the run (also when started from the Web UI without search attributes) and load the
        approver roster for its procedure and severity from the playbook."""
        workflow.upsert_search_attributes(
            [
                INCIDENT_ID.value_set(incident_id),
                PROCEDURE.value_set(procedure),
                SEVERITY.value_set(severity.value),
            ]
        )
        self.gate.roster = await workflow.execute_activity_method(
            PlaybookActivities.approvers_for, args=[procedure, severity], summary="approver roster", **opt.quick()
        )

    @workflow.update
    def approve(self, req: ApprovalRequest) -> ApprovalRecord:
        """Decide the pending gate: approve or reject, by a person on the gate's roster, with a reason.
        Refused by the validator (nothing changes): NothingToApprove, AlreadyDecided, NotOnRoster.
        """
        return self.gate.record(req)

    @approve.validator
    def _validate_approve(self, req: ApprovalRequest) -> None:
        self.gate.validate(req)

    @workflow.query
    def progress(self) -> Progress:
        """The steps completed (with start and end times), the current step, and the gate awaiting approval."""
        return Progress(
            current_step=self.steps.current,
            completed=self.steps.completed,
            awaiting_approval=self.gate.pending_step,
            total_steps=self.steps.total,
        )

    async def stop_application(self, incident_id: str, heartbeat_timeout: timedelta):
        """The "stop application" step every database runbook takes before it touches the database:
        the app's replicas go to zero (re-run safe: stopping a stopped app changes nothing)."""
        return await self.steps.run(
            "stop application",
            workflow.execute_activity_method(
                PlatformActivities.stop_application,
                StopAppRequest(incident_id=incident_id),
                summary="stop the application",
                **opt.long_running(heartbeat_timeout, timedelta(minutes=30)),
            ),
        )

    def _tell_incident(self) -> None:
        """Signal the step progress to the parent Incident, if an incident started this run."""
        parent = workflow.info().parent
        if parent is None:
            return
        self._progress_seq += 1
        progress = RunbookProgress(
            seq=self._progress_seq,
            current_step=self.steps.current,
            completed=list(self.steps.completed),
            awaiting_approval=self.gate.pending_step,
            decisions=list(self.gate.decisions.values()),
        )
        asyncio.create_task(_signal_quietly(workflow.get_external_workflow_handle(parent.workflow_id), progress))


async def _signal_quietly(handle, progress: RunbookProgress) -> None:
    try:
        await handle.signal(Incident.runbook_progress, progress)
    except Exception as err:  # the incident may have closed; the runbook goes on regardless
        workflow.logger.warning("could not tell the incident about progress: %s", err)
