"""One message to one channel, and what the notification port answers."""

from typing import Literal

from pydantic import BaseModel, ConfigDict

from models.times import Timestamp

StatusPageStatus = Literal["investigating", "identified", "monitoring", "resolved"]


class Notification(BaseModel):
    """`key` is (incident, tick, channel): the ledger sends each key at most once per success."""

    model_config = ConfigDict(frozen=True)

    key: str
    incident_id: str
    kind: str  # a template name: status_update, page, customer_notice, ...
    channel: str  # a name in the playbook's communication.channels
    context: dict[str, str]
    status_page_status: StatusPageStatus = "investigating"


class Delivery(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    channel: str
    kind: str
    subject: str
    sent_at: Timestamp
    reference: str = ""  # message id, SNS MessageId, status page incident id
    already_sent: bool = False  # a retry found it in the ledger and sent nothing
