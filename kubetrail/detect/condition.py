"""Falco's condition language: parsed with pyparsing into a small tree, compiled into closures.

Grammar (libsinsp's, the subset the k8s_audit source uses)::

    expr     := and_expr ('or' and_expr)*
    and_expr := not_expr ('and' not_expr)*
    not_expr := 'not' not_expr | '(' expr ')' | check | macro_name
    check    := field ('exists' | binop value | listop '(' [value (',' value)*] ')')
    field    := name ['[' argument ']']
    binop    := = == != < <= > >= contains icontains bcontains startswith bstartswith endswith
                glob iglob regex
    listop   := in intersects pmatch

A value is a quoted string (``"..."`` or ``'...'``, backslash escapes) or a bare word. Inside a
``(...)`` set, a bare word naming a list is replaced by the list's items (lists may hold lists).

**Semantics** (Falco's): a field that is not available makes its check false. Scalar fields:
``in``/``intersects`` are membership, ``pmatch`` a path-prefix match, ``glob`` a full shell
pattern match, ``regex`` a full match. List fields (``ka.user.groups``,
``ka.req.pod.containers.*``, ...) take only ``in`` (every value in the set), ``intersects``
(at least one), ``pmatch`` (every value under a prefix) and ``exists``; any other operator on
them is an error when the rules load, as in Falco. ``<``/``>`` compare numbers when both sides
are whole numbers (Falco compares these string fields byte-wise, which agrees for numbers of
the same length such as HTTP codes) and strings otherwise.

**Compiled once.** A rule's tree, macros inlined, becomes nested closures: an ``and`` stops at
the first false check, each check reads its field through the event's cache. :func:`constraint`
reads from the tree which values of ``ka.verb``, ``ka.target.resource`` etc. a rule can match
at all, which the engine uses to index rules.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyparsing as pp

from kubetrail.detect.fields import Event, FieldRef, fast_getter, field_ref

Predicate = Callable[[Event], bool]

BINARY_OPS = (
    "==",
    "=",
    "!=",
    "<=",
    "<",
    ">=",
    ">",
    "contains",
    "icontains",
    "bcontains",
    "startswith",
    "bstartswith",
    "endswith",
    "glob",
    "iglob",
    "regex",
)
SET_OPS = ("in", "intersects", "pmatch")
LIST_FIELD_OPS = frozenset({"in", "intersects", "pmatch", "exists"})


# -- the tree --------------------------------------------------------------------------------


@dataclass
class Value:
    text: str
    quoted: bool


@dataclass
class Node:
    kind: str  # and, or, not, check, macro
    children: list[Node] = dataclasses.field(default_factory=list)
    field: str = ""  # check: field as written (name[arg]); macro: its name
    op: str = ""
    values: list[Value] = dataclasses.field(default_factory=list)
    loc: int = 0  # offset in the condition text


class ConditionError(ValueError):
    """A condition that does not parse or compile; ``offset`` into the text when known."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


def _grammar() -> pp.ParserElement:
    and_, or_, not_ = pp.Keyword("and"), pp.Keyword("or"), pp.Keyword("not")
    keyword = and_ | or_ | not_
    lpar, rpar = pp.Suppress("("), pp.Suppress(")")
    quoted = (pp.QuotedString('"', esc_char="\\") | pp.QuotedString("'", esc_char="\\")).set_parse_action(
        lambda t: Value(t[0], True)
    )
    bare = pp.Regex(r"[^\s(),\"']+").set_parse_action(lambda t: Value(t[0], False))
    value = quoted | bare
    name = pp.Regex(r"[A-Za-z_][A-Za-z0-9_.\-]*")
    argument = pp.Regex(r"\[[^\]]*\]")
    field_ = pp.Combine(name + pp.Optional(argument))
    word_ops = [op for op in BINARY_OPS if op.isalpha()]
    symbol_op = pp.Regex(r"==|=|!=|<=|<|>=|>")
    binop = symbol_op | pp.MatchFirst([pp.Keyword(op) for op in word_ops])
    setop = pp.MatchFirst([pp.Keyword(op) for op in SET_OPS])
    value_set = pp.Group(lpar + pp.Optional(pp.DelimitedList(value)) + rpar)
    expr = pp.Forward()

    def check_action(s: str, loc: int, t: pp.ParseResults) -> Node:
        if t[1] == "exists":
            return Node("check", field=t[0], op="exists", loc=loc)
        values = list(t[2]) if isinstance(t[2], pp.ParseResults) else [t[2]]
        return Node("check", field=t[0], op="==" if t[1] == "=" else t[1], values=values, loc=loc)

    check = (
        ~keyword + field_ + (pp.Keyword("exists") | (setop + value_set) | (binop + (value_set | value)))
    ).set_parse_action(check_action)
    macro = (~keyword + name).set_parse_action(lambda s, loc, t: Node("macro", field=t[0], loc=loc))
    atom = (lpar + expr + rpar) | check | macro
    not_expr = pp.Forward()
    not_expr <<= (not_ + not_expr).set_parse_action(lambda t: Node("not", [t[1]])) | atom

    def fold(kind: str) -> Callable[[pp.ParseResults], Node]:
        def action(t: pp.ParseResults) -> Node:
            items = [item for item in t if isinstance(item, Node)]
            return items[0] if len(items) == 1 else Node(kind, items)

        return action

    and_expr = (not_expr + pp.ZeroOrMore(and_ + not_expr)).set_parse_action(fold("and"))
    expr <<= (and_expr + pp.ZeroOrMore(or_ + and_expr)).set_parse_action(fold("or"))
    return expr


_GRAMMAR = _grammar()


def parse(text: str) -> Node:
    """The tree of a condition; ConditionError with the offset of what did not parse."""
    if not text.strip():
        raise ConditionError("empty condition", 0)
    try:
        result = _GRAMMAR.parse_string(text, parse_all=True)
    except pp.ParseException as exc:
        found = text[exc.loc : exc.loc + 20].split("\n")[0]
        raise ConditionError(f"syntax error near '{found}'" if found else "unexpected end", exc.loc) from None
    except RecursionError:
        raise ConditionError("condition nested too deeply", 0) from None
    node = result[0]
    assert isinstance(node, Node)
    return node


def macro_names(node: Node) -> set[str]:
    if node.kind == "macro":
        return {node.field}
    out: set[str] = set()
    for child in node.children:
        out |= macro_names(child)
    return out


def set_words(node: Node) -> set[str]:
    """Bare words used inside value sets: list names, where lists are defined."""
    if node.kind == "check":
        return {v.text for v in node.values if not v.quoted}
    out: set[str] = set()
    for child in node.children:
        out |= set_words(child)
    return out


def inline(node: Node, macros: dict[str, Node], stack: tuple[str, ...] = ()) -> Node:
    """The tree with every macro replaced by its own tree; ConditionError for an undefined or
    self-referring macro."""
    if node.kind == "macro":
        name = node.field
        if name in stack:
            raise ConditionError(f"macro '{name}' refers to itself ({' -> '.join((*stack, name))})", node.loc)
        body = macros.get(name)
        if body is None:
            if "." in name:
                raise ConditionError(f"'{name}' is a field without an operator, or an unknown field", node.loc)
            raise ConditionError(f"undefined macro '{name}'", node.loc)
        return inline(body, macros, (*stack, name))
    if node.kind == "check":
        return node
    return Node(node.kind, [inline(child, macros, stack) for child in node.children], loc=node.loc)


# -- compiling --------------------------------------------------------------------------------


def split_field(text: str) -> tuple[str, str | None]:
    if text.endswith("]") and "[" in text:
        name, _, arg = text[:-1].partition("[")
        return name, arg.strip().strip("\"'")
    return text, None


def _number(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _order(op: str, operand: str) -> Callable[[str], bool]:
    number = _number(operand)
    compare: Callable[[Any, Any], bool] = {
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
    }[op]

    def check(value: str) -> bool:
        if number is not None:
            mine = _number(value)
            if mine is not None:
                return compare(mine, number)
        return compare(value, operand)

    return check


def _pmatch(prefixes: list[str]) -> Callable[[str], bool]:
    cleaned = [p.rstrip("/") for p in prefixes]

    def check(value: str) -> bool:
        return any(value == p or value.startswith(p + "/") or (p == "" and value.startswith("/")) for p in cleaned)

    return check


def _scalar_test(op: str, operands: list[str]) -> Callable[[str], bool]:
    """What a check does with one string value."""
    if op in SET_OPS:
        if op == "pmatch":
            return _pmatch(operands)
        members = frozenset(operands)
        return members.__contains__
    (operand,) = operands
    if op == "==":
        return operand.__eq__  # values are str: a C call, no Python frame
    if op == "!=":
        return operand.__ne__
    if op in ("<", "<=", ">", ">="):
        return _order(op, operand)
    if op in ("contains", "bcontains"):
        return lambda value: operand in value
    if op == "icontains":
        lowered = operand.lower()
        return lambda value: lowered in value.lower()
    if op in ("startswith", "bstartswith"):
        return lambda value: value.startswith(operand)
    if op == "endswith":
        return lambda value: value.endswith(operand)
    if op in ("glob", "iglob"):
        pattern = re.compile(fnmatch.translate(operand), re.IGNORECASE if op == "iglob" else 0)
        return lambda value: pattern.match(value) is not None
    if op == "regex":
        try:
            regex = re.compile(operand)
        except re.error as exc:
            raise ConditionError(f"bad regex '{operand}': {exc}") from None
        return lambda value: regex.fullmatch(value) is not None
    raise ConditionError(f"unknown operator '{op}'")


def expand_values(values: list[Value], lists: dict[str, list[str]]) -> list[str]:
    out: list[str] = []
    for value in values:
        if not value.quoted and value.text in lists:
            out.extend(lists[value.text])
        else:
            out.append(value.text)
    return out


def compile_check(node: Node, lists: dict[str, list[str]]) -> tuple[Predicate, FieldRef]:
    name, arg = split_field(node.field)
    try:
        ref = field_ref(name, arg)
    except ValueError as exc:
        raise ConditionError(str(exc), node.loc) from None
    op = node.op
    if ref.spec.is_list and op not in LIST_FIELD_OPS:
        written = "=" if op == "==" else op
        raise ConditionError(
            f"'{written}' is not supported on list field '{name}' (use in, intersects, pmatch or exists)", node.loc
        )
    value_of = Event.value
    if op == "exists":
        present = fast_getter(ref)
        return (lambda ev: present(ev) is not None), ref
    operands = expand_values(node.values, lists)
    if op not in SET_OPS and len(operands) != 1:
        raise ConditionError(f"'{op}' takes one value, not a list", node.loc)
    try:
        test = _scalar_test(op, operands)
    except ConditionError as exc:
        raise ConditionError(str(exc), node.loc) from None
    if ref.spec.is_list:
        if op == "intersects":

            def any_of(ev: Event) -> bool:
                values = value_of(ev, ref)
                return values is not None and any(test(v) for v in values)

            return any_of, ref

        def all_of(ev: Event) -> bool:
            values = value_of(ev, ref)
            return values is not None and all(test(v) for v in values)

        return all_of, ref

    get = fast_getter(ref)

    def scalar(ev: Event) -> bool:
        value = get(ev)
        return value is not None and test(value)

    return scalar, ref


def compile_tree(node: Node, lists: dict[str, list[str]], refs: list[FieldRef] | None = None) -> Predicate:
    """A predicate for an inlined tree (no macros left). ``refs`` collects the fields read."""
    if node.kind == "check":
        predicate, ref = compile_check(node, lists)
        if refs is not None:
            refs.append(ref)
        return predicate
    if node.kind == "not":
        inner = compile_tree(node.children[0], lists, refs)
        return lambda ev: not inner(ev)
    parts = [compile_tree(child, lists, refs) for child in _flatten(node)]
    if node.kind == "and":
        if len(parts) == 2:
            a, b = parts
            return lambda ev: a(ev) and b(ev)

        def all_parts(ev: Event) -> bool:
            for part in parts:  # noqa: SIM110 - a loop: all() over a generator costs more per event
                if not part(ev):
                    return False
            return True

        return all_parts
    if node.kind == "or":
        if len(parts) == 2:
            c, d = parts
            return lambda ev: c(ev) or d(ev)

        def any_part(ev: Event) -> bool:
            for part in parts:  # noqa: SIM110 - as above
                if part(ev):
                    return True
            return False

        return any_part
    raise ConditionError(f"macro '{node.field}' left in a compiled condition", node.loc)


def _flatten(node: Node) -> list[Node]:
    """``a and (b and c)`` as ``[a, b, c]``: fewer calls per event."""
    out: list[Node] = []
    for child in node.children:
        if child.kind == node.kind:
            out.extend(_flatten(child))
        else:
            out.append(child)
    return out


def constraint(node: Node, fields: frozenset[str], lists: dict[str, list[str]]) -> frozenset[str] | None:
    """The values one of ``fields`` (equivalent spellings of one field) must have for the tree to
    hold, or None when it can have any (or none). Only positive ``=``/``in`` checks count:
    a rule can match only events whose value is in the set, so the set may index it."""
    if node.kind == "check":
        if node.field in fields and node.op in ("==", "in"):
            return frozenset(expand_values(node.values, lists))
        return None
    if node.kind == "and":
        found: frozenset[str] | None = None
        for child in node.children:
            own = constraint(child, fields, lists)
            if own is not None:
                found = own if found is None else found & own
        return found
    if node.kind == "or":
        union: frozenset[str] = frozenset()
        for child in node.children:
            own = constraint(child, fields, lists)
            if own is None:
                return None
            union |= own
        return union
    return None


_RAWTIME = frozenset({"jevt.rawtime", "json.rawtime"})
# Fields every audit event has (Falco stamps each event with a time).
ALWAYS_AVAILABLE = frozenset(
    f"{prefix}.{name}" for prefix in ("jevt", "json") for name in ("rawtime", "time", "time.iso8601", "obj")
)


def fold(node: Node, known: dict[str, str | None], lists: dict[str, list[str]]) -> bool | Node:
    """The tree with every check on a field in ``known`` (spelling -> value, None = not
    available) replaced by its result, and ``and``/``or``/``not`` simplified: True, False or
    what is left to evaluate. The engine folds each rule for an event's (stage, verb, resource,
    subresource), so most checks are decided once per such key, not once per event."""
    if node.kind == "check":
        if node.op == "exists" and node.field in ALWAYS_AVAILABLE:
            return True
        if node.field in _RAWTIME and node.op in ("==", "!=") and [v.text for v in node.values] == ["0"]:
            # Falco's k8s_audit_never_true is `jevt.rawtime=0`: an event's time is never 0
            # (the event time is always set, see Event.timestamp_ns), so it is decided here.
            return node.op == "!="
        if node.field not in known:
            return node
        value = known[node.field]
        if value is None:
            return False
        if node.op == "exists":
            return True
        operands = expand_values(node.values, lists)
        return _scalar_test(node.op, operands)(value)
    if node.kind == "not":
        inner = fold(node.children[0], known, lists)
        return (not inner) if isinstance(inner, bool) else Node("not", [inner], loc=node.loc)
    if node.kind in ("and", "or"):
        decisive = node.kind == "or"  # the value that decides the whole: True for or, False for and
        left: list[Node] = []
        for child in node.children:
            folded = fold(child, known, lists)
            if isinstance(folded, bool):
                if folded is decisive:
                    return decisive
                continue
            left.append(folded)
        if not left:
            return not decisive
        return left[0] if len(left) == 1 else Node(node.kind, left, loc=node.loc)
    return node
