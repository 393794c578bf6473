"""Per-step timing, so every run measures its own RTO instead of estimating it."""

from datetime import datetime, timedelta

from pydantic import BaseModel, ConfigDict


class StepRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    started_at: datetime
    ended_at: datetime
    outcome: str = "ok"
    detail: str = ""

    @property
    def duration(self) -> timedelta:
        return self.ended_at - self.started_at
