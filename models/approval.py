"""Human approval of a destructive step, sent as a Temporal Update."""

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.identifiers import not_blank
from models.times import Timestamp


class ApprovalRequest(BaseModel):
    """What an operator sends: who decides, why, and whether to go ahead."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    approver: str = Field(max_length=200)
    reason: str = Field(max_length=2000)
    approved: bool = True

    _named = field_validator("approver", "reason")(not_blank)


class ApprovalRecord(BaseModel):
    """The decision as the run recorded it (for the result and the report)."""

    model_config = ConfigDict(frozen=True)

    step: str
    approver: str
    reason: str
    approved: bool
    decided_at: Timestamp
