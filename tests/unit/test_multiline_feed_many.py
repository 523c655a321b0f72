"""``LineJoiner.feed_many`` (the multiline filter's per-batch loop) gives what ``feed`` gives line
by line, on every built-in rule set, a ``[MULTILINE_PARSER]``'s rules, several rule sets at once,
an ``endswith`` parser, values that are not text, and a state carried from one batch to the next.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from kubetrail.parsers.multiline_rules import BUILTIN_RULES, LineJoiner, RuleSet, builtin, from_section
from tests.unit.helpers import section

LINES = [
    "2026-12-01 12:00:00,001 ERROR request 1 failed: boom",
    "    at com.example.Handler.step0(Handler.java:1)",
    "\tat com.example.Main.main(Main.java:9)",
    "java.lang.IllegalStateException: bad state",
    "Caused by: java.io.IOException: closed",
    "\t... 12 more",
    "Traceback (most recent call last):",
    '  File "app.py", line 3, in <module>',
    "    main()",
    "ValueError: nope",
    "panic: runtime error: index out of range",
    "",
    "[signal SIGSEGV: segmentation violation]",
    "goroutine 1 [running]:",
    "main.main()",
    "\t/app/main.go:12 +0x1d",
    "created by main.start",
    "app.rb:12:in `block in run': undefined method (NoMethodError)",
    "\tfrom app.rb:3:in `run'",
    "a plain line\n",
    "continued \\",
    "another plain line",
]


def custom() -> RuleSet:
    rules = [r'"start_state" "/^\d{4}-\d{2}-\d{2} /" "cont"', r'"cont" "/^\s+at /" "cont"']
    return from_section(section("multiline_parser", name="app_trace", type="regex", rule=rules))


def endswith() -> RuleSet:
    return from_section(section("multiline_parser", name="backslash", type="endswith", match_string="\\"))


RULESETS = {
    **{name: (lambda name=name: [builtin(name)]) for name in BUILTIN_RULES},
    "custom": lambda: [custom()],
    "go,java,python": lambda: [builtin("go"), builtin("java"), builtin("python")],
    "custom,ruby": lambda: [custom(), builtin("ruby")],
    "endswith": lambda: [endswith()],
}


@pytest.mark.parametrize("name", sorted(RULESETS))
def test_feed_many_equals_feed_line_by_line(name: str) -> None:
    rnd = random.Random(name)
    values: list[Any] = [rnd.choice([*LINES, *LINES, None, 7]) for _ in range(3000)]
    one, many = LineJoiner(RULESETS[name]()), LineJoiner(RULESETS[name]())
    expected = []
    for value in values:
        if isinstance(value, str):
            expected.append(one.feed(value))
        else:
            one.end()
            expected.append("pass")
    got: list[str] = []
    for at in range(0, len(values), 97):  # in batches: the state goes on from one to the next
        got += many.feed_many(values[at : at + 97])
    assert got == expected

    def left_open(joiner: LineJoiner) -> tuple[str, str] | None:  # the state matters only then
        return (joiner.active.name, joiner.state) if joiner.active is not None else None

    assert left_open(many) == left_open(one)
    assert {"append", "start", "alone"} <= set(got) or name == "endswith"
