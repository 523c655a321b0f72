"""Fluent Bit record accessors: ``log``, ``$log`` or ``$kubernetes['labels']['app']``."""

from __future__ import annotations

import re
from typing import Any

_PART = re.compile(r"\[\s*(?:'([^']*)'|\"([^\"]*)\"|(\d+))\s*\]")
_MISSING = object()


class RecordAccessor:
    def __init__(self, pattern: str) -> None:
        text = pattern.strip()
        self.pattern = text
        if not text.startswith("$"):
            self.path: tuple[str | int, ...] = (text,)
            return
        text = text[1:]
        head, bracket, rest = text.partition("[")
        path: list[str | int] = [head]
        rest = bracket + rest
        position = 0
        while position < len(rest):
            match = _PART.match(rest, position)
            if match is None:
                raise ValueError(f"bad record accessor {pattern!r} near {rest[position:]!r}")
            single, double, index = match.groups()
            path.append(int(index) if index is not None else (single if single is not None else double or ""))
            position = match.end()
        if not head:
            raise ValueError(f"bad record accessor {pattern!r}: no key after $")
        self.path = tuple(path)

    def get(self, body: dict[str, Any]) -> Any:
        """The value, or ``None`` if any step is missing."""
        value: Any = body
        for part in self.path:
            try:
                value = value[part]
            except (KeyError, IndexError, TypeError):
                return None
        return value


def value_as_text(value: Any) -> str | None:
    """How a grep-like filter sees a value: strings as they are, numbers/bools as JSON text."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    import orjson

    return orjson.dumps(value).decode()
