"""Fluent Bit's regex multiline parsers: the built-in ``go``, ``python``, ``java``, ``ruby`` and
``[MULTILINE_PARSER]`` sections (``type regex``, ``rule "state" "/regex/" "next_state"``).

The container runtime formats (``cri``, ``docker``) are a different kind of joining (pieces of
one line, per stream) and live in :mod:`kubetrail.parsers.multiline`; this module is the state
machine for messages of several lines (stack traces):

* a line that matches a rule of ``start_state`` starts a message; the machine moves to that
  rule's next state;
* while a message is open, a line that matches a rule of the current state is appended and the
  machine moves on; any other line ends the message, and is then tried as a start itself;
* a line that starts nothing and continues nothing passes alone.

With several parsers (``multiline.parser go, java, python``) the first whose start rule matches
owns the message until it ends, as in Fluent Bit. The built-in rule sets are Fluent Bit's
(``src/multiline/flb_ml_parser_{go,python,java,ruby}.c``), written here as data. Lines are
joined with ``\\n``, a trailing newline of each piece removed first (a docker ``log`` ends in
one), so the message reads as the program printed it.

``type endswith`` / ``type equal`` (``match_string``, ``negate``) are Fluent Bit's simpler
parsers: a line that ends with (or equals) the string continues onto the next one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option, Section, resolve_options, ruby_to_python_regex
from kubetrail.core.record import Record

try:  # optional (built from native/): the rules over a block of lines in one call
    from kubetrail_native import LineRules
except ImportError:  # pragma: no cover - depends on the installation (or an older build)
    LineRules = None

START = "start_state"

# (from states, regex, next state), as Fluent Bit defines them.
BUILTIN_RULES: dict[str, list[tuple[str, str, str]]] = {
    "go": [
        ("start_state", r"\bpanic: ", "go_after_panic"),
        ("start_state", r"http: panic serving", "go_goroutine"),
        ("go_after_panic", r"^$", "go_goroutine"),
        ("go_after_panic, go_after_signal, go_frame_1", r"^$", "go_goroutine"),
        ("go_after_panic", r"^\[signal ", "go_after_signal"),
        ("go_goroutine", r"^goroutine \d+ \[[^\]]+\]:$", "go_frame_1"),
        ("go_frame_1", r"^(?:[^\s.:]+\.)*[^\s.():]+\(|^created by ", "go_frame_2"),
        ("go_frame_2", r"^\s", "go_frame_1"),
    ],
    "python": [
        ("start_state", r"^Traceback \(most recent call last\):$", "python"),
        ("python", r"^[\t ]+File ", "python_code"),
        ("python_code", r"[^\t ]", "python"),
        ("python", r"^(?:[^\s.():]+\.)*[^\s.():]+:", "start_state"),
    ],
    "java": [
        (
            "start_state, java_start_exception",
            r"(.)(?:Exception|Error|Throwable|V8 errors stack trace)[:\r\n]",
            "java_after_exception",
        ),
        ("java_after_exception", r"^[\t ]*nested exception is:[\t ]*", "java_start_exception"),
        ("java_after_exception", r"^[\r\n]*$", "java_after_exception"),
        ("java_after_exception, java", r"^[\t ]+(?:eval )?at ", "java"),
        ("java_after_exception, java", r"^[\t ]+--- End of inner exception stack trace ---$", "java"),
        (
            "java_after_exception, java",
            r"^--- End of stack trace from previous location where exception was thrown ---$",
            "java",
        ),
        ("java_after_exception, java", r"^[\t ]*(?:Caused by|Suppressed):", "java_after_exception"),
        ("java_after_exception, java", r"^[\t ]*... \d+ (?:more|common frames omitted)", "java"),
    ],
    "ruby": [
        ("start_state, ruby_start_exception", r"^.+:\d+:in\s+.*", "ruby_after_exception"),
        ("ruby_after_exception, ruby", r"^\s+from\s+.*:\d+:in\s+.*", "ruby"),
    ],
}

MULTILINE_PARSER_OPTIONS: tuple[Option, ...] = (
    Option("name", required=True, help="Name that multiline.parser refers to"),
    Option("type", "choice", "regex", choices=("regex", "endswith", "equal", "eq"), help="Kind of parser"),
    Option("rule", multiple=True, help='"state(s)" "/regex/" "next_state"'),
    Option("flush_timeout", "int", 4000, help="Milliseconds before an unfinished message goes out as it is"),
    Option("key_content", help="Key holding the text (default: the filter's multiline.key_content)"),
    Option("parser", help="Parser applied before the rules (accepted; the records are structured already)"),
    Option("key_pattern", help="Accepted for Fluent Bit compatibility"),
    Option("key_group", help="Accepted for Fluent Bit compatibility"),
    Option("match_string", help="type endswith/equal: the string"),
    Option("negate", "bool", False, help="type endswith/equal: continue when the line does NOT end with it"),
)


@dataclass
class Rule:
    states: tuple[str, ...]
    regex: re.Pattern[str]
    next_state: str


@dataclass
class RuleSet:
    name: str
    rules: list[Rule] = field(default_factory=list)
    flush_ms: int = 4000
    key_content: str | None = None
    # endswith/equal parsers: a line matching continues onto the next line
    match_string: str | None = None
    equal: bool = False
    negate: bool = False
    # Regex rules as (search, next state) per state, built on first use: the state machine runs
    # once per line, and scanning every rule's states there cost more than the regexes.
    _starts: list[tuple[Callable[[str], object], str]] | None = field(default=None, init=False, repr=False)
    _steps: dict[str, list[tuple[Callable[[str], object], str]]] = field(default_factory=dict, init=False, repr=False)

    def starts(self) -> list[tuple[Callable[[str], object], str]]:
        """The ``start_state`` rules in order, as (search, next state)."""
        if self._starts is None:
            self._starts = [(rule.regex.search, rule.next_state) for rule in self.rules if START in rule.states]
        return self._starts

    def steps(self, state: str) -> list[tuple[Callable[[str], object], str]]:
        """The rules that continue a message in ``state``, as (search, next state)."""
        found = self._steps.get(state)
        if found is None:
            found = self._steps[state] = [
                (rule.regex.search, rule.next_state)
                for rule in self.rules
                if state in rule.states and state not in (START, "last")
            ]
        return found

    def start(self, line: str) -> str | None:
        """The next state if ``line`` starts a message, else None."""
        if self.match_string is not None:
            return "cont" if self._continues(line) else None
        for search, following in self.starts():
            if search(line):
                return following
        return None

    def step(self, state: str, line: str) -> str | None:
        """The next state if ``line`` continues the message in ``state``, else None."""
        if state == "last":
            return None
        if self.match_string is not None:
            # The previous line asked for this one; it continues further only if it asks too.
            return "cont" if self._continues(line) else "last"
        for search, following in self.steps(state):
            if search(line):
                return following
        return None

    def _continues(self, line: str) -> bool:
        assert self.match_string is not None
        hit = line == self.match_string if self.equal else line.endswith(self.match_string)
        return hit != self.negate


def _compile(name: str, states: str, pattern: str, next_state: str) -> Rule:
    try:
        regex = re.compile(ruby_to_python_regex(pattern))
    except re.error as exc:
        raise ConfigError(f"multiline parser {name!r}: bad rule regex {pattern!r}: {exc}", key="rule") from None
    return Rule(tuple(s.strip() for s in states.split(",") if s.strip()), regex, next_state.strip())


def builtin(name: str) -> RuleSet:
    return RuleSet(name, [_compile(name, *rule) for rule in BUILTIN_RULES[name]])


_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def from_section(section: Section) -> RuleSet:
    """A ``[MULTILINE_PARSER]`` section (classic or YAML ``multiline_parsers``)."""
    values = resolve_options(section, MULTILINE_PARSER_OPTIONS, "[MULTILINE_PARSER]", ignore=())
    name: str = values["name"]
    kind: str = values["type"]
    ruleset = RuleSet(name, flush_ms=values["flush_timeout"], key_content=values["key_content"])
    if kind in ("endswith", "equal", "eq"):
        if not values["match_string"]:
            raise ConfigError(f"multiline parser {name!r}: type {kind} needs match_string", section.location)
        ruleset.match_string = values["match_string"]
        ruleset.equal = kind != "endswith"
        ruleset.negate = values["negate"]
        return ruleset
    for text in values["rule"]:
        parts = _QUOTED.findall(text)
        if len(parts) != 3:
            raise ConfigError(
                f'multiline parser {name!r}: a rule is "state" "/regex/" "next_state", got {text!r}',
                section.location_of("rule"),
                "rule",
            )
        ruleset.rules.append(_compile(name, *parts))
    if not any(START in rule.states for rule in ruleset.rules):
        raise ConfigError(
            f'multiline parser {name!r} needs a rule from "start_state"', section.location_of("rule"), "rule"
        )
    return ruleset


class LineJoiner:
    """The state of one stream (a tag): the open message, if any, across several rule sets."""

    def __init__(self, rulesets: list[RuleSet]) -> None:
        self.rulesets = rulesets
        self.active: RuleSet | None = None
        self.state = ""

    def feed(self, line: str) -> str:
        """What ``line`` does: ``"append"`` (continues the open message), ``"start"`` (the open
        message, if any, ended before it and it starts a new one) or ``"alone"`` (the open
        message, if any, ended before it and it passes alone)."""
        text = line[:-1] if line.endswith("\n") else line
        active = self.active
        if active is not None:
            following = active.step(self.state, text)
            if following is not None:
                self.state = following
                return "append"
            self.active = None
        for ruleset in self.rulesets:
            state = ruleset.start(text)
            if state is not None:
                self.active, self.state = ruleset, state
                return "start"
        return "alone"

    def feed_many(self, lines: list[Any]) -> list[str]:
        """:meth:`feed` of each line in order: the same actions, and ``"pass"`` for a value that
        is not text (it ends the open message). The loop that runs once per line of a multiline
        filter: regex rules are looked up once per change of state, not per line, and no
        method is called per line but the regexes' own."""
        if any(ruleset.match_string is not None for ruleset in self.rulesets):
            return [self.feed(line) if isinstance(line, str) else self._pass() for line in lines]
        actions: list[str] = []
        act = actions.append
        starts = [(ruleset, ruleset.starts()) for ruleset in self.rulesets]
        active, state = self.active, self.state
        steps = active.steps(state) if active is not None else []
        following: str | None
        for line in lines:
            if not isinstance(line, str):
                active = None
                act("pass")
                continue
            text = line[:-1] if line[-1:] == "\n" else line
            if active is not None:
                for search, following in steps:  # noqa: B007 - the rule that matched is used below
                    if search(text):
                        break
                else:
                    following = None
                if following is not None:
                    if following != state:
                        state, steps = following, active.steps(following)
                    act("append")
                    continue
                active = None
            for ruleset, rules in starts:
                for search, following in rules:
                    if search(text):
                        active, state, steps = ruleset, following, ruleset.steps(following)
                        break
                if active is not None:
                    act("start")
                    break
            else:
                act("alone")
        self.active, self.state = active, (state if active is not None else "")
        return actions

    def _pass(self) -> str:
        self.end()
        return "pass"

    def end(self) -> None:
        self.active = None
        self.state = ""


# Pattern text Rust's ``regex`` reads otherwise than Python's ``re`` without failing to compile:
# a class inside a class or a set operation (``[[:alpha:]]``, ``[a&&b]``, ``[a--b]``, ``[a~~b]``),
# the word-start/end assertions ``\<``, ``\>``, ``\b{...}`` (literal ``<`` and ``>`` in ``re``),
# verbose mode (whitespace inside a class), and non-ASCII text (case folding). Such a rule set
# stays with Python's ``re``.
_UNSAFE = re.compile(r"\\[<>]|\\b\{|\(\?[a-zA-Z-]*x|[^\x00-\x7f]")


def _rust_reads_as_python(pattern: str) -> bool:
    """Whether ``pattern`` (Python syntax) means the same to Rust's ``regex`` where both compile it
    (on ASCII text: see native/src/multilines.rs for the rest)."""
    if _UNSAFE.search(pattern):
        return False
    in_class, index = False, 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            index += 2
            continue
        if not in_class:
            if char == "[":
                in_class = True
                index += 1
                if pattern[index : index + 1] == "^":
                    index += 1
                if pattern[index : index + 1] == "]":  # a leading "]" is literal in both
                    index += 1
                continue
        elif char == "[" or pattern[index : index + 2] in ("&&", "--", "~~"):
            return False
        elif char == "]":
            in_class = False
        index += 1
    return True


class NativeRules:
    """Regex rule sets as the native state machine (``kubetrail_native.LineRules``): each
    (rule set, state) a number, each rule's pattern compiled by Rust's ``regex``. It walks a block
    of lines as :meth:`LineJoiner.feed_many` does, from and to a :class:`LineJoiner`'s state, and
    writes the joined messages as JSON lines. :meth:`of` gives None where it cannot take the rule
    sets: no native module, an ``endswith``/``equal`` parser, or a pattern Rust compiles otherwise
    or not at all; the filter then stays on its record path."""

    def __init__(self, rulesets: list[RuleSet]) -> None:
        rules: list[Rule] = []
        self.states: list[tuple[RuleSet, str]] = []
        self.ids: dict[tuple[int, str], int] = {}
        for ruleset in rulesets:
            for rule in ruleset.rules:
                rules.append(rule)
                if (id(ruleset), rule.next_state) not in self.ids:
                    self.ids[(id(ruleset), rule.next_state)] = len(self.states)
                    self.states.append((ruleset, rule.next_state))
        index = {id(rule): n for n, rule in enumerate(rules)}
        starts = [
            (index[id(rule)], self.ids[(id(ruleset), rule.next_state)])
            for ruleset in rulesets
            for rule in ruleset.rules
            if START in rule.states
        ]
        # As RuleSet.steps: the rules of a state, none from start_state or "last".
        steps = [
            [
                (index[id(rule)], self.ids[(id(ruleset), rule.next_state)])
                for rule in ruleset.rules
                if state in rule.states and state not in (START, "last")
            ]
            for ruleset, state in self.states
        ]
        self.searches = [rule.regex.search for rule in rules]
        assert LineRules is not None
        self.native: Any = LineRules([rule.regex.pattern for rule in rules], starts, steps)

    @classmethod
    def of(cls, rulesets: list[RuleSet]) -> NativeRules | None:
        if LineRules is None or not rulesets:
            return None
        for ruleset in rulesets:
            if ruleset.match_string is not None:
                return None
            if not all(_rust_reads_as_python(rule.regex.pattern) for rule in ruleset.rules):
                return None
        try:
            return cls(rulesets)
        except ValueError:  # a pattern Rust's regex does not take (look-around, ...)
            return None

    def search(self, rule: int, text: str) -> bool:
        """Python's verdict, for the lines the native walk does not decide itself."""
        return self.searches[rule](text) is not None

    def state_of(self, joiner: LineJoiner) -> int:
        """The joiner's open message as a state number (-1: none)."""
        if joiner.active is None:
            return -1
        return self.ids[(id(joiner.active), joiner.state)]

    def set_state(self, joiner: LineJoiner, state: int) -> None:
        if state < 0:
            joiner.end()
        else:
            joiner.active, joiner.state = self.states[state]


@dataclass
class _Open:
    """The message a :class:`RegexLogJoiner` has open."""

    start: int  # file offset of its first line
    since: float  # monotonic time of its first line, for the flush timeout
    time_ns: int
    lines: list[str] = field(default_factory=list)
    size: int = 0


class RegexLogJoiner:
    """``tail``'s ``multiline.parser`` with regex parsers (``java``, ``[MULTILINE_PARSER]``, ...):
    lines of a file joined into messages, with the interface of the container joiner
    (:class:`kubetrail.parsers.multiline.ContainerLogJoiner`) so the tail keeps its checkpoints
    exact the same way: one "stream" (``""``) whose open message's first offset is where a restart
    resumes, and lines delivered before a restart are read again only to rebuild that message.

    A record is ``{key: text}`` (no parser: Fluent Bit's tail does the same), timed when its first
    line was read, identified by the file and the offset of its first line.
    """

    STREAM = ""

    def __init__(self, rulesets: list[RuleSet], max_size: int, truncate: bool, key: str = "log", uid: str = "") -> None:
        self.lines = LineJoiner(rulesets)
        self.max_size = max_size
        self.truncate = truncate
        self.key = key
        self.uid = uid
        self.pending: dict[str, _Open] = {}
        self.replay_until = -1
        self.replay_streams: dict[str, int] = {}

    def pending_starts(self) -> dict[str, int]:
        return {stream: entry.start for stream, entry in self.pending.items()}

    def replay(self, emitted: int, streams: dict[str, int]) -> None:
        self.replay_until = emitted
        self.replay_streams = dict(streams)

    def reset(self) -> None:
        self.pending.clear()
        self.lines.end()
        self.replay_until = -1
        self.replay_streams = {}

    def process(self, lines: list[bytes], start: int, tag: str, stats: Any) -> list[Record]:
        records: list[Record] = []
        position = start
        for raw in lines:
            line_start = position
            position += len(raw) + 1
            if self.replay_until > line_start:
                since = self.replay_streams.get(self.STREAM)
                if since is None or line_start < since:
                    continue  # delivered before the restart, and no open message needs it
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                stats.bad_utf8 += 1
                text = raw.decode("utf-8", "replace")
            action = self.lines.feed(text)
            if action == "append" and self.STREAM in self.pending:
                entry = self.pending[self.STREAM]
                entry.lines.append(text)
                entry.size += len(raw) + 1
                continue
            finished = self._finish(tag, stats)
            if finished is not None:
                records.append(finished)
            if action == "start":
                self.pending[self.STREAM] = _Open(line_start, time.monotonic(), time.time_ns(), [text], len(raw))
            else:
                records.append(Record(tag, time.time_ns(), {self.key: text}, None, (self.uid, line_start)))
        if self.replay_until >= 0 and position >= self.replay_until:
            self.replay_until = -1
        return records

    def _finish(self, tag: str, stats: Any) -> Record | None:
        entry = self.pending.pop(self.STREAM, None)
        if entry is None:
            return None
        text = "\n".join(entry.lines)
        if entry.size > self.max_size:
            if not self.truncate:
                stats.long_skipped += 1
                return None
            stats.long_truncated += 1
            text = text.encode()[: self.max_size].decode("utf-8", "ignore")
        return Record(tag, entry.time_ns, {self.key: text}, None, (self.uid, entry.start))

    def flush(self, older_than: float, tag: str, stats: Any) -> list[Record]:
        entry = self.pending.get(self.STREAM)
        if entry is None or entry.since > older_than:
            return []
        self.lines.end()
        record = self._finish(tag, stats)
        return [record] if record is not None else []
