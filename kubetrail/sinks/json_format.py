"""JSON encodings of a batch shared by the outputs that offer Fluent Bit's ``format`` json family.

``stdout`` and ``http`` both write ``json`` (one array), ``json_lines`` (one document per line)
and ``json_stream`` (documents back to back), each record optionally with its time under
``json_date_key`` in ``json_date_format``. The encoding lives here once so the two agree byte
for byte; the fast path (an unmodified batch written as the source's own JSON lines) too.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from kubetrail.core.dates import DATE_FORMATS, format_date
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record

JSON_FORMATS = ("json", "json_lines", "json_stream")

JSON_DATE_OPTIONS: tuple[Option, ...] = (
    Option("json_date_key", "str", "date", help="Key for the time in json formats; 'false' to leave it out"),
    Option("json_date_format", "choice", "double", choices=DATE_FORMATS),
)


def date_key_option(value: str | None) -> str | None:
    """``json_date_key`` as written -> the key, or None when the user turned it off."""
    if value is None or value.strip().lower() in ("false", "off", "no", ""):
        return None
    return value


def with_date(record: Record, date_key: str | None, date_format: str) -> bytes:
    """The record as JSON with its time under ``date_key``, reusing the original bytes."""
    raw = record.json_bytes()
    if not date_key:
        return raw
    prefix = orjson.dumps({date_key: format_date(record.time_ns, date_format)})[:-1]
    if raw == b"{}":
        return prefix + b"}"
    return prefix + b"," + raw[1:]


def framed_lines(block: bytes, times: Sequence[int], prefix: bytes, suffix: bytes, first: int | None = None) -> bytes:
    """Each JSON line of ``block`` as ``prefix`` + ``SECONDS.NANOS, `` + line + ``suffix``: Fluent
    Bit's ``tag: [time, record]`` text (the file output's ``out_file``, and stdout's ``msgpack``
    with ``first``, the number of the first record, written before the prefix as ``[N] ``)
    straight from a block and its times, without a record per line."""
    lines = block.split(b"\n")
    lines.pop()  # after the final newline
    if first is None:
        return b"".join(
            [
                b"%s%d.%09d, %s%s" % (prefix, t // 1_000_000_000, t % 1_000_000_000, line, suffix)
                for t, line in zip(times, lines)  # noqa: B905 - one time per line
            ]
        )
    return b"".join(
        [
            b"[%d] %s%d.%09d, %s%s" % (n, prefix, t // 1_000_000_000, t % 1_000_000_000, line, suffix)
            for n, t, line in zip(range(first, first + len(lines)), times, lines)  # noqa: B905
        ]
    )


def encode_batch(batch: Batch, fmt: str, date_key: str | None, date_format: str) -> bytes:
    """``batch`` in one of :data:`JSON_FORMATS` (``json`` ends with a newline, as Fluent Bit's)."""
    if fmt == "json_lines" and date_key is None and batch.raw_block is not None:
        return batch.raw_block  # the source's own validated JSON lines: nothing to re-encode
    records = batch.records
    if fmt == "json":
        return b"[" + b",".join([with_date(r, date_key, date_format) for r in records]) + b"]\n"
    if fmt == "json_lines":
        return b"".join([with_date(r, date_key, date_format) + b"\n" for r in records])
    if fmt == "json_stream":
        return b"".join([with_date(r, date_key, date_format) for r in records])
    raise ValueError(f"unknown JSON format {fmt!r}; allowed: {', '.join(JSON_FORMATS)}")
