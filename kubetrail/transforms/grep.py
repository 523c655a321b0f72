"""The ``grep`` filter: keep or drop records by regular expressions on their values.

``logical_op legacy`` (Fluent Bit's default): every ``regex`` must match and no ``exclude`` may
match. ``and`` / ``or`` combine rules of one kind (Fluent Bit forbids mixing kinds with them).
"""

from __future__ import annotations

import re
from typing import Any

from kubetrail.core.accessor import RecordAccessor, value_as_text
from kubetrail.core.component import ComponentContext, Transform
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option, ruby_to_python_regex
from kubetrail.core.record import Record

Rule = tuple[RecordAccessor, re.Pattern[str]]


def _rule(text: str, option: str) -> Rule:
    key, _, pattern = text.strip().partition(" ")
    if not pattern.strip():
        raise ConfigError(f"expected 'KEY REGEX', got {text!r}", key=option)
    try:
        return RecordAccessor(key), re.compile(ruby_to_python_regex(pattern.strip()))
    except (ValueError, re.error) as exc:
        raise ConfigError(f"bad rule {text!r}: {exc}", key=option) from None


class GrepTransform(Transform):
    plugin_name = "grep"
    description = "Keeps or drops records whose values match regular expressions"
    options = (
        Option("regex", multiple=True, help="KEY REGEX: keep records whose KEY matches"),
        Option("exclude", multiple=True, help="KEY REGEX: drop records whose KEY matches"),
        Option("logical_op", "choice", "legacy", choices=("legacy", "and", "or")),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.keep = [_rule(text, "regex") for text in config["regex"]]
        self.drop = [_rule(text, "exclude") for text in config["exclude"]]
        self.op: str = config["logical_op"]
        if not self.keep and not self.drop:
            raise ConfigError("grep needs at least one 'regex' or 'exclude' rule", key="regex")
        if self.op != "legacy" and self.keep and self.drop:
            raise ConfigError(
                "with logical_op and/or, use either 'regex' or 'exclude' rules, not both", key="logical_op"
            )

    @staticmethod
    def _hit(rule: Rule, body: dict[str, Any]) -> bool:
        text = value_as_text(rule[0].get(body))
        return text is not None and rule[1].search(text) is not None

    def _wanted(self, body: dict[str, Any]) -> bool:
        hit = self._hit
        if self.op == "legacy":
            return all(hit(r, body) for r in self.keep) and not any(hit(r, body) for r in self.drop)
        combine = all if self.op == "and" else any
        if self.keep:
            return combine(hit(r, body) for r in self.keep)
        return not combine(hit(r, body) for r in self.drop)

    def process(self, records: list[Record]) -> list[Record]:
        wanted = self._wanted
        return [record for record in records if wanted(record.body)]
