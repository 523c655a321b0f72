"""The ``logfmt`` parser: ``key=value key2="quoted value" bare_key`` lines.

Fluent Bit's grammar (``flb_parser_logfmt.c``, after brandur.org/logfmt): a key is a run of
characters above the space other than ``=`` and ``"``; anything else between pairs is skipped;
a value is such a run or a double-quoted string with backslash escapes. A bare ``key`` and an
empty ``key=`` are ``true``, ``key=""`` is the empty string; with ``logfmt_no_bare_keys on`` a
line with a bare key is not logfmt. Parsing stops at the first line break; a line with no key at
all does not match. The time is read from ``time_key`` (``time`` when only ``time_format`` is
given, as in Fluent Bit), and a time that does not match ``time_format`` makes the line not
match, as Fluent Bit returns an error for it. Values are strings unless ``types`` says otherwise.
"""

from __future__ import annotations

import re
from typing import Any

from kubetrail.core.record import Record
from kubetrail.parsers.base import Parsed, Parser, unparsed_record, wall_ns
from kubetrail.parsers.decoders import unescape_utf8

# key, then optionally "=" and a quoted value (group 2, unterminated runs to the end) or a bare
# value (group 3, possibly empty).
_PAIR = re.compile(r'([^\x00-\x20"=]+)(?:(=)(?:"((?:[^"\\]|\\.)*\\?)"?|([^\x00-\x20"=]*)))?', re.DOTALL)
_LINE_END = re.compile(r"[\r\n]")


class LogfmtParser(Parser):
    def __init__(self, name: str, no_bare_keys: bool = False, **kwargs: Any) -> None:
        if kwargs.get("time_format") and not kwargs.get("time_key"):
            kwargs["time_key"] = "time"
        super().__init__(name, **kwargs)
        self.no_bare_keys = no_bare_keys

    def parse_value(self, text: str) -> Parsed | None:
        end = _LINE_END.search(text)
        if end is not None:
            text = text[: end.start()]
        body: dict[str, Any] = {}
        for match in _PAIR.finditer(text):
            key, equals, quoted, bare = match.groups()
            if equals is None:
                if self.no_bare_keys:
                    return None
                body[key] = True
            elif quoted is not None:
                body[key] = unescape_utf8(quoted, quotes=True) if "\\" in quoted else quoted
            else:
                body[key] = bare if bare else True
        if not body:
            return None
        return self.finish_or_refuse(body)

    def finish_or_refuse(self, body: dict[str, Any]) -> Parsed | None:
        """The body with decoders, types and time applied; ``None`` when ``time_format`` is set
        and the time does not match it (Fluent Bit fails the whole line then)."""
        time_value = body.get(self.time_key) if self.time_key else None
        if not isinstance(time_value, str) or not time_value:
            # Fluent Bit reads the time only from a non-empty value; a bare key stays a key.
            return body, self.finish(body, with_time=False)[0]
        time_ns, ok = self.finish(body)
        if not ok and self.time_parser.fmt:
            return None
        return body, time_ns

    def parse_lines(self, lines: list[bytes], tag: str) -> tuple[list[Record], int]:
        return parse_lines_with(self, lines, tag)


def parse_lines_with(parser: Parser, lines: list[bytes], tag: str) -> tuple[list[Record], int]:
    """Line by line through ``parser.parse_value``; a line that does not match is kept under
    ``log`` and counted."""
    now = wall_ns()
    records: list[Record] = []
    failed = 0
    for line in lines:
        parsed = parser.parse_value(line.decode("utf-8", "replace"))
        if parsed is None:
            failed += 1
            records.append(unparsed_record(tag, line, now))
            continue
        body, time_ns = parsed
        records.append(Record(tag, now if time_ns is None else time_ns, body))
    return records, failed
