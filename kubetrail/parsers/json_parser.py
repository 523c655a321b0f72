"""The ``json`` parser.

Validating a line and pulling out only its time key is done by msgspec decoding into a
one-field struct: it checks the whole document's syntax but builds no Python objects for the
rest of it. The body stays as the original bytes (parsed lazily by :class:`Record`), so a record
no filter touches is written out without ever being turned into a dict.

The tail hands whole blocks to :meth:`JsonParser.line_block` (see :mod:`kubetrail.core.block`):

* RFC 3339 time (``%Y-%m-%dT%H:%M:%S.%L%z``, ``...%LZ``, or no format) kept in the record
  (``time_keep on``, the built-in ``k8s_audit`` and ``docker``), or no ``time_key``: msgspec
  validates the block and parses the times, in C, to microsecond precision;
* any other ``time_format``, or ``time_keep off`` (what Fluent Bit users write): msgspec
  validates the block, then ``kubetrail_native.JsonLinesScanner`` finds each line's top-level
  ``time_key`` (by its quoted text, walking only from the nearer end of the line to confirm it
  is top-level; a key seen twice or maybe spelled with escapes takes a walk of every member),
  parses it with the format compiled once (``native/src/timefmt.rs``) and, with
  ``time_keep off``, cuts the member out of the line's bytes. A time it cannot decide (a
  number, an escape, a text not in the format) goes to :class:`TimeParser`, the reference:
  one that fails there keeps its key and the time of reading, and is counted (``bad_time``),
  as Fluent Bit keeps such a record whole. Only a time that the reference takes but the scan
  does not, under ``time_keep off``, sends the block to the line-by-line path. When a sink asked
  for them (``LineBlock.keep_members``: the native csv/ltsv/template writer), the scan walks
  each line whole and keeps its top-level member spans and whether each container is already
  compact, so that writer does not walk the lines again; walking every byte anyway, it also
  checks each line strictly (``LineMembers.validated``), and msgspec's pass runs only for a
  block it does not vouch for (a float inside a nested value, a surrogate escape, ...).

``types`` and ``decode_field`` change values, so those parsers decode every line (eager).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import orjson

from kubetrail.core.block import LineBlock, valid_utf8
from kubetrail.core.record import Record, decode_json
from kubetrail.parsers.base import Parsed, Parser, ScannedLineBlock, repaired_utf8, unparsed_record, wall_ns

try:  # optional (built from native/): counts a block's lines ~5x faster than bytes.count
    from kubetrail_native import count_newlines
except ImportError:  # pragma: no cover - depends on the installation

    def count_newlines(block: bytes) -> int:
        return block.count(b"\n")


try:  # optional (built from native/): a block's times and time_key cut, without a dict per line
    from kubetrail_native import JsonLinesScanner
except ImportError:  # pragma: no cover - depends on the installation
    JsonLinesScanner = None
try:  # a build whose scan can keep each line's member spans (for the csv/ltsv/template writer)
    from kubetrail_native import LineMembers as _LineMembers  # noqa: F401 - its presence is the test

    _SCAN_KEEPS_MEMBERS = True
except ImportError:  # pragma: no cover - depends on the installation (or an older build)
    _SCAN_KEEPS_MEMBERS = False

_VALID_ONLY = msgspec.json.Decoder(msgspec.defstruct("AnyObject", []))  # checks syntax, builds nothing


RFC3339_FORMATS = frozenset(
    {
        "%Y-%m-%dT%H:%M:%S.%L%z",
        "%Y-%m-%dT%H:%M:%S.%LZ",
        "%Y-%m-%dT%H:%M:%SZ",
        "%Y-%m-%dT%H:%M:%S%z",
        "%Y-%m-%dT%H:%M:%S.%fZ",
        "%Y-%m-%dT%H:%M:%S.%f%z",
    }
)


class JsonParser(Parser):
    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        fmt = kwargs.get("time_format")
        self._rfc3339 = bool(self.time_key) and (fmt is None or fmt in RFC3339_FORMATS)
        time_type: Any = datetime | None if self._rfc3339 else str | float | int | None
        fields: list[tuple[str, Any, Any]] = [("t", time_type, None)] if self.time_key else []
        rename = {"t": self.time_key} if self.time_key else None
        shape = msgspec.defstruct("TimeOnly", fields, rename=rename)
        self._decoder = msgspec.json.Decoder(shape)
        # The lazy path only works when nothing must change in the body.
        self._lazy = (self.time_key is None or self.time_keep) and not self.types and self.decoders is None
        # The native scan takes the time (any format) and cuts time_key when time_keep is off.
        self._scanner: Any = None
        plain = self.time_key and not self.types and self.decoders is None
        if plain and JsonLinesScanner is not None and not (self._lazy and self._rfc3339):
            self._scanner = JsonLinesScanner(self.time_key, not self.time_keep, fmt, self.time_parser.offset_seconds)

    def parse_lines(self, lines: list[bytes], tag: str) -> tuple[list[Record], int]:
        if not self._lazy:
            return self._parse_eager(lines, tag)
        now = wall_ns()
        decode = self._decoder.decode
        records: list[Record] = []
        append = records.append
        failed = 0
        has_time = self.time_key is not None
        rfc3339 = self._rfc3339
        parse_time = self.time_parser.parse_ns
        offset = timedelta(seconds=self.time_parser.offset_seconds)
        for line in lines:
            line = repaired_utf8(self, line)
            try:
                shape = decode(line)
                value = shape.t if has_time else None  # type: ignore[attr-defined]
            except msgspec.ValidationError:
                # Valid JSON whose time is not what the fast path expects (or not an object).
                record = self._parse_one_eager(line, tag, now)
                if record is None:
                    failed += 1
                    record = unparsed_record(tag, line, now)
                else:
                    record.raw = line
                append(record)
                continue
            except (msgspec.DecodeError, RecursionError):  # nested deeper than the decoder goes: not ours
                failed += 1
                append(unparsed_record(tag, line, now))
                continue
            if value is None:
                time_ns = now
            elif rfc3339:
                if value.tzinfo is None:  # no zone written: UTC shifted by time_offset
                    value = value.replace(tzinfo=UTC) - offset
                time_ns = round(value.timestamp() * 1_000_000) * 1000
            else:
                try:
                    time_ns = parse_time(value)
                except ValueError:
                    time_ns = now
            append(Record(tag, time_ns, None, line))
        return records, failed

    def line_block(self, block: bytes, tag: str) -> LineBlock | None:
        if self._scanner is not None:
            return _ScannedBlock(self, block, tag)
        if not (self._lazy and (self._rfc3339 or self.time_key is None)):
            return None
        return _JsonBlock(self._decoder, block, tag, timedelta(seconds=self.time_parser.offset_seconds))

    def parse_block(self, block: bytes, lines: list[bytes], tag: str) -> tuple[list[Record], int, bool]:
        """One C call decodes the whole block; any bad line sends the block to the per-line path."""
        if not valid_utf8(block):  # the line path repairs the lines: the block is not theirs
            records, failed = self.parse_lines(lines, tag)
            return records, failed, False
        if not (self._lazy and self._rfc3339):
            records, failed = self.parse_lines(lines, tag)
            return records, failed, self._lazy and failed == 0 and all(r.raw is not None for r in records)
        try:
            shapes = self._decoder.decode_lines(block)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            shapes = None
        if shapes is not None and len(shapes) == len(lines):
            built: list[Record] = []
            append = built.append
            for shape, line in zip(shapes, lines):  # noqa: B905 - lengths checked above
                value = shape.t  # type: ignore[attr-defined]
                if value is None or value.tzinfo is None:
                    break  # no time, or a zoneless one that needs time_offset: per-line path
                append(Record(tag, round(value.timestamp() * 1_000_000) * 1000, None, line))
            else:
                return built, 0, True
        records, failed = self.parse_lines(lines, tag)
        return records, failed, failed == 0 and all(r.raw is not None for r in records)

    def parse_value(self, text: str) -> Parsed | None:
        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(body, dict):
            return None
        time_ns, _ok = self.finish(body)
        return body, time_ns

    def _parse_one_eager(self, line: bytes, tag: str, now: int) -> Record | None:
        try:
            body = decode_json(repaired_utf8(self, line))  # 1e999 as its text, as a block's record reads it
        except ValueError:
            return None
        if not isinstance(body, dict):
            return None
        time_ns, _ok = self.parse_body(body, now)
        return Record(tag, time_ns, body)

    def _parse_eager(self, lines: list[bytes], tag: str) -> tuple[list[Record], int]:
        now = wall_ns()
        records: list[Record] = []
        failed = 0
        for line in lines:
            record = self._parse_one_eager(line, tag, now)
            if record is None:
                failed += 1
                record = unparsed_record(tag, line, now)
            records.append(record)
        return records, failed


class _JsonBlock(LineBlock):
    """A block of JSON lines: one C call (msgspec) checks the syntax of all of it and decodes
    each line's time; the records are built only if someone asks for them."""

    __slots__ = ("_decoder", "_now", "_offset", "_shapes", "tag")

    def __init__(self, decoder: msgspec.json.Decoder[Any], block: bytes, tag: str, offset: timedelta) -> None:
        super().__init__(block, count_newlines(block))
        self._decoder = decoder
        self.tag = tag
        self._offset = offset
        self._now = wall_ns()  # the time of a line without one: when it was read
        self._shapes: list[Any] = []

    def validate(self) -> bytes | None:
        try:
            shapes = self._decoder.decode_lines(self.source)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return None
        if len(shapes) != self.count or not valid_utf8(self.source):
            return None
        self._shapes = shapes
        return self.source

    def line_times(self) -> list[int]:
        now, offset = self._now, self._offset
        times: list[int] = []
        append = times.append
        for shape in self._shapes:
            value = getattr(shape, "t", None)
            if value is None:
                append(now)
                continue
            if value.tzinfo is None:  # no zone written: UTC shifted by time_offset
                value = value.replace(tzinfo=UTC) - offset
            append(round(value.timestamp() * 1_000_000) * 1000)
        return times

    def build(self, data: bytes) -> list[Record]:
        tag = self.tag
        return [Record(tag, t, None, line) for t, line in zip(self.line_times(), data.split(b"\n"))]  # noqa: B905


class _ScannedBlock(ScannedLineBlock["JsonParser"]):
    """A block whose times the native scan takes (any ``time_format``), with ``time_key`` cut
    out of the bytes under ``time_keep off`` (see the module docstring)."""

    __slots__ = ()

    def __init__(self, parser: JsonParser, block: bytes, tag: str) -> None:
        super().__init__(parser, block, count_newlines(block), tag)
        self.rewrites = not parser.time_keep

    def validate(self) -> bytes | None:
        scanner = self._parser._scanner
        if self.keep_members and _SCAN_KEEPS_MEMBERS:
            # A sink asked for the members: the scan walks every line whole, and checks each
            # strictly as it goes; msgspec's pass is left for a block it does not vouch for.
            scanned = scanner.scan(self.source, self._now, members=True)
            if scanned is None:
                return None  # not an object, or a repeated or escaped time_key: line by line
            if not getattr(scanned[3], "validated", False) and not self._valid_json():
                return None
        else:
            if not self._valid_json():
                return None
            scanned = scanner.scan(self.source, self._now)
            if scanned is None:
                return None  # a repeated or escaped time_key: the reference decoder decides
        data = self.take_times(scanned[0], scanned[1], scanned[2], orjson.loads)  # slow: the raw JSON value
        self.members = scanned[3] if data is not None and len(scanned) > 3 else None
        return data

    def _valid_json(self) -> bool:
        """Whether every line is a JSON object (msgspec, strict) in UTF-8 (see valid_utf8)."""
        try:
            if len(_VALID_ONLY.decode_lines(self.source)) != self.count:
                return False
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return False  # a line that is not a JSON object: the line-by-line path keeps it as log
        return valid_utf8(self.source)
