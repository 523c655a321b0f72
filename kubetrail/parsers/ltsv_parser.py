"""The ``ltsv`` parser (Labeled Tab-separated Values, ltsv.org): ``label:value<TAB>label:value``.

As Fluent Bit's ``flb_parser_ltsv.c``: a label is ``[0-9A-Za-z_.-]+`` followed by ``:``; the
value runs to the next tab or line break (so it may hold spaces and colons). Reading stops at
the first label that is not followed by ``:`` (what was read so far is the record) and at the
first line break; a line without any field does not match. ``tskv`` is the same with ``=``
between label and value and an optional leading ``tskv<TAB>``. Time and ``types`` as for logfmt:
``time_key`` (``time`` when only ``time_format`` is given), a time that does not match
``time_format`` makes the line not match.
"""

from __future__ import annotations

import re
from typing import Any

from kubetrail.core.record import Record
from kubetrail.parsers.base import Parsed
from kubetrail.parsers.logfmt_parser import LogfmtParser, parse_lines_with

_LINE_END = re.compile(r"[\r\n]")


class LtsvParser(LogfmtParser):
    """Shares logfmt's time handling; only the splitting differs."""

    def __init__(self, name: str, separator: str = ":", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.separator = separator
        self._field = re.compile(r"([0-9A-Za-z_.\-]*)" + re.escape(separator) + r"([^\x00\t\n\r]*)\t?")

    def parse_value(self, text: str) -> Parsed | None:
        if self.separator == "=" and text.startswith("tskv\t"):
            text = text[5:]
        end = _LINE_END.search(text)
        if end is not None:
            text = text[: end.start()]
        body: dict[str, Any] = {}
        position = 0
        match_at = self._field.match
        while position < len(text):
            match = match_at(text, position)
            if match is None:
                break  # a label not followed by the separator ends the record
            label, value = match.groups()
            if label:  # ":value" without a label is skipped, as in Fluent Bit
                body[label] = value
            position = match.end()
        if not body:
            return None
        return self.finish_or_refuse(body)

    def parse_lines(self, lines: list[bytes], tag: str) -> tuple[list[Record], int]:
        return parse_lines_with(self, lines, tag)
