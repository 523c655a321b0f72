"""The ``modify`` filter: set, add, remove, rename and copy keys, under conditions.

Rules run in the order they are written, each on the result of the one before, as in Fluent
Bit; every ``condition`` must hold for a record to be modified at all.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from kubetrail.core.accessor import RecordAccessor, value_as_text
from kubetrail.core.component import ComponentContext, Transform
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option, ruby_to_python_regex
from kubetrail.core.record import Record

Body = dict[str, Any]
RULES = (
    "set",
    "add",
    "remove",
    "remove_wildcard",
    "remove_regex",
    "rename",
    "hard_rename",
    "copy",
    "hard_copy",
    "move_to_start",
    "move_to_end",
)
CONDITIONS = {
    "key_exists": 1,
    "key_does_not_exist": 1,
    "a_key_matches": 1,
    "no_key_matches": 1,
    "key_value_equals": 2,
    "key_value_does_not_equal": 2,
    "key_value_matches": 2,
    "key_value_does_not_match": 2,
    "matching_keys_have_matching_values": 2,
    "matching_keys_do_not_have_matching_values": 2,
}


def _split(text: str, count: int, what: str) -> list[str]:
    parts = text.strip().split(None, count - 1) if count > 1 else [text.strip()]
    if len(parts) != count or not all(parts):
        raise ConfigError(f"{what} expects {count} argument(s), got {text!r}", key=what)
    return parts


def _regex(text: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(ruby_to_python_regex(text))
    except re.error as exc:
        raise ConfigError(f"bad regular expression {text!r}: {exc}", key=what) from None


def _prefix(prefix: str) -> Callable[[str], bool]:
    return lambda key: key.startswith(prefix)


def _search(pattern: re.Pattern[str]) -> Callable[[str], bool]:
    return lambda key: pattern.search(key) is not None


def _build_rule(name: str, text: str) -> Callable[[Body], None]:
    if name in ("set", "add", "rename", "hard_rename", "copy", "hard_copy"):
        key, value = _split(text, 2, name)
        if name == "set":
            return lambda b: b.__setitem__(key, value)
        if name == "add":
            return lambda b: None if key in b else b.__setitem__(key, value)
        if name in ("rename", "hard_rename"):
            hard = name == "hard_rename"

            def rename(b: Body) -> None:
                if key in b and (hard or value not in b):
                    b[value] = b.pop(key)

            return rename
        hard = name == "hard_copy"
        return lambda b: b.__setitem__(value, b[key]) if key in b and (hard or value not in b) else None
    if name in ("remove", "remove_wildcard", "remove_regex"):
        argument = _split(text, 1, name)[0]
        if name == "remove":
            doomed: Callable[[str], bool] = argument.__eq__
        elif name == "remove_wildcard":
            doomed = argument.rstrip("*").__eq__ if not argument.endswith("*") else _prefix(argument.rstrip("*"))
        else:
            doomed = _search(_regex(argument, name))

        def remove(b: Body) -> None:
            for key in [k for k in b if doomed(k)]:
                del b[key]

        return remove
    if name in ("move_to_start", "move_to_end"):
        pattern = _regex(_split(text, 1, name)[0].replace("*", ".*"), name)
        to_start = name == "move_to_start"

        def move(b: Body) -> None:
            moved = {k: b[k] for k in b if pattern.fullmatch(k)}
            rest = {k: v for k, v in b.items() if k not in moved}
            b.clear()
            b.update({**moved, **rest} if to_start else {**rest, **moved})

        return move
    raise AssertionError(name)


def _build_condition(text: str) -> Callable[[Body], bool]:
    kind, _, args = text.strip().partition(" ")
    kind = kind.lower()
    if kind not in CONDITIONS:
        raise ConfigError(f"unknown condition {kind!r}; allowed: {', '.join(CONDITIONS)}", key="condition")
    parts = _split(args, CONDITIONS[kind], f"condition {kind}")
    if kind in ("a_key_matches", "no_key_matches"):
        pattern = _regex(parts[0], "condition")

        def found(b: Body) -> bool:
            return any(pattern.search(k) for k in b)

        return found if kind == "a_key_matches" else (lambda b: not found(b))
    if kind.startswith("matching_keys"):
        key_re, value_re = _regex(parts[0], "condition"), _regex(parts[1], "condition")
        want = kind == "matching_keys_have_matching_values"

        def matching(b: Body) -> bool:
            values = [value_as_text(v) for k, v in b.items() if key_re.search(k)]
            if not values:
                return False
            ok = all(v is not None and value_re.search(v) for v in values)
            return ok if want else not any(v is not None and value_re.search(v) for v in values)

        return matching
    accessor = RecordAccessor(parts[0])
    if kind == "key_exists":
        return lambda b: accessor.get(b) is not None
    if kind == "key_does_not_exist":
        return lambda b: accessor.get(b) is None
    if kind in ("key_value_equals", "key_value_does_not_equal"):
        expected = parts[1]

        def equal(b: Body) -> bool:
            return value_as_text(accessor.get(b)) == expected

        return equal if kind == "key_value_equals" else (lambda b: accessor.get(b) is not None and not equal(b))
    pattern = _regex(parts[1], "condition")

    def value_matches(b: Body) -> bool:
        text = value_as_text(accessor.get(b))
        return text is not None and pattern.search(text) is not None

    if kind == "key_value_matches":
        return value_matches
    return lambda b: accessor.get(b) is not None and not value_matches(b)


class ModifyTransform(Transform):
    plugin_name = "modify"
    description = "Sets, adds, removes, renames and copies keys, optionally under conditions"
    options = (
        Option("set", multiple=True, help="KEY VALUE: set, replacing any value"),
        Option("add", multiple=True, help="KEY VALUE: set only if KEY is absent"),
        Option("remove", multiple=True, help="KEY"),
        Option("remove_wildcard", multiple=True, help="PREFIX*: remove keys starting with PREFIX"),
        Option("remove_regex", multiple=True, help="REGEX: remove keys matching"),
        Option("rename", multiple=True, help="KEY NEW: rename unless NEW exists"),
        Option("hard_rename", multiple=True, help="KEY NEW: rename, replacing NEW"),
        Option("copy", multiple=True, help="KEY NEW: copy unless NEW exists"),
        Option("hard_copy", multiple=True, help="KEY NEW: copy, replacing NEW"),
        Option("move_to_start", multiple=True, help="WILDCARD: move matching keys first"),
        Option("move_to_end", multiple=True, help="WILDCARD: move matching keys last"),
        Option("condition", multiple=True, help="e.g. 'Key_value_equals level error'; all must hold"),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.rules: list[Callable[[Body], None]] = []
        section = ctx.section
        if section is not None:
            ordered = [(p.name, p.value) for p in section.properties if p.name in RULES]
        else:
            ordered = [(name, text) for name in RULES for text in config.get(name, [])]
        for name, text in ordered:
            self.rules.append(_build_rule(name, text))
        self.conditions = [_build_condition(text) for text in config["condition"]]
        if not self.rules:
            raise ConfigError("modify needs at least one rule (set, add, remove, rename, copy, ...)", key="set")

    def process(self, records: list[Record]) -> list[Record]:
        conditions = self.conditions
        rules = self.rules
        for record in records:
            body = record.body
            if conditions and not all(check(body) for check in conditions):
                continue
            body = record.mutable_body()
            for rule in rules:
                rule(body)
        return records
