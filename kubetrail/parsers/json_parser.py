"""The ``json`` parser.

Validating a line and pulling out only its time key is done by msgspec decoding into a
one-field struct: it checks the whole document's syntax but builds no Python objects for the
rest of it. The body stays as the original bytes (parsed lazily by :class:`Record`), so a record
no filter touches is written out without ever being turned into a dict.

When the time format is RFC 3339 (``%Y-%m-%dT%H:%M:%S.%L%z``, ``...%LZ``, or no format), msgspec
also parses the time, in C, to microsecond precision; any other value falls back to
:class:`TimeParser` for that line.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import orjson

from kubetrail.core.record import Record
from kubetrail.parsers.base import DeferredBlock, Parsed, Parser, unparsed_record, wall_ns

try:  # optional (built from native/): counts a block's lines ~5x faster than bytes.count
    from kubetrail_native import count_newlines
except ImportError:  # pragma: no cover - depends on the installation

    def count_newlines(block: bytes) -> int:
        return block.count(b"\n")


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

    def parse_block_deferred(self, block: bytes, tag: str) -> DeferredBlock | None:
        if not (self._lazy and self._rfc3339):
            return None
        return _JsonBlock(self._decoder, block, tag, timedelta(seconds=self.time_parser.offset_seconds))

    def parse_block(self, block: bytes, lines: list[bytes], tag: str) -> tuple[list[Record], int, bool]:
        """One C call decodes the whole block; any bad line sends the block to the per-line path."""
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
            body = orjson.loads(line)
        except orjson.JSONDecodeError:
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


class _JsonBlock(DeferredBlock):
    """A block of JSON lines: one C call (msgspec) checks the syntax of all of it and decodes
    each line's time; the records are built only if someone asks for them."""

    __slots__ = ("_decoder", "_now", "_offset", "_shapes", "block", "count", "tag")

    def __init__(self, decoder: msgspec.json.Decoder[Any], block: bytes, tag: str, offset: timedelta) -> None:
        self._decoder = decoder
        self.block = block
        self.tag = tag
        self.count = count_newlines(block)
        self._offset = offset
        self._now = wall_ns()  # the time of a line without one: when it was read
        self._shapes: list[Any] | bool | None = None  # False: checked, and not valid

    def check(self) -> bool:
        if self._shapes is None:
            try:
                shapes = self._decoder.decode_lines(self.block)
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                shapes = None
            # Fewer documents than lines: blank lines, which the line-by-line path skips.
            self._shapes = shapes if shapes is not None and len(shapes) == self.count else False
        return self._shapes is not False

    def materialize(self) -> list[Record]:
        if not self.check():
            raise ValueError("the block did not pass its check; it is parsed line by line")
        shapes = self._shapes
        assert isinstance(shapes, list)
        now, offset, tag = self._now, self._offset, self.tag
        records: list[Record] = []
        append = records.append
        for shape, line in zip(shapes, self.block.split(b"\n")):  # noqa: B905 - split has one extra b""
            value = shape.t
            if value is None:
                time_ns = now
            else:
                if value.tzinfo is None:  # no zone written: UTC shifted by time_offset
                    value = value.replace(tzinfo=UTC) - offset
                time_ns = round(value.timestamp() * 1_000_000) * 1000
            append(Record(tag, time_ns, None, line))
        return records
