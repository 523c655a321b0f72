"""tests/timing.py: deadlines stretch on a loaded machine, conditions do not."""

from __future__ import annotations

import os
import time

import pytest

from tests import timing


def test_factor_from_the_environment_at_least_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(timing.FACTOR_ENV, "3.5")
    assert timing.factor() == 3.5
    assert timing.scaled(10) == 35
    monkeypatch.setenv(timing.FACTOR_ENV, "0.1")  # never shorter than on an idle machine
    assert timing.factor() == 1.0


def test_a_factor_that_is_not_a_number_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(timing.FACTOR_ENV, "fast")
    with pytest.raises(ValueError, match="KUBETRAIL_TEST_TIME_FACTOR='fast': not a number"):
        timing.factor()


def test_factor_follows_the_load_per_core_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(timing.FACTOR_ENV, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for load, expected in ((0.5, 1.0), (6.0, 3.0), (50.0, timing.MAX_LOAD_FACTOR)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert timing.factor() == expected


def test_wait_for_returns_as_soon_as_the_condition_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(timing.FACTOR_ENV, "100")  # a long deadline does not slow a passing wait
    calls = iter([None, 0, "ready"])
    started = time.monotonic()
    assert timing.wait_for(lambda: next(calls), 60, "ready", interval=0.01) == "ready"
    assert time.monotonic() - started < 5


def test_wait_for_fails_naming_what_and_how_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(timing.FACTOR_ENV, "2")
    started = time.monotonic()
    with pytest.raises(AssertionError, match="timed out after 0 s waiting for the thing"):
        timing.wait_for(lambda: False, 0.2, "the thing", interval=0.01)
    assert time.monotonic() - started >= 0.4  # the deadline was stretched (2 x 0.2 s), then it failed
