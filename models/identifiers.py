"""Shared constrained strings for inputs that end up in paths, SQL and workflow IDs."""

import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StringConstraints,
)

# Used in workflow IDs and directory names: no slashes, no spaces, no dots first.
IncidentId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SIMPLE = re.compile(r"^[a-z_][a-z0-9_$]*$")


def _pg_name(value: str) -> str:
    """Any name PostgreSQL accepts (it reaches SQL only through psycopg.sql.Identifier): not empty, no control
    characters, at most 63 bytes (longer names are silently truncated by PostgreSQL: refused instead)."""
    if not value.strip():
        raise ValueError("a PostgreSQL name must not be empty")
    if _CONTROL.search(value):
        raise ValueError(f"{value!r} contains a control character")
    if len(value.encode()) > 63:
        raise ValueError(f"{value!r} is longer than PostgreSQL's 63-byte limit for names")
    return value


def _database_name(value: str) -> str:
    # libpq-based tools (pg_dump -d, psql -d) read a "database name" holding '=' or a URI prefix as a
    # connection string: such a name would connect somewhere else.
    if "=" in value or value.startswith(("postgres://", "postgresql://")):
        raise ValueError(f"{value!r} would be read as a connection string by PostgreSQL's tools")
    return value


# A role, schema or table name: matched exactly, quoted wherever it reaches SQL.
PgName = Annotated[str, AfterValidator(_pg_name)]
# A database name (corp-intel, "Sales DB" ...).
DatabaseName = Annotated[str, AfterValidator(_pg_name), AfterValidator(_database_name)]


def quote_ident(name: str) -> str:
    """A name as PostgreSQL prints it (close to quote_ident: keywords are not quoted here)."""
    return name if _SIMPLE.match(name) else '"' + name.replace('"', '""') + '"'


def split_qualified(text: str) -> tuple[list[str], bool]:
    """`Orders`, `public.Orders`, `"Orders"`, `public."Orders"`, `"Sales EU"."Orders Ü"` -> the parts, and
    whether any part was quoted ("" inside quotes is one quote). Unquoted parts are kept as typed (not folded)."""
    parts, quoted, i, text = [], False, 0, text.strip()
    while True:
        if i < len(text) and text[i] == '"':
            j, part = i + 1, []
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise ValueError(f"{text!r}: a quoted name is not closed")
                part.append(text[j:k])
                if text[k + 1 : k + 2] == '"':  # "" is a quote inside the name
                    part.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            parts.append("".join(part))
            quoted = True
        else:
            k = text.find(".", i)
            k = len(text) if k < 0 else k
            part = text[i:k]
            if '"' in part:
                raise ValueError(f'{text!r}: a quote in the middle of a name (quote the whole name: "a""b")')
            parts.append(part.strip())
            i = k
        if i == len(text):
            break
        if text[i] != ".":
            raise ValueError(f"{text!r}: expected a dot after a quoted name")
        i += 1
    if len(parts) > 2:
        raise ValueError(f"{text!r}: give a table as name or schema.name (quote names holding a dot)")
    for p in parts:
        _pg_name(p)
    return parts, quoted


def split_list(text: str) -> list[str]:
    """`a, "b,c", s."d"` -> ['a', '"b,c"', 's."d"']: commas inside quoted names do not separate."""
    items, current, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    items.append("".join(current).strip())
    return [i for i in items if i]


class TableRef(BaseModel):
    """A table as (schema, name). Accepted as the user types it (`Orders`, `public.Orders`) and as PostgreSQL
    prints it (`"Orders"`, `public."Orders"`), or as {"schema": ..., "name": ...}.

    `schema` None: the one schema that has such a table (public first). `as_typed`: any part was quoted, so
    the names match exactly; otherwise a name matches as typed first, else as PostgreSQL folds it
    (lower case), like an unquoted name in SQL.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_name: PgName | None = None
    name: PgName
    as_typed: bool = True

    @classmethod
    def parse(cls, text: str) -> "TableRef":
        parts, quoted = split_qualified(text)
        return cls(schema_name=parts[0] if len(parts) == 2 else None, name=parts[-1], as_typed=quoted)

    def __str__(self) -> str:
        name = quote_ident(self.name)
        return f"{quote_ident(self.schema_name)}.{name}" if self.schema_name else name


def _table_ref(value: Any) -> Any:
    if isinstance(value, str):
        return TableRef.parse(value)
    if isinstance(value, dict) and "schema" in value and "schema_name" not in value:
        return {**{k: v for k, v in value.items() if k != "schema"}, "schema_name": value["schema"]}
    return value


Table = Annotated[TableRef, BeforeValidator(_table_ref)]


def not_blank(value: str, info) -> str:
    """A field validator for who decided and why: surrounding space trimmed, empty refused."""
    value = value.strip()
    if not value:
        raise ValueError(f"{info.field_name} must not be empty: say who and why")
    return value
