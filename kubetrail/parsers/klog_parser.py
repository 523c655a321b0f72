"""The ``klog`` parser: the text format of Kubernetes components (kube-apiserver, kubelet, ...).

A line is ``Lmmdd hh:mm:ss.uuuuuu threadid file:line] msg``, where ``L`` is the severity
(I, W, E, F). Since structured logging, ``msg`` is a Go-quoted string followed by
``key="value"`` / ``key=value`` pairs; older lines are free text. The record is
``{"severity", "thread", "source", "msg", ...pairs}``; pair values keep their text (a klog line
does not say whether ``42`` was a number or a string), quoted values are unquoted.

The header has no year: the current year is used, or last year when that would put the line
more than a day in the future (a December line read in January).
"""

from __future__ import annotations

import calendar
import re
import time
from typing import Any

import orjson

from kubetrail.core.record import Record
from kubetrail.parsers.base import Parsed, Parser, unparsed_record, wall_ns

SEVERITIES = {"I": "info", "W": "warning", "E": "error", "F": "fatal"}
_HEADER = re.compile(r"^([IWEF])(\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{1,9}) +(\d+) ([^ \]]+)\] ?(.*)$", re.DOTALL)
# key=value where value is a Go-quoted string or runs to the next space.
_PAIR = re.compile(r'([A-Za-z_][\w.\-/]*)=("(?:[^"\\]|\\.)*"|\S*)')
_QUOTED = re.compile(r'^"((?:[^"\\]|\\.)*)"')


def _unquote(text: str) -> str:
    """Go's %q is JSON-compatible for what klog writes (\\", \\\\, \\n, \\t, \\uXXXX)."""
    try:
        value = orjson.loads(text)
        return value if isinstance(value, str) else text
    except orjson.JSONDecodeError:
        return text[1:-1]


def split_pairs(text: str, body: dict[str, Any]) -> None:
    """``key="value" key2=value2`` -> ``body``; text that is not pairs is left out."""
    for match in _PAIR.finditer(text):
        value = match.group(2)
        body[match.group(1)] = _unquote(value) if value.startswith('"') else value


class KlogParser(Parser):
    def __init__(self, name: str = "klog", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)

    def _year(self, month: int, day: int) -> int:
        now = time.time()
        year = time.gmtime(now).tm_year
        if calendar.timegm((year, month, day, 0, 0, 0)) > now + 86400:
            year -= 1
        return year

    def parse_lines(self, lines: list[bytes], tag: str) -> tuple[list[Record], int]:
        now = wall_ns()
        records: list[Record] = []
        failed = 0
        for line in lines:
            body = self.parse_text(line.decode("utf-8", "replace"))
            if body is None:
                failed += 1
                records.append(unparsed_record(tag, line, now))
                continue
            time_ns = body.pop("_time_ns", now)
            records.append(Record(tag, time_ns, body))
        return records, failed

    def parse_value(self, text: str) -> Parsed | None:
        body = self.parse_text(text)
        if body is None:
            return None
        return body, body.pop("_time_ns")

    def parse_text(self, text: str) -> dict[str, Any] | None:
        """One klog line -> a body (with ``_time_ns``), or ``None`` when it is not klog."""
        match = _HEADER.match(text.rstrip("\n"))
        if match is None:
            return None
        sev, mon, day, hh, mm, ss, frac, thread, source, rest = match.groups()
        month, mday = int(mon), int(day)
        if not (1 <= month <= 12 and 1 <= mday <= 31):
            return None
        try:
            seconds = calendar.timegm((self._year(month, mday), month, mday, int(hh), int(mm), int(ss)))
        except (ValueError, OverflowError):
            return None
        body: dict[str, Any] = {"severity": SEVERITIES[sev], "thread": int(thread), "source": source}
        quoted = _QUOTED.match(rest) if rest.startswith('"') else None
        if quoted is not None:
            body["msg"] = _unquote(quoted.group(0))
            split_pairs(rest[quoted.end() :], body)
        else:
            body["msg"] = rest
        body["_time_ns"] = seconds * 1_000_000_000 + int((frac + "000000000")[:9])
        return body
