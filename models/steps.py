"""Per-step timing, so every run measures its own RTO instead of estimating it."""

from datetime import timedelta

from pydantic import BaseModel, ConfigDict

from models.times import Timestamp


class StepRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    started_at: Timestamp
    ended_at: Timestamp
    outcome: str = "ok"
    detail: str = ""

    @property
    def duration(self) -> timedelta:
        return self.ended_at - self.started_at
