"""Fluent Bit's value syntax: sizes, durations and booleans.

Fluent Bit accepts ``32k``/``5MB`` sizes (powers of 1024), ``10m``/``1h`` durations or bare
seconds, and ``on/off/true/false/yes/no`` booleans. Parsing them in one place keeps every plugin
consistent with the configs users bring from Fluent Bit.
"""

from __future__ import annotations

import re

TRUE_WORDS = frozenset({"on", "true", "yes", "1"})
FALSE_WORDS = frozenset({"off", "false", "no", "0"})

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_DURATION_FACTORS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"expected a boolean (on/off, true/false, yes/no), got {text!r}")


def parse_size(text: str) -> int:
    """``32k`` -> 32768, ``5MB`` -> 5242880, ``100`` -> 100 bytes."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"expected a size such as 512, 32k, 5M or 1G, got {text!r}")
    number, unit = match.groups()
    return int(float(number) * _SIZE_FACTORS[unit.lower()])


def parse_duration(text: str) -> float:
    """``10m`` -> 600.0 seconds, ``1h`` -> 3600.0, ``30`` -> 30.0 (bare numbers are seconds)."""
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(f"expected a duration such as 30, 500ms, 10s, 10m or 1h, got {text!r}")
    number, unit = match.groups()
    return float(number) * _DURATION_FACTORS[unit.lower() if unit else None]


def split_list(text: str, separator: str = ",") -> list[str]:
    """A comma list as Fluent Bit reads it: items stripped, empty items dropped."""
    return [item.strip() for item in text.split(separator) if item.strip()]
