"""Fluent Bit tag matching: ``match`` with ``*`` wildcards, or ``match_regex``.

``*`` is the only wildcard, matching any run of characters (dots included), as in
Fluent Bit's router. ``match_regex`` is searched, like Onigmo's search in Fluent Bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TagMatcher:
    pattern: str | None = None
    regex: re.Pattern[str] | None = None

    def __post_init__(self) -> None:
        if self.pattern is not None:
            parts = (re.escape(part) for part in self.pattern.split("*"))
            object.__setattr__(self, "_compiled", re.compile(".*".join(parts), re.DOTALL))

    def matches(self, tag: str) -> bool:
        if self.regex is not None:
            return self.regex.search(tag) is not None
        if self.pattern is None:
            return False
        compiled: re.Pattern[str] = object.__getattribute__(self, "_compiled")
        return compiled.fullmatch(tag) is not None
