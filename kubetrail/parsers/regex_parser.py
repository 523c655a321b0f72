"""The ``regex`` parser: named groups become keys (Onigmo ``(?<name>)`` syntax accepted).

A tailed block goes to :class:`_RegexBlock` (see :mod:`kubetrail.core.block`) when the native
module is built and the pattern compiles with Rust's ``regex`` crate (no look-around or
back-references; otherwise Python's ``re`` does it all): ``kubetrail_native.RegexLinesScanner``
matches every line and writes the groups as JSON lines, with each line's time from the format
compiled once, so no dict, string or record is made per line unless a filter asks for records.
A line that does not match sends the block to the line-by-line path below, which keeps it under
``log``; ``types`` and ``decode_field`` change values, so those parsers stay on that path.
"""

from __future__ import annotations

import re
from typing import Any

from kubetrail.core.block import LineBlock
from kubetrail.core.options import ruby_to_python_regex
from kubetrail.core.record import Record
from kubetrail.parsers.base import Parsed, Parser, ScannedLineBlock, unparsed_record, wall_ns

try:  # optional (built from native/): a block matched and written as JSON lines in one call
    from kubetrail_native import RegexLinesScanner, count_newlines
except ImportError:  # pragma: no cover - depends on the installation
    RegexLinesScanner = None

    def count_newlines(block: bytes) -> int:
        return block.count(b"\n")


class RegexParser(Parser):
    def __init__(self, name: str, regex: str, skip_empty_values: bool = True, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.regex = re.compile(ruby_to_python_regex(regex))
        if not self.regex.groupindex:
            raise ValueError("regex has no named groups (?<name>...), so it would produce empty records")
        self.skip_empty_values = skip_empty_values
        self._scanner: Any = None
        if RegexLinesScanner is not None and not self.types and self.decoders is None:
            try:
                self._scanner = RegexLinesScanner(
                    self.regex.pattern,
                    self.time_key,
                    not self.time_keep,
                    self.time_parser.fmt,
                    self.time_parser.offset_seconds,
                    skip_empty_values,
                )
            except ValueError:  # a pattern Rust's regex does not take: Python's re does it all
                self._scanner = None

    def line_block(self, block: bytes, tag: str) -> LineBlock | None:
        if self._scanner is None or b"\r" in block:  # CRLF lines are cut on the line path
            return None
        return _RegexBlock(self, block, tag)

    def _groups(self, match: re.Match[str]) -> dict[str, Any]:
        body = match.groupdict()
        if self.skip_empty_values:
            return {k: v for k, v in body.items() if v}
        return {k: ("" if v is None else v) for k, v in body.items()}

    def parse_value(self, text: str) -> Parsed | None:
        match = self.regex.search(text)
        if match is None:
            return None
        body = self._groups(match)
        time_ns, _ok = self.finish(body)
        return body, time_ns

    def parse_lines(self, lines: list[bytes], tag: str) -> tuple[list[Record], int]:
        now = wall_ns()
        records: list[Record] = []
        failed = 0
        search = self.regex.search
        for line in lines:
            text = line.decode("utf-8", "replace")
            match = search(text)
            if match is None:
                failed += 1
                records.append(unparsed_record(tag, line, now))
                continue
            body = self._groups(match)
            time_ns, _ok = self.parse_body(body, now)
            records.append(Record(tag, time_ns, body))
        return records, failed


def _as_is(text: Any) -> Any:
    return text


class _RegexBlock(ScannedLineBlock["RegexParser"]):
    """A block matched natively into JSON lines (see the module docstring)."""

    __slots__ = ()

    def __init__(self, parser: RegexParser, block: bytes, tag: str) -> None:
        super().__init__(parser, block, count_newlines(block), tag)
        self.rewrites = True  # the lines become JSON: nobody may take the text as records

    def validate(self) -> bytes | None:
        scanned = self._parser._scanner.scan(self.source, self._now)
        if scanned is None:
            return None  # a line that does not match: the line-by-line path keeps it as log
        return self.take_times(scanned[0], scanned[1], scanned[2], _as_is)  # slow: the group's text
