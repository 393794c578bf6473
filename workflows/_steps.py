"""Step bookkeeping shared by the runbooks: timings for the result, the current
step for the Web UI (current details) and for the `progress` query."""

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from pydantic import BaseModel, ConfigDict
from temporalio import workflow

from models.steps import StepRecord

T = TypeVar("T")


class Progress(BaseModel):
    model_config = ConfigDict(frozen=True)

    current_step: str | None
    completed: list[StepRecord]
    awaiting_approval: str | None = None
    total_steps: int | None = None  # the N of "Step n/N": the steps of the path this run takes


class StepTracker:
    def __init__(self, total: int, on_change: Callable[[], None] = lambda: None):
        self.total = total
        self.completed: list[StepRecord] = []
        self.current: str | None = None
        self.on_change = on_change  # the runbook tells its incident

    async def run(self, name: str, work: Awaitable[T], detail: str = "") -> T:
        """Await one step, recording when it started and ended and showing it in the UI."""
        self.current = name
        started = workflow.now()
        workflow.set_current_details(
            f"**Step {len(self.completed) + 1}/{self.total}: {name}** (since {_hms(started)} UTC)"
            + (f"\n\n{detail}" if detail else "")
        )
        self.on_change()
        try:
            result = await work
        except BaseException:
            self.completed.append(StepRecord(name=name, started_at=started, ended_at=workflow.now(), outcome="failed"))
            workflow.set_current_details(f"**Failed at step: {name}**")
            self.on_change()
            raise
        self.completed.append(StepRecord(name=name, started_at=started, ended_at=workflow.now()))
        self.current = None
        self.on_change()
        return result

    def finish(self, summary: str) -> None:
        workflow.set_current_details(summary)


def _hms(moment: datetime) -> str:
    return moment.strftime("%H:%M:%S")
