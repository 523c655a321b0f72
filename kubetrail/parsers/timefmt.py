"""Fluent Bit time formats (``strptime`` plus ``%L`` for fractional seconds) parsed fast.

``datetime.strptime`` costs microseconds per call and knows nothing of ``%L``. A format is
compiled once into a regular expression; the fraction is cut out of the matched text and the
remaining "whole second" text is looked up in a small cache, because consecutive records almost
always share the same second. With no format, RFC 3339 / ISO 8601 and epoch numbers are accepted.
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, datetime, timedelta

_MONTHS = {
    m.lower(): i
    for i, m in enumerate(("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"))
    if m
}
_MONTHS_LONG = {
    m.lower(): i
    for i, m in enumerate(
        (
            "",
            "January",
            "February",
            "March",
            "April",
            "May",
            "June",
            "July",
            "August",
            "September",
            "October",
            "November",
            "December",
        )
    )
    if m
}

_DIRECTIVES = {
    "Y": r"(?P<Y>\d{4})",
    "y": r"(?P<y>\d{2})",
    "m": r"(?P<m>\d{1,2})",
    "d": r"(?P<d>\d{1,2})",
    "e": r"\s?(?P<d>\d{1,2})",
    "H": r"(?P<H>\d{1,2})",
    "k": r"\s?(?P<H>\d{1,2})",
    "I": r"(?P<I>\d{1,2})",
    "M": r"(?P<M>\d{1,2})",
    "S": r"(?P<S>\d{1,2})",
    "L": r"(?P<L>\d+)",
    "f": r"(?P<L>\d+)",
    "N": r"(?P<L>\d+)",
    "z": r"(?P<z>Z|[+-]\d{2}:?\d{2})",
    "Z": r"(?P<Z>[A-Za-z]{1,5})",
    "b": r"(?P<b>[A-Za-z]{3})",
    "h": r"(?P<b>[A-Za-z]{3})",
    "B": r"(?P<B>[A-Za-z]+)",
    "a": r"[A-Za-z]{3}",
    "A": r"[A-Za-z]+",
    "j": r"(?P<j>\d{1,3})",
    "p": r"(?P<p>[AaPp][Mm])",
    "s": r"(?P<s>\d+)",
    "T": r"(?P<H>\d{1,2}):(?P<M>\d{1,2}):(?P<S>\d{1,2})",
    "F": r"(?P<Y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})",
    "%": "%",
}

_CACHE_LIMIT = 4096


class TimeParser:
    """Parses one time format; :meth:`parse_ns` returns nanoseconds since the epoch (UTC)."""

    def __init__(self, fmt: str | None = None, offset_seconds: int = 0) -> None:
        self.fmt = fmt
        self.offset_seconds = offset_seconds
        self._seconds_cache: dict[str, int] = {}
        self._regex = _compile(fmt) if fmt else None
        # Fast path: the text before the fraction and after it, from the last parse. Records
        # arrive in time order, so most share the previous record's second.
        self._last_head = "\x00"
        self._last_tail = ""
        self._last_seconds = 0

    def parse_ns(self, value: str | float | int) -> int:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float):  # a double holds ~microseconds at today's epoch; keep those
                whole = int(value)
                return whole * 1_000_000_000 + round((value - whole) * 1_000_000) * 1000
            return int(value) * 1_000_000_000
        text: str = value  # type: ignore[assignment]  # numbers returned above
        head = self._last_head
        if text.startswith(head):
            digits = text[len(head) : len(text) - len(self._last_tail)] if self._last_tail else text[len(head) :]
            if digits.isdigit() and text.endswith(self._last_tail) and len(digits) <= 9:
                return self._last_seconds * 1_000_000_000 + int(digits.ljust(9, "0"))
        text = text.strip()
        if self._regex is None:
            return self._parse_auto(text)
        # Like strptime, Fluent Bit's time parser stops at the end of the format and ignores what
        # follows (its stock docker parser reads "...%S.%L" from times ending in "Z").
        match = self._regex.fullmatch(text) or self._regex.match(text)
        if match is None:
            raise ValueError(f"time {text!r} does not match format {self.fmt!r}")
        fraction_ns = 0
        key = text
        if "L" in match.re.groupindex and match.group("L") is not None:
            digits = match.group("L")
            fraction_ns = int(digits[:9].ljust(9, "0"))
            start, end = match.span("L")
            key = text[:start] + text[end:]
        seconds = self._seconds_cache.get(key)
        if seconds is None:
            seconds = self._seconds_from_match(match)
            if len(self._seconds_cache) >= _CACHE_LIMIT:
                self._seconds_cache.clear()
            self._seconds_cache[key] = seconds
        if fraction_ns or ("L" in match.re.groupindex and match.group("L") is not None):
            self._remember(text, match.start("L"), match.end("L"), seconds)
        return seconds * 1_000_000_000 + fraction_ns

    def _remember(self, text: str, start: int, end: int, seconds: int) -> None:
        self._last_head = text[:start]
        self._last_tail = text[end:]
        self._last_seconds = seconds

    def _seconds_from_match(self, match: re.Match[str]) -> int:
        groups = match.groupdict()
        if groups.get("s") is not None:
            return int(groups["s"])
        now = datetime.now(UTC)
        if groups.get("Y") is not None:
            year = int(groups["Y"])
        elif groups.get("y") is not None:
            year = 2000 + int(groups["y"])
        else:
            year = now.year  # syslog-style formats carry no year
        month = 1
        if groups.get("m") is not None:
            month = int(groups["m"])
        elif groups.get("b") is not None:
            month = _month(groups["b"], _MONTHS)
        elif groups.get("B") is not None:
            month = _month(groups["B"], _MONTHS_LONG)
        day = int(groups["d"]) if groups.get("d") is not None else 1
        hour = int(groups.get("H") or groups.get("I") or 0)
        if groups.get("p") is not None and groups.get("I") is not None:
            hour = hour % 12 + (12 if groups["p"].lower() == "pm" else 0)
        minute = int(groups.get("M") or 0)
        second = int(groups.get("S") or 0)
        if groups.get("j") is not None:
            base = calendar.timegm((year, 1, 1, hour, minute, second))
            seconds = base + (int(groups["j"]) - 1) * 86400
        else:
            if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second <= 60):
                raise ValueError(f"time {match.group(0)!r} is out of range")
            seconds = calendar.timegm((year, month, day, hour, minute, second))
        zone = groups.get("z")
        if zone is not None:
            seconds -= _zone_offset(zone)
        else:
            seconds -= self.offset_seconds
        return seconds

    def _parse_auto(self, text: str) -> int:
        """RFC 3339 / ISO 8601 (any fraction length) or a number of epoch seconds."""
        epoch = _EPOCH.fullmatch(text)
        if epoch is not None:  # exact digits, no float rounding
            fraction = epoch.group(2) or ""
            return int(epoch.group(1)) * 1_000_000_000 + int(fraction[:9].ljust(9, "0"))
        match = _RFC3339.fullmatch(text)
        if match is None:
            try:
                parsed = datetime.fromisoformat(text)
            except ValueError:
                raise ValueError(f"time {text!r} is not RFC 3339, ISO 8601 or epoch seconds") from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC) - timedelta(seconds=self.offset_seconds)
            return int(parsed.timestamp()) * 1_000_000_000 + parsed.microsecond * 1000
        key = match.group("base") + (match.group("z") or "")
        seconds = self._seconds_cache.get(key)
        if seconds is None:
            base = datetime.fromisoformat(match.group("base").replace(" ", "T"))
            seconds = calendar.timegm(base.timetuple())
            zone = match.group("z")
            seconds -= _zone_offset(zone) if zone else self.offset_seconds
            if len(self._seconds_cache) >= _CACHE_LIMIT:
                self._seconds_cache.clear()
            self._seconds_cache[key] = seconds
        if match.group("frac"):
            self._remember(text, match.start("frac"), match.end("frac"), seconds)
        digits = match.group("frac")
        fraction_ns = int(digits[:9].ljust(9, "0")) if digits else 0
        return seconds * 1_000_000_000 + fraction_ns


_EPOCH = re.compile(r"(\d+)(?:\.(\d+))?")
_RFC3339 = re.compile(
    r"(?P<base>\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d+))?(?P<z>[Zz]|[+-]\d{2}:?\d{2})?"
)


def _month(name: str, table: dict[str, int]) -> int:
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"unknown month name {name!r}") from None


def _zone_offset(zone: str) -> int:
    if zone in ("Z", "z"):
        return 0
    sign = -1 if zone[0] == "-" else 1
    digits = zone[1:].replace(":", "")
    return sign * (int(digits[:2]) * 3600 + int(digits[2:4]) * 60)


def parse_time_offset(text: str) -> int:
    """Fluent Bit's ``time_offset`` (``+0200``, ``-05:00``) in seconds."""
    text = text.strip()
    if not re.fullmatch(r"[+-]\d{2}:?\d{2}", text):
        raise ValueError(f"expected an offset such as +0200 or -05:00, got {text!r}")
    return _zone_offset(text)


def _compile(fmt: str) -> re.Pattern[str]:
    parts: list[str] = []
    seen: set[str] = set()
    i = 0
    while i < len(fmt):
        char = fmt[i]
        if char in ".," and fmt[i + 1 : i + 3] == "%L" and "L" not in seen:
            # A whole-second time (no fraction at all) still matches "...%S.%L".
            parts.append(rf"(?:{re.escape(char)}(?P<L>\d+))?")
            seen.add("L")
            i += 3
            continue
        if char == "%" and i + 1 < len(fmt):
            directive = fmt[i + 1]
            if directive not in _DIRECTIVES:
                raise ValueError(f"unsupported time format directive %{directive} in {fmt!r}")
            pattern = _DIRECTIVES[directive]
            # A group name may appear once in a Python regex; repeats match without capturing.
            for name in re.findall(r"\?P<(\w+)>", pattern):
                if name in seen:
                    pattern = pattern.replace(f"(?P<{name}>", "(?:")
                seen.add(name)
            parts.append(pattern)
            i += 2
            continue
        parts.append(r"\s+" if char == " " else re.escape(char))
        i += 1
    return re.compile("".join(parts))
