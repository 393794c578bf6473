"""The approval gate: a run waits here, before anything destructive, for a person.

The decision arrives as a Temporal Update (`approve`) so the sender learns at
once whether it was accepted; the validator rejects it (non-retryable: the same
request is refused again), without touching the
run, when nothing is pending, the step was already decided, or the approver
is not on the playbook's roster for this severity and gate. A run may pass
several gates (re-insert, then lifting containment); each is decided once.
"""

from collections.abc import Callable
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

from models.approval import ApprovalRecord, ApprovalRequest
from models.errors import ErrorKind


class ApprovalGate:
    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self.pending_step: str | None = None
        self.last_step: str | None = None
        self.decisions: dict[str, ApprovalRecord] = {}
        self.roster: dict[str, list[str]] = {}  # gate -> who may decide it; "*" for the others
        self.on_change = on_change

    def validate(self, req: ApprovalRequest) -> None:
        step = self.pending_step or self.last_step
        if step in self.decisions:
            decision = self.decisions[step]
            verb = "approved" if decision.approved else "rejected"
            raise ApplicationError(
                f"step {step!r} was already {verb} by {decision.approver}",
                type=ErrorKind.AlreadyDecided,
                non_retryable=True,
            )
        if self.pending_step is None:
            raise ApplicationError(
                "no approval is pending for this run yet: the same decision is refused until the "
                "run asks (its progress query shows awaiting_approval)",
                type=ErrorKind.NothingToApprove,
                non_retryable=True,
            )
        allowed = self.roster.get(self.pending_step, self.roster.get("*", []))  # the step asked now
        if req.approver not in allowed:
            raise ApplicationError(
                f"{req.approver!r} is not on the roster for {step!r} at this severity; "
                f"ask one of: {', '.join(allowed) or 'nobody (check playbook.yaml approvers)'}",
                type=ErrorKind.NotOnRoster,
                non_retryable=True,
            )

    def record(self, req: ApprovalRequest) -> ApprovalRecord:
        assert self.pending_step is not None
        decision = ApprovalRecord(
            step=self.pending_step,
            approver=req.approver,
            reason=req.reason,
            approved=req.approved,
            decided_at=workflow.now(),
        )
        self.decisions[self.pending_step] = decision
        self.on_change()
        return decision

    async def wait(
        self, step: str, timeout: timedelta, unchanged: str = "nothing was changed at this step"
    ) -> ApprovalRecord:
        """Wait for a decision; fail with `unchanged` (what the operator may rely on) if none comes in time."""
        self.pending_step = self.last_step = step
        self.on_change()
        try:
            await workflow.wait_condition(lambda: step in self.decisions, timeout=timeout)
        except TimeoutError:
            raise ApplicationError(
                f"no approval for {step!r} within {timeout}; {unchanged}.",
                type=ErrorKind.ApprovalTimeout,
                non_retryable=True,
            ) from None
        finally:
            self.pending_step = None
        decision = self.decisions[step]
        if not decision.approved:
            raise ApplicationError(
                f"{step!r} rejected by {decision.approver}: {decision.reason}; {unchanged}",
                type=ErrorKind.ApprovalRejected,
                non_retryable=True,
            )
        return decision
