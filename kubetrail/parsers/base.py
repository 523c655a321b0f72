"""What every parser does: lines in, records out; unparsable lines kept under ``log``."""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from kubetrail.core.block import LineBlock, valid_utf8
from kubetrail.core.record import Record
from kubetrail.parsers.decoders import FieldDecoders
from kubetrail.parsers.timefmt import TimeParser

_CONVERTERS: dict[str, Any] = {
    "string": str,
    "integer": int,
    "float": float,
    "bool": lambda v: str(v).strip().lower() in ("true", "on", "yes", "1"),
    "hex": lambda v: int(v, 16),
}

# What :meth:`Parser.parse_value` returns: the body, and the time it carried (None: no time).
Parsed = tuple[dict[str, Any], int | None]


class Parser:
    """Base for parsers. ``parse_lines`` returns the records and how many lines failed."""

    def __init__(
        self,
        name: str,
        time_key: str | None = None,
        time_format: str | None = None,
        time_keep: bool = False,
        time_offset: int = 0,
        types: dict[str, str] | None = None,
        decoders: FieldDecoders | None = None,
    ) -> None:
        self.name = name
        self.decoders = decoders if decoders else None
        self.time_key = time_key
        self.time_keep = time_keep
        self.time_parser = TimeParser(time_format, time_offset)
        self.types = types or {}
        # Times not in time_format since the source last took this count (the record keeps
        # its time key and gets the time of reading, as in Fluent Bit).
        self.bad_times = 0
        # Lines with invalid UTF-8, repaired with U+FFFD (kubetrail_tail_bad_input_total's
        # ``invalid_utf8``), since the source last took this count.
        self.bad_utf8 = 0
        for key, kind in self.types.items():
            if kind not in _CONVERTERS:
                raise ValueError(f"type of {key!r} must be one of {', '.join(_CONVERTERS)}, not {kind!r}")

    def parse_lines(self, lines: list[bytes], tag: str) -> tuple[list[Record], int]:
        raise NotImplementedError

    def line_block(self, block: bytes, tag: str) -> LineBlock | None:
        """A lazy block of these newline-terminated lines (no blank one), validated and parsed
        only when someone needs it (see :mod:`kubetrail.core.block`), or ``None`` when this
        parser cannot (the caller then parses line by line)."""
        return None

    def parse_block(self, block: bytes, lines: list[bytes], tag: str) -> tuple[list[Record], int, bool]:
        """Parse ``lines`` whose newline-joined bytes are ``block``; the flag says whether every
        record kept its original bytes unchanged (so ``block`` may be written out as it is)."""
        records, failed = self.parse_lines(lines, tag)
        return records, failed, False

    def parse_value(self, text: str) -> Parsed | None:
        """One value (the ``parser`` filter's ``key_name``): the body and the time it carried, or
        ``None`` when this parser does not match it."""
        raise NotImplementedError

    def parse_body(self, body: dict[str, Any], now_ns: int) -> tuple[int, bool]:
        """Run the field decoders, apply ``types`` and take the time out of ``time_key``;
        returns (time_ns, ok)."""
        time_ns, ok = self.finish(body)
        return (now_ns if time_ns is None else time_ns), ok

    def finish(self, body: dict[str, Any], with_time: bool = True) -> tuple[int | None, bool]:
        """:meth:`parse_body` without a default time: (the time or None, ok). ``with_time``
        False leaves ``time_key`` alone."""
        if self.decoders is not None:
            self.decoders.apply(body)
        for key, kind in self.types.items():
            if key in body:
                try:
                    body[key] = _CONVERTERS[kind](body[key])
                except (TypeError, ValueError):
                    pass  # Fluent Bit keeps the original value when a conversion fails
        if not with_time or self.time_key is None or self.time_key not in body:
            return None, True
        value = body[self.time_key]
        try:
            time_ns = self.time_parser.parse_ns(value)
        except (ValueError, TypeError, AttributeError):
            self.bad_times += 1  # the source counts them (kubetrail_tail_bad_input_total)
            return None, False
        if not self.time_keep:
            del body[self.time_key]
        return time_ns, True


def repaired_utf8(parser: Parser, line: bytes) -> bytes:
    """``line``, or its text with each invalid UTF-8 sequence replaced by U+FFFD (counted on
    ``parser``): the record keeps its fields, and no sink meets bytes that are not text."""
    if valid_utf8(line):
        return line
    parser.bad_utf8 += 1
    return line.decode("utf-8", "replace").encode()


def unparsed_record(tag: str, line: bytes, now_ns: int, key: str = "log") -> Record:
    """Fluent Bit passes a line its parser rejects on under the ``log`` key."""
    return Record(tag, now_ns, {key: line.decode("utf-8", "replace")})


def wall_ns() -> int:
    return time.time_ns()


P = TypeVar("P", bound=Parser)


class ScannedLineBlock(LineBlock, Generic[P]):
    """A block a native scanner turns into final JSON lines with each line's time: what the
    ``json`` parser (any ``time_format``) and the ``regex`` parser share once their scanner has
    run, so the rule lives once. The times the scan could not take itself come back as
    ``(line index, value)`` and are parsed here with the parser's ``time_format``; one that does
    not parse keeps the time of reading and is reported as ``bad_time`` (the record stays, as in
    Fluent Bit). Under ``time_keep off`` such a line's time key must go, which only the
    line-by-line path does: the block then gives up (None)."""

    __slots__ = ("_now", "_parser", "tag")

    def __init__(self, parser: P, block: bytes, count: int, tag: str) -> None:
        super().__init__(block, count)
        self._parser = parser
        self.tag = tag
        self._now = wall_ns()  # the time of a line without one: when it was read

    def take_times(
        self, data: bytes, raw_times: bytes, slow: Iterable[tuple[int, Any]], value_of: Callable[[Any], Any]
    ) -> bytes | None:
        """``data`` with :attr:`times` set from the scan's ``raw_times`` (int64 ns) and ``slow``
        parsed through ``value_of`` (the raw value -> what ``time_format`` reads), or None."""
        times = array("q")
        times.frombytes(raw_times)
        bad = 0
        parse = self._parser.time_parser.parse_ns
        for index, raw in slow:
            try:
                times[index] = parse(value_of(raw))
            except (ValueError, TypeError, AttributeError, OverflowError):
                bad += 1  # kept whole, with the time it was read at
                continue
            if not self._parser.time_keep:
                return None  # the reference took a time the scan did not: its key must go
        if bad and self.report is not None:
            self.report("bad_time", bad)
        self.times = times
        return data

    def build(self, data: bytes) -> list[Record]:
        tag = self.tag
        assert self.times is not None
        return [Record(tag, t, None, line) for t, line in zip(self.times, data.split(b"\n"))]  # noqa: B905
