"""Formatting record timestamps the ways Fluent Bit's outputs offer (``json_date_format``)."""

from __future__ import annotations

import time

DATE_FORMATS = ("double", "epoch", "epoch_ms", "iso8601", "java_sql_timestamp")


def format_date(time_ns: int, fmt: str) -> float | int | str:
    if fmt == "double":
        return time_ns / 1e9
    if fmt == "epoch":
        return time_ns // 1_000_000_000
    if fmt == "epoch_ms":
        return time_ns // 1_000_000
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    micros = nanos // 1000
    if fmt == "iso8601":
        return f"{base}.{micros:06d}Z"
    if fmt == "java_sql_timestamp":
        return f"{base.replace('T', ' ')}.{micros:06d}"
    raise ValueError(f"unknown date format {fmt!r}; allowed: {', '.join(DATE_FORMATS)}")


def epoch_text(time_ns: int) -> str:
    """``1700000000.123456789``, the way Fluent Bit prints event time."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    return f"{seconds}.{nanos:09d}"
