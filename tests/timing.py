"""Deadlines for the tests that wait on something: long enough on a loaded machine, still finite.

CI runs the suite on a shared 2-core machine beside the real node's tests and other work (load
averages of 10-25 were seen); a JVM server then takes minutes to start and an HTTP answer tens
of seconds. A test must not fail because of that, and must still fail when the code is wrong.
So the tests wait on the *condition* (the wait ends as soon as it holds, a passing run is no
slower) and only the *deadline*, the point at which the test gives up and fails, is stretched:

* :func:`factor` is ``KUBETRAIL_TEST_TIME_FACTOR`` when set (CI or a person sets it for a slow
  machine), else the 1-minute load average per core, at least 1 and at most
  :data:`MAX_LOAD_FACTOR` (so a wedged test on a loaded machine still ends in a bounded time).
* :func:`scaled` multiplies a deadline by it; :func:`wait_for` polls a condition until such a
  deadline and fails naming what it waited for and for how long.

What is never scaled: an assertion's value (counts, contents, "nothing more arrives within N s"
windows), so a wrong result fails exactly as before; only its wait for the right result is longer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

FACTOR_ENV = "KUBETRAIL_TEST_TIME_FACTOR"
MAX_LOAD_FACTOR = 6.0  # load 12 on 2 cores: a 60 s deadline becomes 6 minutes, no more


def factor() -> float:
    """How many times longer than on an idle machine a deadline is given (>= 1)."""
    explicit = os.environ.get(FACTOR_ENV, "").strip()
    if explicit:
        try:
            value = float(explicit)
        except ValueError:
            raise ValueError(f"{FACTOR_ENV}={explicit!r}: not a number (e.g. 3)") from None
        return max(1.0, value)
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return 1.0
    return max(1.0, min(load, MAX_LOAD_FACTOR))


def scaled(seconds: float) -> float:
    """``seconds`` as a deadline on this machine now: :func:`factor` times it."""
    return seconds * factor()


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``check`` until it returns something truthy (returned), for up to :func:`scaled`
    ``timeout``; an ``AssertionError`` naming ``what`` and the time waited otherwise."""
    limit = scaled(timeout)
    deadline = time.monotonic() + limit
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit:.0f} s waiting for {what}; last: {answer!r}")
        time.sleep(interval)
