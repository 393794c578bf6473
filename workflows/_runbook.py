"""What every runbook shares: the approval gate and its Update, the progress
query, step tracking and the search attributes the Web UI shows."""

from temporalio import workflow

from models.approval import ApprovalRecord, ApprovalRequest
from models.playbook import Severity
from workflows._steps import Progress, StepTracker
from workflows.approval import ApprovalGate
from workflows.search_attributes import INCIDENT_ID, PROCEDURE, SEVERITY


class Runbook:
    STEPS: int

    def __init__(self) -> None:
        self.steps = StepTracker(total=self.STEPS)
        self.gate = ApprovalGate()

    def label(self, incident_id: str, procedure: str, severity: Severity) -> None:
        """Set the search attributes also when the run was started without them (from the Web UI)."""
        workflow.upsert_search_attributes([
            INCIDENT_ID.value_set(incident_id), PROCEDURE.value_set(procedure), SEVERITY.value_set(severity.value),
        ])

    @workflow.update
    def approve(self, req: ApprovalRequest) -> ApprovalRecord:
        return self.gate.record(req)

    @approve.validator
    def _validate_approve(self, req: ApprovalRequest) -> None:
        self.gate.validate(req)

    @workflow.query
    def progress(self) -> Progress:
        return Progress(current_step=self.steps.current, completed=self.steps.completed,
                        awaiting_approval=self.gate.pending_step)
