"""The ``logr`` parser: the JSON format of Kubernetes components (``--logging-format=json``).

A line is ``{"ts": 1580306777.04728, "v": 0, "msg": "...", "caller": "...", ...}`` (zap
through logr). ``ts`` is seconds since the epoch as a float (older builds wrote milliseconds,
told apart by size; newer ones may write RFC 3339 text). The record is the document as it is;
the time comes from ``ts``, which is kept, as Fluent Bit keeps ``time_key`` with ``time_keep on``.
"""

from __future__ import annotations

from typing import Any

import orjson

from kubetrail.core.record import Record
from kubetrail.parsers.base import Parsed, Parser, unparsed_record, wall_ns
from kubetrail.parsers.timefmt import TimeParser

_RFC3339 = TimeParser()


def logr_time_ns(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = value / 1000 if value > 1e11 else value  # milliseconds in some builds
        return int(seconds * 1_000_000) * 1000
    if isinstance(value, str):
        try:
            return _RFC3339.parse_ns(value)
        except (ValueError, TypeError):
            return None
    return None


class LogrParser(Parser):
    def __init__(self, name: str = "logr", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)

    def parse_lines(self, lines: list[bytes], tag: str) -> tuple[list[Record], int]:
        now = wall_ns()
        records: list[Record] = []
        failed = 0
        for line in lines:
            body = self.parse_text(line)
            if body is None:
                failed += 1
                records.append(unparsed_record(tag, line, now))
                continue
            ts = logr_time_ns(body.get("ts"))
            records.append(Record(tag, now if ts is None else ts, body, line if ts is not None else None))
        return records, failed

    def parse_value(self, text: str) -> Parsed | None:
        body = self.parse_text(text)
        if body is None:
            return None
        return body, logr_time_ns(body.get("ts"))

    def parse_text(self, text: str | bytes) -> dict[str, Any] | None:
        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(body, dict) or "msg" not in body:
            return None
        return body
