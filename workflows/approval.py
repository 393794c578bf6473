"""The approval gate: a run waits here, before anything destructive, for a person.

The decision arrives as a Temporal Update (`approve`) so the sender learns at
once whether it was accepted; the validator rejects it, without touching the
run, when nothing is pending or a decision was already made.
"""

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

from models.approval import ApprovalRecord, ApprovalRequest


class ApprovalGate:
    def __init__(self) -> None:
        self.pending_step: str | None = None
        self.decision: ApprovalRecord | None = None

    def validate(self, req: ApprovalRequest) -> None:
        if self.decision is not None:
            verb = "approved" if self.decision.approved else "rejected"
            raise ApplicationError(f"step {self.decision.step!r} was already {verb} by {self.decision.approver}",
                                   type="AlreadyDecided")
        if self.pending_step is None:
            raise ApplicationError("no approval is pending for this run yet", type="NothingToApprove")

    def record(self, req: ApprovalRequest) -> ApprovalRecord:
        assert self.pending_step is not None
        self.decision = ApprovalRecord(step=self.pending_step, approver=req.approver, reason=req.reason,
                                       approved=req.approved, decided_at=workflow.now())
        return self.decision

    async def wait(self, step: str, timeout: timedelta) -> ApprovalRecord:
        """Wait for a decision; fail the run, having changed nothing, if none comes in time."""
        self.pending_step = step
        try:
            await workflow.wait_condition(lambda: self.decision is not None, timeout=timeout)
        except asyncio.TimeoutError:
            raise ApplicationError(
                f"no approval for {step!r} within {timeout}; nothing was changed: the database and the "
                "application are as they were. Start a new run to try again.",
                type="ApprovalTimeout", non_retryable=True) from None
        finally:
            self.pending_step = None
        assert self.decision is not None
        if not self.decision.approved:
            raise ApplicationError(f"{step!r} rejected by {self.decision.approver}: {self.decision.reason}; "
                                   "nothing was changed", type="ApprovalRejected", non_retryable=True)
        return self.decision
