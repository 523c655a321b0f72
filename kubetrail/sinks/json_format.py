"""JSON encodings of a batch shared by the outputs that offer Fluent Bit's ``format`` json family.

``stdout`` and ``http`` both write ``json`` (one array), ``json_lines`` (one document per line)
and ``json_stream`` (documents back to back), each record optionally with its time under
``json_date_key`` in ``json_date_format``. The encoding lives here once so the two agree byte
for byte; the fast path (an unmodified batch written as the source's own JSON lines) too.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any

import orjson

from kubetrail.core.dates import DATE_FORMATS, format_date
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record

try:  # optional (built from native/): Fluent Bit's framings of a block's lines, in one call
    from kubetrail_native import frame_lines as _frame_lines
except ImportError:  # pragma: no cover - depends on the installation
    _frame_lines = None
frame_lines: Any = _frame_lines

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


def times_bytes(times: Sequence[int]) -> bytes:
    return times.tobytes() if isinstance(times, array) else array("q", times).tobytes()


def framed_lines(block: bytes, times: Sequence[int], tag: str, first: int | None = None) -> bytes:
    """Each JSON line of ``block`` as ``TAG: [SECONDS.NANOS, LINE]``: Fluent Bit's text of a
    record (the file output's ``out_file``; stdout's ``msgpack`` with ``first``, the number of
    the first record, as ``[N] `` in front) straight from a block and its times, without a
    record per line (natively when ``kubetrail_native`` is built)."""
    if frame_lines is not None:
        style = 0 if first is None else 1
        framed: bytes | None = frame_lines(block, times_bytes(times), style, tag.encode(), first or 0)
        if framed is not None:
            return framed
    prefix = tag.encode() + b": ["
    lines = block.split(b"\n")
    lines.pop()  # after the final newline
    if first is None:
        return b"".join(
            [
                b"%s%d.%09d, %s]\n" % (prefix, t // 1_000_000_000, t % 1_000_000_000, line)
                for t, line in zip(times, lines)  # noqa: B905 - one time per line
            ]
        )
    return b"".join(
        [
            b"[%d] %s%d.%09d, %s]\n" % (n, prefix, t // 1_000_000_000, t % 1_000_000_000, line)
            for n, t, line in zip(range(first, first + len(lines)), times, lines)  # noqa: B905
        ]
    )


# frame_lines' ``join`` per format: a line each, one array, back to back.
_JOINS = {"json_lines": 0, "json": 1, "json_stream": 2}


def block_framing(fmt: str, date_key: str | None, date_format: str) -> tuple[int, bytes, int] | None:
    """How :func:`frame_lines` / ``write_framed`` write a block in ``fmt``: ``(style, key
    text, join)``; None for a date format they do not write (``iso8601`` and the like)."""
    if date_key is None:
        return 4, b"", _JOINS[fmt]  # the lines as they are
    if date_format not in ("double", "epoch"):
        return None
    key = orjson.dumps(date_key)[1:-1]
    return (2 if date_format == "double" else 3), key, _JOINS[fmt]


def block_frame_args(
    batch: Batch, fmt: str, date_key: str | None, date_format: str
) -> tuple[bytes, bytes, int, bytes, int] | None:
    """``(block, times, style, key text, join)``: how the native framers (``frame_lines``, the
    http output's ``FramedBody``) write ``batch`` in ``fmt`` from its block; None without a
    block or for a date format they do not write."""
    block = batch.raw_block
    if block is None:
        return None
    spec = block_framing(fmt, date_key, date_format)
    if spec is None:
        return None
    style, key, join = spec
    return block, times_bytes(batch.block_times()) if style != 4 else b"", style, key, join


def encode_batch(batch: Batch, fmt: str, date_key: str | None, date_format: str) -> bytes:
    """``batch`` in one of :data:`JSON_FORMATS` (``json`` ends with a newline, as Fluent Bit's).

    A block (see :mod:`kubetrail.core.block`) is framed natively in one pass into one bytes
    object, each line's time put in front where there is a date key: no record, and no
    intermediate copies of a buffer as large as the input."""
    if fmt not in _JOINS:
        raise ValueError(f"unknown JSON format {fmt!r}; allowed: {', '.join(JSON_FORMATS)}")
    block = batch.raw_block
    if block is not None:
        if fmt == "json_lines" and date_key is None:
            return block  # the source's own validated JSON lines: nothing to re-encode
        args = block_frame_args(batch, fmt, date_key, date_format) if frame_lines is not None else None
        if args is not None:
            block, times, style, key, join = args
            framed: bytes | None = frame_lines(block, times, style, key, 0, join)
            if framed is not None:
                return framed
    records = batch.records
    if fmt == "json":
        return b"[" + b",".join([with_date(r, date_key, date_format) for r in records]) + b"]\n"
    if fmt == "json_lines":
        return b"".join([with_date(r, date_key, date_format) + b"\n" for r in records])
    return b"".join([with_date(r, date_key, date_format) for r in records])
