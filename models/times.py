"""Points in time as a pydantic type: always timezone-aware.

A time without a zone ("2026-11-29T07:00:00") means something different on
every machine and cannot be compared with one that has a zone, so every model
refuses it with a message that says how to fix it.
"""

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator


def require_zone(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{value.isoformat()} has no time zone: add Z or an offset "
            f"(e.g. {value:%Y-%m-%dT%H:%M:%S}Z or {value:%Y-%m-%dT%H:%M:%S}+01:00)"
        )
    return value


Timestamp = Annotated[datetime, AfterValidator(require_zone)]
