"""Shared constrained strings for inputs that end up in paths, SQL and workflow IDs."""

from typing import Annotated

from pydantic import StringConstraints

# Used in workflow IDs and directory names: no slashes, no spaces, no dots first.
IncidentId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
# A PostgreSQL identifier we are willing to interpolate (quoted) into commands.
PgName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")]


def not_blank(value: str, info) -> str:
    """A field validator for who decided and why: surrounding space trimmed, empty refused."""
    value = value.strip()
    if not value:
        raise ValueError(f"{info.field_name} must not be empty: say who and why")
    return value
