"""The ``regex`` parser: named groups become keys (Onigmo ``(?<name>)`` syntax accepted)."""

from __future__ import annotations

import re
from typing import Any

from kubetrail.core.options import ruby_to_python_regex
from kubetrail.core.record import Record
from kubetrail.parsers.base import Parsed, Parser, unparsed_record, wall_ns


class RegexParser(Parser):
    def __init__(self, name: str, regex: str, skip_empty_values: bool = True, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.regex = re.compile(ruby_to_python_regex(regex))
        if not self.regex.groupindex:
            raise ValueError("regex has no named groups (?<name>...), so it would produce empty records")
        self.skip_empty_values = skip_empty_values

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
