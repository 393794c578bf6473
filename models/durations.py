"""Human durations ("15m", "1h30m", "200ms") as a pydantic type."""

import re
from datetime import timedelta
from typing import Annotated

from pydantic import BeforeValidator

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> object:
    """Turn "1h30m" into a timedelta; leave numbers and timedeltas to pydantic."""
    if not isinstance(value, str) or value.startswith(("P", "-P")):
        return value  # numbers (seconds), timedeltas and ISO 8601 ("PT1H") are pydantic's
    text = value.strip().replace(" ", "")
    parts = _PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{value!r} is not a duration such as 30m, 1h30m, 200ms or 0s")
    return timedelta(seconds=sum(float(n) * _UNIT_SECONDS[u] for n, u in parts))


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
