"""Fluent Bit's processor conditions (YAML ``condition: {op, rules: [{field, op, value}]}``).

Fluent Bit 4.0+ lets a processor act only on records that meet a condition; the others pass it
unchanged. ``op`` is ``and`` (every rule holds) or ``or`` (one does). A rule reads ``field`` with
a record accessor (``$level``, ``$request['method']``) and compares it with ``value`` by ``eq``,
``neq``, ``gt``, ``lt``, ``gte``, ``lte``, ``regex``, ``not_regex``, ``in`` or ``not_in``
(``value`` a list for the last two).

Values keep their YAML types (``value: 200`` is a number, ``"200"`` a string), as in Fluent
Bit: ``eq`` holds for equal values of the same kind, numbers compare as numbers whatever their
type (``200 == 200.0``), and the ordering operators compare numbers only (a text that reads as a
number counts as one). A field the record does not have makes its rule false, whatever the
operator, so ``neq`` and ``not_in`` never select a record for lacking the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubetrail.core.accessor import RecordAccessor, value_as_text
from kubetrail.core.errors import ConfigError, Location
from kubetrail.core.options import ruby_to_python_regex

OPERATORS = ("eq", "neq", "gt", "lt", "gte", "lte", "regex", "not_regex", "in", "not_in")
_MISSING = object()


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _equal(left: Any, right: Any) -> bool:
    if isinstance(left, bool) or isinstance(right, bool):
        return left is right
    if isinstance(left, (int, float)) and isinstance(right, (int, float)):
        return float(left) == float(right)
    return bool(left == right)


@dataclass
class Rule:
    accessor: RecordAccessor
    test: Callable[[Any], bool]

    def holds(self, body: dict[str, Any]) -> bool:
        value = self.accessor.get(body)
        if value is None and not _present(self.accessor, body):
            return False
        return self.test(value)


def _present(accessor: RecordAccessor, body: dict[str, Any]) -> bool:
    """Whether the field exists (a field whose value is null exists)."""
    node: Any = body
    for part in accessor.path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    return True


@dataclass
class Condition:
    op: str
    rules: list[Rule]
    source: dict[str, Any]  # as written, for ``kubetrail convert``

    def holds(self, body: dict[str, Any]) -> bool:
        if self.op == "and":
            return all(rule.holds(body) for rule in self.rules)
        return any(rule.holds(body) for rule in self.rules)


def _test(op: str, value: Any, where: str) -> Callable[[Any], bool]:
    if op in ("regex", "not_regex"):
        try:
            pattern = re.compile(ruby_to_python_regex(str(value)))
        except re.error as exc:
            raise ConfigError(f"{where}: bad regular expression {value!r}: {exc}") from None
        want = op == "regex"
        return lambda v: (value_as_text(v) is not None and pattern.search(value_as_text(v) or "") is not None) == want
    if op in ("in", "not_in"):
        if not isinstance(value, list):
            raise ConfigError(f'{where}: op {op} needs a list value, e.g. ["a", "b"]')
        inside = op == "in"
        return lambda v: any(_equal(v, item) for item in value) == inside
    if op == "eq":
        return lambda v: _equal(v, value)
    if op == "neq":
        return lambda v: not _equal(v, value)
    limit = _number(value)
    if limit is None:
        raise ConfigError(f"{where}: op {op} needs a number, got {value!r}")
    compare: Callable[[float, float], bool] = {
        "gt": lambda a, b: a > b,
        "lt": lambda a, b: a < b,
        "gte": lambda a, b: a >= b,
        "lte": lambda a, b: a <= b,
    }[op]

    def ordered(v: Any) -> bool:
        number = _number(v)
        return number is not None and compare(number, limit)

    return ordered


def parse_condition(data: Any, location: Location) -> Condition:
    """``condition`` as read from YAML (types kept) -> a :class:`Condition`; errors name the line."""
    if not isinstance(data, dict):
        raise ConfigError("a processor's condition is a mapping: {op: and|or, rules: [...]}", location, "condition")
    op = str(data.get("op", "and")).lower()
    if op not in ("and", "or"):
        raise ConfigError(f"condition op must be and or or, got {op!r}", location, "condition")
    unknown = set(data) - {"op", "rules"}
    if unknown:
        raise ConfigError(
            f"unknown key {sorted(unknown)[0]!r} in a condition; allowed: op, rules", location, "condition"
        )
    rules_data = data.get("rules")
    if not isinstance(rules_data, list) or not rules_data:
        raise ConfigError("a condition needs rules: [{field, op, value}, ...]", location, "condition")
    rules = []
    for index, item in enumerate(rules_data, start=1):
        where = f"condition rule {index}"
        if not isinstance(item, dict) or "field" not in item or "op" not in item or "value" not in item:
            raise ConfigError(f"{where} needs field, op and value", location, "condition")
        rule_op = str(item["op"]).lower()
        if rule_op not in OPERATORS:
            raise ConfigError(
                f"{where}: unknown op {item['op']!r}; allowed: {', '.join(OPERATORS)}", location, "condition"
            )
        field = str(item["field"])
        try:
            accessor = RecordAccessor(field if field.startswith("$") else "$" + field)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}", location, "condition") from None
        try:
            test = _test(rule_op, item["value"], where)
        except ConfigError as exc:
            raise ConfigError(exc.message, location, "condition") from None
        rules.append(Rule(accessor, test))
    return Condition(op, rules, data)
