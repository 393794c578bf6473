"""A small workflow for the deployment tests (encryption, metrics): an input field, an activity that
sees it, a signal, a result with the runbook result's outcome/RTO fields, and a failure naming it."""

from datetime import timedelta

from pydantic import BaseModel
from temporalio import activity, workflow
from temporalio.exceptions import ApplicationError


class SecretInput(BaseModel):
    note: str
    wait_for_signal: bool = False
    fail: bool = False


class SecretResult(BaseModel):
    echoed: str
    outcome: str = "recovered"
    rto_actual: timedelta = timedelta(seconds=42)
    rto_target: timedelta = timedelta(minutes=15)


@activity.defn
async def echo(note: str) -> str:
    return f"activity saw {note}"


@workflow.defn
class SecretEcho:
    def __init__(self) -> None:
        self.released: str | None = None

    @workflow.signal
    def release(self, note: str) -> None:
        self.released = note

    @workflow.query
    def waiting(self) -> bool:
        return self.released is None

    @workflow.run
    async def run(self, inp: SecretInput) -> SecretResult:
        if inp.wait_for_signal:
            await workflow.wait_condition(lambda: self.released is not None)
        seen = await workflow.execute_activity(echo, inp.note, start_to_close_timeout=timedelta(minutes=5))
        if inp.fail:
            raise ApplicationError(f"refused: {inp.note}", type="DeployTestRefusal", non_retryable=True)
        return SecretResult(echoed=f"{seen} {self.released or ''}".strip())
