"""Loading Falco rules files: ``rule``, ``macro``, ``list``, ``required_engine_version``,
``required_plugin_versions``, ``append``/``override``, ``exceptions``, ``enabled``.

Files load in order, as Falco loads ``-r`` files: a later file (the user's overrides) changes
what an earlier one (the base rules) defined. Semantics are Falco's:

* defining a rule, macro or list again replaces it; ``append: true`` (or ``override:`` with
  ``append`` per key) adds to it: a condition is appended as text (``old new``, so the
  appended part usually starts with ``and``), list items and exceptions are added; ``override``
  with ``replace`` replaces single keys (``priority``, ``enabled``, ``output``, ...). Appending
  to or overriding something that does not exist is an error.
* a rule item with only ``enabled`` switches an existing rule on or off.
* ``source`` defaults to ``syscall`` as in Falco; rules of sources other than ``k8s_audit`` are
  kept (a later file may change them) but never compiled, and counted.
* ``exceptions``: ``fields`` (a list, with ``comps`` defaulting to ``=`` and each value a tuple
  of the same length; or one field, ``comps`` defaulting to ``in`` and ``values`` a list) add
  ``and not (...)`` to the rule's condition. An exception of an appending rule with a known
  name adds values to it.

Conditions are kept as text until every file is read (appends are textual) and compiled by
:func:`compile_rules`. Every error names the file, the line and the rule, macro or list.
"""

from __future__ import annotations

import dataclasses
import glob
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SOURCE = "k8s_audit"
KINDS = ("rule", "macro", "list", "required_engine_version", "required_plugin_versions")
RULE_KEYS = frozenset(
    {
        "rule",
        "desc",
        "condition",
        "output",
        "priority",
        "source",
        "tags",
        "enabled",
        "exceptions",
        "append",
        "override",
        "warn_evttypes",
        "skip-if-unknown-filter",
        "capture",
        "capture_duration",
    }
)
MACRO_KEYS = frozenset({"macro", "condition", "append", "override", "source", "required_engine_version"})
LIST_KEYS = frozenset({"list", "items", "append", "override"})
RULE_APPENDABLE = frozenset({"condition", "output", "desc", "tags", "exceptions"})
RULE_REPLACEABLE = frozenset(
    {"condition", "output", "desc", "priority", "tags", "exceptions", "enabled", "source", "warn_evttypes"}
)
RULE_REPLACEABLE |= {"skip-if-unknown-filter", "capture", "capture_duration"}

# Falco's priorities, most severe first (syslog numbers); the names its JSON output uses.
PRIORITIES = ("Emergency", "Alert", "Critical", "Error", "Warning", "Notice", "Informational", "Debug")
_PRIORITY_ALIASES = {name.lower(): index for index, name in enumerate(PRIORITIES)} | {"info": 6}


def priority_level(text: Any) -> int:
    """0 (Emergency) to 7 (Debug); ValueError for anything else."""
    level = _PRIORITY_ALIASES.get(str(text).strip().lower())
    if level is None:
        raise ValueError(f"unknown priority {text!r}; allowed: {', '.join(p.lower() for p in PRIORITIES)}")
    return level


@dataclass(frozen=True)
class Origin:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class RulesError(Exception):
    """A rules file problem: names the file, the line and the item."""

    def __init__(self, message: str, origin: Origin | None = None, item: str | None = None) -> None:
        self.message = message
        self.origin = origin
        self.item = item
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.origin}: " if self.origin else ""
        what = f"{self.item}: " if self.item else ""
        return f"{where}{what}{self.message}"


@dataclass
class Text:
    """A condition or output as text, with where each of its parts was written (appends)."""

    text: str
    origin: Origin

    def append(self, more: str, origin: Origin) -> None:
        # Falco joins appended conditions with a space; the origin of the last part is kept for errors.
        self.text = f"{self.text} {more}"
        self.origin = origin


@dataclass
class ListDef:
    name: str
    items: list[str]
    origin: Origin


@dataclass
class MacroDef:
    name: str
    condition: Text
    origin: Origin
    source: str | None = None


@dataclass
class ExceptionDef:
    name: str
    fields: list[str] | str
    comps: list[str] | str
    values: list[Any]
    origin: Origin


@dataclass
class RuleDef:
    name: str
    desc: str
    condition: Text
    output: Text
    priority: int
    source: str
    tags: list[str]
    enabled: bool
    exceptions: list[ExceptionDef]
    origin: Origin
    skip_if_unknown: bool = False


@dataclass
class RuleSet:
    """Everything the files defined, in definition order, before compiling."""

    lists: dict[str, ListDef] = dataclasses.field(default_factory=dict)
    macros: dict[str, MacroDef] = dataclasses.field(default_factory=dict)
    rules: dict[str, RuleDef] = dataclasses.field(default_factory=dict)
    files: list[str] = dataclasses.field(default_factory=list)
    engine_versions: list[Any] = dataclasses.field(default_factory=list)
    plugin_versions: list[Any] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def other_sources(self) -> Counter[str]:
        return Counter(rule.source for rule in self.rules.values() if rule.source != SOURCE)

    # -- reading --------------------------------------------------------------------------

    def load_file(self, path: str | Path) -> None:
        name = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RulesError(f"cannot read: {exc}", Origin(name, 0)) from None
        self.load_text(text, name)

    def load_text(self, text: str, name: str) -> None:
        self.files.append(name)
        loader = _Loader(text)
        try:
            try:
                root = loader.get_single_node()
            except yaml.YAMLError as exc:
                mark = getattr(exc, "problem_mark", None)
                line = mark.line + 1 if mark is not None else 0
                problem = getattr(exc, "problem", None) or str(exc)
                raise RulesError(f"not valid YAML: {problem}", Origin(name, line)) from None
            if root is None:
                return
            if not isinstance(root, yaml.SequenceNode):
                raise RulesError("a rules file is a YAML list of items", Origin(name, root.start_mark.line + 1))
            for node in root.value:
                origin = Origin(name, node.start_mark.line + 1)
                try:
                    item = loader.construct_object(node, deep=True)
                except yaml.YAMLError as exc:
                    raise RulesError(f"not valid YAML: {exc}", origin) from None
                if not isinstance(item, dict):
                    raise RulesError(f"an item is a mapping with one of: {', '.join(KINDS)}", origin)
                self._item(item, node, origin)
        finally:
            loader.dispose()

    def _item(self, item: dict[str, Any], node: yaml.MappingNode, origin: Origin) -> None:
        kinds = [kind for kind in KINDS if kind in item]
        if len(kinds) != 1:
            raise RulesError(
                f"unknown item (keys {', '.join(map(str, item))}); an item has exactly one of {', '.join(KINDS)}",
                origin,
            )
        kind = kinds[0]
        if kind == "required_engine_version":
            version = item[kind]
            if not isinstance(version, int | str) or isinstance(version, bool):
                raise RulesError("required_engine_version is a number or a version string", origin)
            self.engine_versions.append(version)
            return
        if kind == "required_plugin_versions":
            plugins = item[kind]
            if not isinstance(plugins, list) or not all(isinstance(p, dict) and "name" in p for p in plugins):
                raise RulesError("required_plugin_versions is a list of {name, version}", origin)
            self.plugin_versions.extend(plugins)
            return
        name = item[kind]
        if not isinstance(name, str) or not name:
            raise RulesError(f"'{kind}' needs a name", origin)
        label = f"{kind} '{name}'"
        lines = {str(k.value): _value_line(v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}
        if kind == "list":
            self._list(item, name, origin, label)
        elif kind == "macro":
            self._macro(item, name, origin, label, lines)
        else:
            self._rule(item, name, origin, label, lines)

    def _list(self, item: dict[str, Any], name: str, origin: Origin, label: str) -> None:
        _known_keys(item, LIST_KEYS, origin, label)
        mode = _mode(item, "items", origin, label, appendable=True)
        items = item.get("items")
        if items is None:
            items = []
        if not isinstance(items, list) or not all(_is_scalar(i) for i in items):
            raise RulesError("'items' is a list of strings", origin, label)
        texts = [_scalar_text(i) for i in items]
        existing = self.lists.get(name)
        if mode == "append":
            if existing is None:
                raise RulesError("appends to a list that is not defined (in this or an earlier file)", origin, label)
            existing.items.extend(texts)
        else:
            if "items" not in item:
                raise RulesError("a list needs 'items'", origin, label)
            self.lists[name] = ListDef(name, texts, origin)

    def _macro(self, item: dict[str, Any], name: str, origin: Origin, label: str, lines: dict[str, int]) -> None:
        _known_keys(item, MACRO_KEYS, origin, label)
        mode = _mode(item, "condition", origin, label, appendable=True)
        condition = item.get("condition")
        if not isinstance(condition, str) or not condition.strip():
            raise RulesError("a macro needs a 'condition' (text)", origin, label)
        where = Origin(origin.file, lines.get("condition", origin.line))
        existing = self.macros.get(name)
        if mode == "append":
            if existing is None:
                raise RulesError("appends to a macro that is not defined (in this or an earlier file)", origin, label)
            existing.condition.append(condition, where)
        else:
            self.macros[name] = MacroDef(name, Text(condition, where), origin, item.get("source"))

    def _rule(self, item: dict[str, Any], name: str, origin: Origin, label: str, lines: dict[str, int]) -> None:
        _known_keys(item, RULE_KEYS, origin, label)
        existing = self.rules.get(name)
        override = item.get("override")
        legacy_append = item.get("append") is True
        if override is not None or legacy_append:
            if existing is None:
                raise RulesError(
                    "appends to or overrides a rule that is not defined (in this or an earlier file)", origin, label
                )
            modes = _rule_modes(item, override, origin, label)
            self._change_rule(existing, item, modes, origin, label, lines)
            return
        if set(item) <= {"rule", "enabled"} and "enabled" in item:
            if existing is None:
                raise RulesError("enables or disables a rule that is not defined", origin, label)
            existing.enabled = _bool(item["enabled"], "enabled", origin, label)
            return
        for key in ("condition", "output", "priority", "desc"):
            if key not in item:
                raise RulesError(f"a rule needs '{key}'", origin, label)
        condition, output = item["condition"], item["output"]
        if not isinstance(condition, str) or not condition.strip():
            raise RulesError("'condition' is text", origin, label)
        if not isinstance(output, str):
            raise RulesError("'output' is text", origin, label)
        try:
            priority = priority_level(item["priority"])
        except ValueError as exc:
            raise RulesError(str(exc), origin, label) from None
        self.rules[name] = RuleDef(
            name=name,
            desc=str(item.get("desc") or ""),
            condition=Text(condition, Origin(origin.file, lines.get("condition", origin.line))),
            output=Text(output.strip(), Origin(origin.file, lines.get("output", origin.line))),
            priority=priority,
            source=str(item.get("source") or "syscall"),
            tags=_tags(item.get("tags"), origin, label),
            enabled=_bool(item.get("enabled", True), "enabled", origin, label),
            exceptions=_exceptions(item.get("exceptions"), origin, label, require_fields=True),
            origin=origin,
            skip_if_unknown=_bool(item.get("skip-if-unknown-filter", False), "skip-if-unknown-filter", origin, label),
        )

    def _change_rule(
        self,
        rule: RuleDef,
        item: dict[str, Any],
        modes: dict[str, str],
        origin: Origin,
        label: str,
        lines: dict[str, int],
    ) -> None:
        for key, mode in modes.items():
            value = item[key]
            where = Origin(origin.file, lines.get(key, origin.line))
            if key == "condition":
                if not isinstance(value, str):
                    raise RulesError("'condition' is text", origin, label)
                if mode == "append":
                    rule.condition.append(value, where)
                else:
                    rule.condition = Text(value, where)
            elif key == "output":
                if not isinstance(value, str):
                    raise RulesError("'output' is text", origin, label)
                if mode == "append":
                    rule.output.append(value.strip(), where)
                else:
                    rule.output = Text(value.strip(), where)
            elif key == "desc":
                rule.desc = f"{rule.desc} {value}" if mode == "append" else str(value)
            elif key == "tags":
                tags = _tags(value, origin, label)
                rule.tags = [*rule.tags, *tags] if mode == "append" else tags
            elif key == "exceptions":
                if mode == "append":
                    _append_exceptions(rule, value, origin, label)
                else:
                    rule.exceptions = _exceptions(value, origin, label, require_fields=True)
            elif key == "priority":
                try:
                    rule.priority = priority_level(value)
                except ValueError as exc:
                    raise RulesError(str(exc), origin, label) from None
            elif key == "enabled":
                rule.enabled = _bool(value, "enabled", origin, label)
            elif key == "source":
                rule.source = str(value)
            elif key == "skip-if-unknown-filter":
                rule.skip_if_unknown = _bool(value, key, origin, label)
            # warn_evttypes, capture, capture_duration: syscall-only notions, accepted


class _Loader(yaml.SafeLoader):
    """PyYAML reads a plain ``=`` as YAML 1.1's "value" tag and has no constructor for it;
    Falco's exceptions write ``comps: [=, =]``, which YAML 1.2 parsers (Falco's) take as text."""


def _plain_equals(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    assert isinstance(node, yaml.ScalarNode)
    return loader.construct_scalar(node)


_Loader.add_constructor("tag:yaml.org,2002:value", _plain_equals)


def _value_line(node: yaml.Node) -> int:
    line: int = node.start_mark.line + 1
    if isinstance(node, yaml.ScalarNode) and node.style in ("|", ">"):
        line += 1  # a block scalar's text starts on the next line
    return line


def _known_keys(item: dict[str, Any], allowed: frozenset[str], origin: Origin, label: str) -> None:
    unknown = sorted(str(k) for k in item if k not in allowed)
    if unknown:
        raise RulesError(f"unknown key {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}", origin, label)


def _mode(item: dict[str, Any], key: str, origin: Origin, label: str, appendable: bool) -> str:
    """define, append or replace, from ``append: true`` or ``override: {key: ...}``."""
    override = item.get("override")
    if override is not None:
        if not isinstance(override, dict) or set(override) - {key}:
            raise RulesError(f"'override' may only name '{key}' here", origin, label)
        mode = override.get(key)
        if mode not in ("append", "replace"):
            raise RulesError(f"'override: {{{key}: ...}}' is append or replace", origin, label)
        return str(mode)
    append = item.get("append", False)
    if not isinstance(append, bool):
        raise RulesError("'append' is true or false", origin, label)
    return "append" if append else "define"


def _rule_modes(item: dict[str, Any], override: Any, origin: Origin, label: str) -> dict[str, str]:
    changed = [k for k in item if k not in ("rule", "override", "append")]
    if override is None:  # legacy append: true
        if set(changed) - RULE_APPENDABLE - {"enabled"}:
            bad = ", ".join(sorted(set(changed) - RULE_APPENDABLE))
            raise RulesError(f"'append: true' cannot change {bad}; use override with replace", origin, label)
        return {k: ("replace" if k == "enabled" else "append") for k in changed}
    if "append" in item:
        raise RulesError("use either 'append' or 'override', not both", origin, label)
    if not isinstance(override, dict) or not override:
        raise RulesError("'override' maps keys to append or replace", origin, label)
    modes: dict[str, str] = {}
    for key, mode in override.items():
        if (mode == "append" and key in RULE_APPENDABLE) or (mode == "replace" and key in RULE_REPLACEABLE):
            modes[str(key)] = str(mode)
        else:
            raise RulesError(f"'override: {{{key}: {mode}}}' is not allowed", origin, label)
        if key not in item:
            raise RulesError(f"'override' names '{key}' but the item does not set it", origin, label)
    missing = [k for k in changed if k not in modes]
    if missing:
        raise RulesError(f"{', '.join(missing)} set but not named in 'override'", origin, label)
    return modes


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _bool(value: Any, key: str, origin: Origin, label: str) -> bool:
    if not isinstance(value, bool):
        raise RulesError(f"'{key}' is true or false", origin, label)
    return value


def _tags(value: Any, origin: Origin, label: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_scalar(t) for t in value):
        raise RulesError("'tags' is a list of strings", origin, label)
    return [_scalar_text(t) for t in value]


def _exceptions(value: Any, origin: Origin, label: str, require_fields: bool) -> list[ExceptionDef]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RulesError("'exceptions' is a list", origin, label)
    out: list[ExceptionDef] = []
    for entry in value:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise RulesError("each exception is a mapping with a 'name'", origin, label)
        unknown = set(entry) - {"name", "fields", "comps", "values"}
        if unknown:
            raise RulesError(f"exception '{entry['name']}': unknown key {', '.join(sorted(unknown))}", origin, label)
        out.append(_exception(entry, origin, label, require_fields))
    return out


def _exception(entry: dict[str, Any], origin: Origin, label: str, require_fields: bool) -> ExceptionDef:
    name = entry["name"]
    fields = entry.get("fields")
    if fields is None and require_fields:
        raise RulesError(f"exception '{name}' needs 'fields'", origin, label)
    values = entry.get("values") or []
    if not isinstance(values, list):
        raise RulesError(f"exception '{name}': 'values' is a list", origin, label)
    if isinstance(fields, list):
        comps = entry.get("comps", ["="] * len(fields))
        if not isinstance(comps, list) or len(comps) != len(fields):
            raise RulesError(f"exception '{name}': 'comps' has one operator per field", origin, label)
        for tuple_ in values:
            if not isinstance(tuple_, list) or len(tuple_) != len(fields):
                raise RulesError(
                    f"exception '{name}': each value is a list of {len(fields)} (one per field), got {tuple_!r}",
                    origin,
                    label,
                )
        return ExceptionDef(name, [str(f) for f in fields], [str(c) for c in comps], values, origin)
    if isinstance(fields, str):
        comps = entry.get("comps", "in")
        if not isinstance(comps, str):
            raise RulesError(f"exception '{name}': with one field 'comps' is one operator", origin, label)
        return ExceptionDef(name, fields, comps, values, origin)
    if fields is None:
        return ExceptionDef(name, [], [], values, origin)
    raise RulesError(f"exception '{name}': 'fields' is a field name or a list of them", origin, label)


def _append_exceptions(rule: RuleDef, value: Any, origin: Origin, label: str) -> None:
    known = {e.name: e for e in rule.exceptions}
    for exc in _exceptions(value, origin, label, require_fields=False):
        if exc.name in known:
            target = known[exc.name]
            if isinstance(target.fields, list):
                for tuple_ in exc.values:
                    if not isinstance(tuple_, list) or len(tuple_) != len(target.fields):
                        raise RulesError(
                            f"exception '{exc.name}': each value is a list of {len(target.fields)}", origin, label
                        )
            target.values = [*target.values, *exc.values]
        elif exc.fields == []:
            raise RulesError(f"exception '{exc.name}' is not defined on the rule and has no 'fields'", origin, label)
        else:
            rule.exceptions.append(exc)


_LISTISH = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)+$")


def looks_like_list_name(word: str) -> bool:
    """A bare word in a value set that reads like a list name (``allowed_users``), for warnings."""
    return bool(_LISTISH.match(word))


def expand_paths(patterns: list[str]) -> list[str]:
    """Files named by ``patterns`` (globs allowed), in the order given, each glob sorted;
    ValueError for a pattern that names nothing."""
    out: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            found = sorted(glob.glob(pattern))
            if not found:
                raise ValueError(f"no rules file matches {pattern!r}")
            out.extend(found)
        else:
            if not Path(pattern).is_file():
                raise ValueError(f"rules file {pattern!r} does not exist")
            out.append(pattern)
    return out
