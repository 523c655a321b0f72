"""The ``throttle`` filter against Fluent Bit's ``filter_throttle`` (``throttle.c``, ``window.c``)
and its documentation, with a clock the tests move."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from kubetrail.core.component import ComponentContext
from kubetrail.core.config import load_config
from kubetrail.core.errors import ConfigError
from kubetrail.core.metrics import MetricsRegistry
from kubetrail.core.options import resolve_options
from kubetrail.core.record import Record
from kubetrail.parsers.registry import ParserRegistry
from kubetrail.runtime.pipeline import Pipeline
from kubetrail.transforms.throttle import ThrottleTransform
from tests.unit.helpers import build, section
from tests.unit.run_helpers import out_file_records, run_config, tail_to_out_file


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, **options: Any) -> ThrottleTransform:
    sec = section("filter", **options)
    ctx = ComponentContext("throttle.0", MetricsRegistry().component("throttle.0", "transform", "throttle"),
                           logging.getLogger("kubetrail.test"), ParserRegistry(), section=sec)  # fmt: skip
    return ThrottleTransform(ctx, resolve_options(sec, ThrottleTransform.options, "throttle"), clock=clock)


def records(count: int) -> list[Record]:
    return [Record("t", 1, {"n": n}) for n in range(count)]


def test_burst_is_the_windows_allowance_and_panes_slide_out() -> None:
    # throttle_data(): keep while total / window < rate; the window has `window` panes of
    # `interval`, so a quiet start allows rate * window records at once.
    clock = Clock()
    throttle = make(clock, rate=2, window=3, interval="1s")
    assert [r.body["n"] for r in throttle.process(records(10))] == [0, 1, 2, 3, 4, 5]
    assert throttle.process(records(1)) == []
    clock.now += 1  # a new pane; the 6 are still in the window
    assert throttle.process(records(5)) == []
    clock.now += 1
    assert throttle.process(records(5)) == []
    clock.now += 1  # the pane holding the 6 leaves the window (3 panes)
    assert len(throttle.process(records(10))) == 6


def test_steady_rate_passes_and_excess_is_dropped() -> None:
    clock = Clock()
    throttle = make(clock, rate=5, window=2, interval="1s")
    kept = []
    for _ in range(10):
        clock.now += 1
        kept.append(len(throttle.process(records(7))))
    # window_add()/throttle_data(): 7 fill an empty window of 2 panes (allowance 10); the next
    # pane may add 3 (total 10); when the pane of 7 slides out, 7 fit again: 5 a second on average.
    assert kept == [7, 3, 7, 3, 7, 3, 7, 3, 7, 3]


def test_fractional_rate_and_long_gap() -> None:
    clock = Clock()
    throttle = make(clock, rate=1.5, window=2, interval="1m")
    assert len(throttle.process(records(5))) == 3  # total < 3: 0, 1, 2 pass
    clock.now += 59
    assert throttle.process(records(1)) == []  # still the same pane (interval 1m)
    clock.now += 3600  # far more than the window: everything slid out
    assert len(throttle.process(records(5))) == 3


def test_fluent_bit_defaults_and_quirks() -> None:
    clock = Clock()
    default = make(clock)  # rate 1, window 5, interval 1s
    assert (default.rate, default.window, default.interval) == (1.0, 5, 1.0)
    assert len(default.process(records(9))) == 5
    # configure(): a rate of 1 or less is 1, a window of 1 or less is 5.
    quirky = make(clock, rate=0.5, window=1)
    assert (quirky.rate, quirky.window) == (1.0, 5)
    assert make(clock, interval="2h").interval == 7200


def test_status_line() -> None:
    clock = Clock()
    throttle = make(clock, rate=10, window=4, interval="1s", print_status="on")
    throttle.process(records(20))
    assert throttle.status() == "limit is 10.00 per 1s with window size of 4, current rate is: 5 per interval"


def test_bad_options_name_the_key() -> None:
    for options, key in (
        ({"rate": "fast"}, "rate"),
        ({"rate": "-3"}, "rate"),
        ({"window": "0"}, "window"),
        ({"window": "2.5"}, "window"),
        ({"interval": "soon"}, "interval"),
        ({"interval": "0"}, "interval"),
        ({"print_status": "loud"}, "print_status"),
        ({"limit": "5"}, "limit"),
    ):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            build(ThrottleTransform, **options)


async def test_drops_are_counted_as_filtered(tmp_path: Path) -> None:
    config = tail_to_out_file(
        tmp_path,
        [f'{{"n":{n}}}' for n in range(50)],
        "[FILTER]\n    name throttle\n    match *\n    rate 4\n    window 5\n    interval 1m\n",
    )
    pipeline = Pipeline(load_config(config))
    assert await pipeline.run() == 0
    text = generate_latest(pipeline.metrics.registry).decode()
    dropped = [line for line in text.splitlines() if line.startswith("kubetrail_records_dropped_total{")]
    assert dropped == [
        'kubetrail_records_dropped_total{component="throttle.0",kind="transform",plugin="throttle",'
        'reason="filtered"} 30.0'
    ]
    assert [body["n"] for _, _, body in out_file_records(tmp_path / "out" / "out.txt")] == list(range(20))


def test_classic_config_through_kubetrail_run(tmp_path: Path) -> None:
    config = tail_to_out_file(
        tmp_path,
        [f'{{"n":{n}}}' for n in range(100)],
        """
[FILTER]
    Name      throttle
    Match     *
    Rate      10
    Window    3
    Interval  1m
    Print_Status true
""",
    )
    result = run_config(config)
    assert result.returncode == 0, result.stderr
    # One pane of a minute: the window of 3 allows 30 records at once, the rest is dropped.
    assert [body["n"] for _, _, body in out_file_records(tmp_path / "out" / "out.txt")] == list(range(30))
