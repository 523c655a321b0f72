"""The compiled rule set: predicates, outputs, the index, and alerts in Falco's JSON shape.

**Index.** Most rules name the verb and resource they are about (``kcreate and pod``), and
Falco's ``kevt`` limits them to one stage. :func:`~kubetrail.detect.condition.constraint` reads
from each rule which stages, verbs, resources and subresources it can match at all; an event's
``(stage, verb, resource, subresource)`` then selects the few rules worth evaluating. The
selection is cached per distinct key (there are few), so an event costs one dict lookup plus
its candidate rules, not all of them.

**Classes.** Beyond the key, most specialised rules read only fields with few values in a
cluster (user, namespace, decision, response code): :meth:`Engine.decide_class` decides, on one
event, what every event of its *detection class* (:func:`~kubetrail.detect.fields.class_of`)
fires. A rule that reads more is folded with what the class knows (the user, whether there is
a request object, ...) and usually ends up decided too; what is left is a predicate each event
of the class is checked against. The ``detect`` filter keeps these per class id of the native
scan.

**Alerts** follow Falco's JSON output (``time``, ``rule``, ``priority``, ``source``, ``tags``,
``output``, ``output_fields``, ``hostname``); ``output`` starts with the event's time and the
priority as Falco's does. Missing values are ``<NA>`` in text and null in ``output_fields``;
list values are ``(a,b)``, as Falco prints them. :func:`native_template` compiles a rule's
alert for the native writer (``native/src/alerts.rs``) when its output reads only members the
audit scan decodes.
"""

from __future__ import annotations

import functools
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson

from kubetrail.detect import condition as cond
from kubetrail.detect.fields import Event, FieldRef, as_text, class_of, fast_getter, field_ref, object_member
from kubetrail.detect.rules import PRIORITIES, SOURCE, Origin, RuleDef, RulesError, RuleSet, looks_like_list_name

# (key, the spellings of the field a constraint may use, the reference an event's key is read with)
_INDEX = (
    ("stage", frozenset({"ka.stage", "jevt.value[/stage]", "json.value[/stage]"}), field_ref("ka.stage", None)),
    ("verb", frozenset({"ka.verb", "jevt.value[/verb]", "json.value[/verb]"}), field_ref("ka.verb", None)),
    (
        "resource",
        frozenset({"ka.target.resource", "jevt.value[/objectRef/resource]"}),
        field_ref("ka.target.resource", None),
    ),
    (
        "subresource",
        frozenset({"ka.target.subresource", "jevt.value[/objectRef/subresource]"}),
        field_ref("ka.target.subresource", None),
    ),
)
# The other fields of an event's detection class (their index in fields.class_of), as rules
# may spell them; each has the same value as the light struct's member (a code as its text).
_CLASS_FIELDS = tuple(
    (index, frozenset({name, f"jevt.value[{pointer}]", f"json.value[{pointer}]"}))
    for index, name, pointer in (
        (4, "ka.user.name", "/user/username"),
        (5, "ka.impuser.name", "/impersonatedUser/username"),
        (6, "ka.target.namespace", "/objectRef/namespace"),
        (7, "ka.auth.decision", "/annotations/authorization.k8s.io~1decision"),
        (8, "ka.response.code", "/responseStatus/code"),
    )
)
_INDEX_REFS = tuple(ref for _, _, ref in _INDEX)
_STAGE, _VERB, _RESOURCE, _SUBRESOURCE = (fast_getter(ref) for ref in _INDEX_REFS)
_AUDIT_ID = fast_getter(field_ref("ka.auditid", None))
_OUTPUT_FIELD = re.compile(r"%([A-Za-z_][A-Za-z0-9_.]*[A-Za-z0-9_])(\[[^\]]*\])?")


class Output:
    """A rule's output string, compiled: literal parts and fields."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.parts: list[str | FieldRef] = []
        position = 0
        for found in _OUTPUT_FIELD.finditer(text):
            name, arg = found.group(1), found.group(2)
            self.parts.append(text[position : found.start()])
            self.parts.append(field_ref(name, arg[1:-1] if arg else None))  # ValueError: unknown field
            position = found.end()
        self.parts.append(text[position:])
        self.refs = [p for p in self.parts if isinstance(p, FieldRef)]
        self._steps: list[tuple[str, str | None, Any]] = [
            (p, None, None) if isinstance(p, str) else ("", p.key, fast_getter(p)) for p in self.parts
        ]

    def render(self, ev: Event) -> tuple[str, dict[str, str | None]]:
        fields: dict[str, str | None] = {}
        out: list[str] = []
        for text, key, get in self._steps:
            if key is None:
                out.append(text)
                continue
            value = get(ev)
            if value is not None and value.__class__ is not str:
                value = "(" + ",".join(value) + ")"  # a list, as Falco prints one
            fields[key] = value
            out.append("<NA>" if value is None else value)
        return "".join(out), fields


# Fields with few distinct values in a cluster (users, namespaces, codes, ...): a predicate that
# reads only these is remembered per combination of their values, so "Disallowed K8s User"
# costs a dict lookup per event, not three checks.
_FEW_VALUES = frozenset(
    {
        "ka.user.name",
        "ka.impuser.name",
        "ka.target.namespace",
        "ka.auth.decision",
        "ka.response.code",
        "ka.verb",
        "ka.stage",
        "ka.target.resource",
        "ka.target.subresource",
        "jevt.value[/user/username]",
        "jevt.value[/objectRef/namespace]",
        "jevt.value[/responseStatus/code]",
    }
)
_MEMO_LIMIT = 50_000


def _memoised(predicate: cond.Predicate, refs: list[FieldRef]) -> cond.Predicate:
    getters = list({ref.key: fast_getter(ref) for ref in refs}.values())
    memo: dict[Any, bool] = {}
    if len(getters) == 1:
        (get,) = getters

        def one(ev: Event) -> bool:
            value = get(ev)
            found = memo.get(value)
            if found is None:
                if len(memo) > _MEMO_LIMIT:
                    memo.clear()
                found = memo[value] = predicate(ev)
            return found

        return one

    def many(ev: Event) -> bool:
        values = tuple(get(ev) for get in getters)
        found = memo.get(values)
        if found is None:
            if len(memo) > _MEMO_LIMIT:
                memo.clear()
            found = memo[values] = predicate(ev)
        return found

    return many


@dataclass
class CompiledRule:
    name: str
    desc: str
    priority: int
    tags: list[str]
    output: Output
    predicate: cond.Predicate
    origin: Origin
    index: dict[str, frozenset[str] | None]
    tree: cond.Node  # macros inlined, exceptions added: what is folded per index key
    lists: dict[str, list[str]]

    def specialise(self, key: tuple[Any, ...]) -> tuple[cond.Predicate | bool, bool]:
        """The rule for events with this (stage, verb, resource, subresource): True (fires on
        every such event), False (on none), or a predicate over what is left; and whether the
        result depends only on the event's detection class (:func:`~kubetrail.detect.fields.class_of`:
        the key and the few-valued fields of ``_FEW_VALUES``)."""
        known: dict[str, str | None] = {}
        for (_, spellings, _), value in zip(_INDEX, key, strict=True):
            for spelling in spellings:
                known[spelling] = value
        folded = cond.fold(self.tree, known, self.lists)
        if isinstance(folded, bool):
            return folded, True
        refs: list[FieldRef] = []
        predicate = cond.compile_tree(folded, self.lists, refs)
        if refs and all(ref.key in _FEW_VALUES for ref in refs):
            return _memoised(predicate, refs), True
        return predicate, False

    @functools.cached_property
    def fields(self) -> frozenset[str]:
        """The fields the rule's checks read, as spelled (with their arguments)."""
        found: set[str] = set()
        todo = [self.tree]
        while todo:
            node = todo.pop()
            if node.kind == "check":
                found.add(node.field)
            todo.extend(node.children)
        return frozenset(found)

    @property
    def priority_name(self) -> str:
        return PRIORITIES[self.priority]

    def admits(self, key: tuple[Any, ...]) -> bool:
        for (name, _, _), value in zip(_INDEX, key, strict=True):
            allowed = self.index[name]
            if allowed is not None and value not in allowed:
                return False
        return True


# A rule specialised for an index key: its predicate (None: fires) and whether that depends on
# the event's detection class alone.
_Special = tuple[CompiledRule, cond.Predicate | None, bool]
# What an event's detection class fires (see Engine.decide_class).
Decision = tuple[tuple[CompiledRule, cond.Predicate | None], ...]


@dataclass
class Alert:
    rule: CompiledRule
    output: str
    output_fields: dict[str, str | None]


class Engine:
    """Compiled rules; :meth:`match` gives the rules an event fires, in definition order."""

    def __init__(self, rules: list[CompiledRule], ruleset: RuleSet, warnings: list[str]) -> None:
        self.rules = rules
        self.ruleset = ruleset
        self.warnings = warnings
        self.skipped_sources: Counter[str] = ruleset.other_sources()
        self.disabled = sum(1 for r in ruleset.rules.values() if not r.enabled and r.source == SOURCE)
        self._by_key: dict[tuple[Any, ...], tuple[_Special, ...]] = {}
        self._seconds: dict[int, str] = {}
        self.hostname = socket.gethostname()

    @staticmethod
    def _key(ev: Event) -> tuple[Any, ...]:
        light = ev.light
        if light is not None:  # typed: str or None already, four attribute reads
            ref = light.objectRef
            if ref is None:
                return (light.stage, light.verb, None, None)
            return (light.stage, light.verb, ref.resource, ref.subresource)
        return (_STAGE(ev), _VERB(ev), _RESOURCE(ev), _SUBRESOURCE(ev))

    def candidates(self, ev: Event) -> tuple[tuple[CompiledRule, cond.Predicate | None], ...]:
        """The rules that can fire on the event, each with its predicate specialised for the
        event's index key (None: it fires, nothing left to check)."""
        key = self._key(ev)
        found = self._by_key.get(key)
        if found is None:
            found = self._specialised(key)
        return tuple((rule, predicate) for rule, predicate, _ in found)

    def decide_class(self, ev: Event) -> Decision:
        """What every event of ``ev``'s detection class fires, decided on ``ev``: the candidate
        rules, in order, with None for a rule that fires on all of them and the predicate of a
        rule each event must still be checked against; the rules that depend only on the class
        and do not fire on ``ev`` are left out. Empty: no event of the class fires anything.
        ``ev`` must be an audit event that decoded to its light struct."""
        key = self._key(ev)
        found = self._by_key.get(key)
        if found is None:
            found = self._specialised(key)
        assert ev.light is not None
        # The rules that read more than the class are folded with what the class knows (e.g.
        # "Anonymous Request Allowed" is False for every user but system:anonymous, whatever
        # the URI): most of them end up decided too.
        known: dict[str, str | None] = {}
        for (_, spellings, _), value in zip(_INDEX, key, strict=True):
            known.update(dict.fromkeys(spellings, value))
        values = class_of(ev.light)
        for index, spellings in _CLASS_FIELDS:
            known.update(dict.fromkeys(spellings, as_text(values[index])))
        has_request, has_response = values[9], values[10]
        decision: list[tuple[CompiledRule, cond.Predicate | None]] = []
        for rule, predicate, by_class in found:
            if by_class:
                if predicate is None or predicate(ev):
                    decision.append((rule, None))
                continue
            if not (has_request and has_response):
                # What a rule reads in an object the class's events lack is not available.
                absent = {"requestObject": not has_request, "responseObject": not has_response}
                known = known | {field: None for field in rule.fields if absent.get(object_member(field) or "", False)}
            folded = cond.fold(rule.tree, known, rule.lists)
            if folded is True:
                decision.append((rule, None))
            elif folded is not False:
                decision.append((rule, cond.compile_tree(folded, rule.lists)))
        return tuple(decision)

    def _specialised(self, key: tuple[Any, ...]) -> tuple[_Special, ...]:
        if len(self._by_key) > 10_000:  # odd verbs/resources must not grow it without bound
            self._by_key.clear()
        chosen: list[_Special] = []
        for rule in self.rules:
            if not rule.admits(key):
                continue
            special, by_class = rule.specialise(key)
            if special is not False:
                chosen.append((rule, None if special is True else special, by_class))
        found = self._by_key[key] = tuple(chosen)
        return found

    def match(self, ev: Event) -> list[CompiledRule]:
        """The rules the event fires. Called once per event: the common path is inlined."""
        light = ev.light
        if light is not None:
            if light.auditID is None:
                return []  # the k8saudit plugin extracts nothing from other JSON
            ref = light.objectRef
            key = (
                (light.stage, light.verb, None, None)
                if ref is None
                else (light.stage, light.verb, ref.resource, ref.subresource)
            )
        elif ev.is_audit_event():
            key = self._key(ev)
        else:
            return []
        found = self._by_key.get(key)
        if found is None:
            found = self._specialised(key)
        if not found:
            return []
        return [rule for rule, predicate, _ in found if predicate is None or predicate(ev)]

    def alert(self, rule: CompiledRule, ev: Event) -> Alert:
        text, fields = rule.output.render(ev)
        return Alert(rule, text, fields)

    def alert_record(self, alert: Alert, ev: Event) -> dict[str, Any]:
        """The alert as Falco's JSON output writes it, plus the triggering event's identity."""
        ns = ev.timestamp_ns()
        seconds, nanos = divmod(ns, 1_000_000_000)
        whole = self._seconds.get(seconds)
        if whole is None:  # events of one second share the formatting
            if len(self._seconds) > 4096:
                self._seconds.clear()
            whole = self._seconds[seconds] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        fraction = f".{nanos:09d}"
        rule = alert.rule
        return {
            "time": f"{whole}{fraction}Z",
            "rule": rule.name,
            "priority": rule.priority_name,
            "source": SOURCE,
            "tags": rule.tags,
            "output": f"{whole[11:]}{fraction}: {rule.priority_name} {alert.output}",
            "output_fields": alert.output_fields,
            "hostname": self.hostname,
            "k8s.audit.id": _AUDIT_ID(ev),
            "k8s.audit.stage": _STAGE(ev),
        }


# Members of the event the native alert writer reads (``native/src/alerts.rs``), by light path.
_NATIVE_FIELDS = {
    ("auditID",): 0,
    ("stage",): 1,
    ("verb",): 2,
    ("requestURI",): 3,
    ("userAgent",): 4,
    ("user", "username"): 5,
    ("impersonatedUser", "username"): 6,
    ("objectRef", "resource"): 7,
    ("objectRef", "subresource"): 8,
    ("objectRef", "namespace"): 9,
    ("objectRef", "name"): 10,
    ("responseStatus", "code"): 11,
    ("annotations", "decision"): 12,
    ("annotations", "reason"): 13,
}


def native_template(rule: CompiledRule) -> tuple[bytes, bytes, list[bytes | int], list[tuple[bytes, int]]] | None:
    """The rule's alert as the native writer's template (``native/src/alerts.rs``): the
    record's constant members, the output's escaped text and field ids, the output_fields;
    None when the output reads a field the writer does not have (Python writes those alerts).
    Laid out as :meth:`Engine.alert_record` and orjson write it."""
    parts: list[bytes | int] = []
    fields: dict[str, int] = {}
    for part in rule.output.parts:
        if isinstance(part, str):
            if part:
                parts.append(orjson.dumps(part)[1:-1])
            continue
        found = _NATIVE_FIELDS.get(part.light) if part.light is not None else None
        if found is None:
            return None
        parts.append(found)
        fields.setdefault(part.key, found)
    head = (
        b',"rule":'
        + orjson.dumps(rule.name)
        + b',"priority":'
        + orjson.dumps(rule.priority_name)
        + b',"source":'
        + orjson.dumps(SOURCE)
        + b',"tags":'
        + orjson.dumps(rule.tags)
        + b',"output":"'
    )
    priority = b": " + orjson.dumps(rule.priority_name)[1:-1] + b" "
    return head, priority, parts, [(orjson.dumps(key) + b":", found) for key, found in fields.items()]


def _condition_error(exc: cond.ConditionError, text: str, origin: Origin, item: str) -> RulesError:
    line = origin.line
    if exc.offset is not None:
        line += text.count("\n", 0, exc.offset)
    return RulesError(str(exc), Origin(origin.file, line), item)


def compile_rules(ruleset: RuleSet) -> Engine:
    """Compile every enabled ``k8s_audit`` rule; RulesError for the first problem found."""
    warnings: list[str] = []
    lists = _resolve_lists(ruleset)
    macros: dict[str, cond.Node] = {}
    # A macro that does not parse is an error once a k8s_audit rule uses it; a file shared with
    # syscall rules may hold macros in syntax only that source has, which only earn a warning.
    broken: dict[str, RulesError] = {}
    for macro in ruleset.macros.values():
        try:
            macros[macro.name] = cond.parse(macro.condition.text)
        except cond.ConditionError as exc:
            broken[macro.name] = _condition_error(
                exc, macro.condition.text, macro.condition.origin, f"macro '{macro.name}'"
            )
    used_macros: set[str] = set()
    used_words: set[str] = set()
    compiled: list[CompiledRule] = []
    for rule in ruleset.rules.values():
        if rule.source != SOURCE or not rule.enabled:
            continue
        label = f"rule '{rule.name}'"
        try:
            tree = cond.parse(rule.condition.text)
        except cond.ConditionError as exc:
            raise _condition_error(exc, rule.condition.text, rule.condition.origin, label) from None
        reached = _macros_reached(tree, macros, broken)
        for name in reached:
            if name in broken:
                raise broken[name]
        used_macros |= reached
        try:
            full = cond.inline(tree, macros)
            full = _with_exceptions(full, rule, lists)
            predicate = cond.compile_tree(full, lists)
        except cond.ConditionError as exc:
            if rule.skip_if_unknown and "unknown field" in str(exc):
                warnings.append(f"{rule.origin}: {label}: skipped (skip-if-unknown-filter): {exc}")
                continue
            # The offset is into the rule's own text only when no macro was inlined at that point.
            plain = cond.ConditionError(str(exc), exc.offset if _offset_in(tree, exc.offset) else None)
            raise _condition_error(plain, rule.condition.text, rule.condition.origin, label) from None
        used_words |= cond.set_words(full)
        try:
            output = Output(rule.output.text)
        except ValueError as exc:
            raise RulesError(f"output: {exc}", rule.output.origin, label) from None
        index = {name: cond.constraint(full, spellings, lists) for name, spellings, _ in _INDEX}
        compiled.append(
            CompiledRule(
                rule.name, rule.desc, rule.priority, rule.tags, output, predicate, rule.origin, index, full, lists
            )
        )
    for name, macro in ruleset.macros.items():
        if name in broken:
            warnings.append(f"{broken[name]} (not used by k8s_audit rules)")
        elif name not in used_macros:
            warnings.append(f"{macro.origin}: macro '{name}' is never used")
    reached_lists = _lists_reached(used_words, ruleset)
    for name, lst in ruleset.lists.items():
        if name not in reached_lists:
            warnings.append(f"{lst.origin}: list '{name}' is never used")
    for word in sorted(used_words - set(ruleset.lists)):
        if looks_like_list_name(word):
            warnings.append(f"'{word}' is used as a value but reads like a list name, and no list of that name exists")
    return Engine(compiled, ruleset, warnings)


def _offset_in(tree: cond.Node, offset: int | None) -> bool:
    return offset is not None


def _macros_reached(tree: cond.Node, macros: dict[str, cond.Node], broken: dict[str, RulesError]) -> set[str]:
    seen: set[str] = set()
    todo = list(cond.macro_names(tree))
    while todo:
        name = todo.pop()
        if name in seen or (name not in macros and name not in broken):
            continue
        seen.add(name)
        if name in macros:
            todo.extend(cond.macro_names(macros[name]))
    return seen


def _lists_reached(words: set[str], ruleset: RuleSet) -> set[str]:
    seen: set[str] = set()
    todo = [w for w in words if w in ruleset.lists]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(item for item in ruleset.lists[name].items if item in ruleset.lists)
    return seen


def _resolve_lists(ruleset: RuleSet) -> dict[str, list[str]]:
    """Each list's items with the lists it names replaced by their items (lists inside lists)."""
    resolved: dict[str, list[str]] = {}

    def resolve(name: str, stack: tuple[str, ...]) -> list[str]:
        if name in resolved:
            return resolved[name]
        if name in stack:
            lst = ruleset.lists[name]
            raise RulesError(f"list refers to itself ({' -> '.join((*stack, name))})", lst.origin, f"list '{name}'")
        items: list[str] = []
        for item in ruleset.lists[name].items:
            if item in ruleset.lists:
                items.extend(resolve(item, (*stack, name)))
            else:
                items.append(item)
        resolved[name] = items
        return items

    for name in ruleset.lists:
        resolve(name, ())
    return resolved


def _with_exceptions(tree: cond.Node, rule: RuleDef, lists: dict[str, list[str]]) -> cond.Node:
    """``tree and not (exception 1) and not (exception 2) ...``."""
    parts = [tree]
    for exc in rule.exceptions:
        alternatives: list[cond.Node] = []
        if isinstance(exc.fields, str):
            comp = "==" if exc.comps == "=" else str(exc.comps)
            if not exc.values:
                continue
            if comp in cond.SET_OPS:
                alternatives.append(_check(exc.fields, comp, exc.values))
            else:
                alternatives.extend(_check(exc.fields, comp, [value]) for value in exc.values)
        else:
            for tuple_ in exc.values:
                checks = [
                    _check(field, "==" if comp == "=" else comp, value if isinstance(value, list) else [value])
                    for field, comp, value in zip(exc.fields, exc.comps, tuple_, strict=True)
                ]
                alternatives.append(checks[0] if len(checks) == 1 else cond.Node("and", checks))
        if alternatives:
            either = alternatives[0] if len(alternatives) == 1 else cond.Node("or", alternatives)
            parts.append(cond.Node("not", [either]))
    return tree if len(parts) == 1 else cond.Node("and", parts)


def _check(field: str, op: str, values: list[Any]) -> cond.Node:
    if op not in cond.BINARY_OPS and op not in cond.SET_OPS and op != "exists":
        raise cond.ConditionError(f"exception uses unknown operator '{op}'")
    texts = [cond.Value(_text(v), quoted=not (isinstance(v, str) and v.isidentifier())) for v in values]
    if op not in cond.SET_OPS and len(texts) != 1:
        raise cond.ConditionError(f"exception on '{field}': '{op}' takes one value")
    return cond.Node("check", field=field, op=op, values=texts)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_rules(paths: list[str]) -> Engine:
    """Load files in order and compile them (RulesError names file, line and item)."""
    ruleset = RuleSet()
    for path in paths:
        ruleset.load_file(path)
    return compile_rules(ruleset)
