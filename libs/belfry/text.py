"""Text PostgreSQL can store, checked where requests are validated.

PostgreSQL's ``text`` cannot hold U+0000 (and ``jsonb`` refuses ``\\u0000``),
so a NUL that reaches a query fails there and the caller sees an opaque
INTERNAL. Validators call these first, and the caller gets INVALID_ARGUMENT
naming the field. Protobuf has already guaranteed valid UTF-8 (the kit's
decode guard), so NUL is the one character left to refuse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from belfry.errors import InvalidArgument

NUL = "\x00"


def check_storable(value: str, field: str) -> str:
    """``value`` unchanged; InvalidArgument naming ``field`` when it holds a NUL character."""
    if NUL in value:
        raise InvalidArgument(
            f"{field} contains a NUL character (U+0000), which cannot be stored; remove it", field=field
        )
    return value


def check_all(values: Iterable[str], field: str) -> None:
    """``check_storable`` on each of ``values``, naming the item (``field[3]``)."""
    for i, value in enumerate(values):
        if NUL in value:
            check_storable(value, f"{field}[{i}]")


def check_record(record: object, name: str) -> None:
    """``check_storable`` on every text reachable from a dataclass: its fields, nested
    dataclasses, sequences and mappings (``user.display_name``, ``team.members[2].user_id``)."""
    _walk(record, name)


def _walk(value: object, path: str) -> None:
    if isinstance(value, str):
        check_storable(value, path)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _walk(getattr(value, f.name), f"{path}.{f.name}")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _walk(key, f"{path} key")
            _walk(item, f"{path}[{key!r}]")
    elif isinstance(value, list | tuple | frozenset | set):
        for i, item in enumerate(value):
            _walk(item, f"{path}[{i}]")
