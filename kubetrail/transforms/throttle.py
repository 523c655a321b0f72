"""The ``throttle`` filter: drop records above an average rate over a sliding window.

The algorithm of Fluent Bit's ``plugins/filter_throttle`` (``throttle.c``, ``window.c``): time is
cut into panes of ``interval``; the window holds the last ``window`` panes and counts the
records let through in each. A record is dropped when the window's total divided by the number
of panes (``window``, also while fewer have passed) has reached ``rate``; otherwise it is
counted in the current pane and kept. So ``rate 1000``, ``window 300``, ``interval 1s`` lets an
average of 1000 records a second through over 5 minutes, and bursts up to the unused
allowance of the window (300,000 records at once after a quiet start, exactly as Fluent Bit).

Fluent Bit moves to the next pane from a thread ticking every ``interval``; here the pane is
worked out from a monotonic clock whenever records arrive (the same panes, with no thread to
stop, and immune to wall clock jumps). ``print_status on`` logs the limit and the current rate
every interval, from a task started with the pipeline.

Fluent Bit's own parsing is kept where it differs from a plain reading: a ``rate`` of 1 or less
means 1, a ``window`` of 1 or less means 5 (both are logged when they apply). A value that is
not a number is a configuration error here (Fluent Bit silently uses its default).

Dropped records are counted by the router as ``kubetrail_records_dropped_total{reason="filtered"}``
like those of ``grep``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from kubetrail.core.component import ComponentContext, Transform
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Record
from kubetrail.core.values import parse_duration

DEFAULT_RATE = 1.0
DEFAULT_WINDOW = 5


class ThrottleTransform(Transform):
    plugin_name = "throttle"
    description = "Drops records above an average rate over a sliding window of intervals"
    options = (
        Option("rate", "float", DEFAULT_RATE, help="Average records per interval let through"),
        Option("window", "int", DEFAULT_WINDOW, help="Intervals the average is taken over"),
        Option("interval", "str", "1", help="Length of one interval: seconds, or with s, m, h, d"),
        Option("print_status", "bool", False, help="Log the limit and the current rate every interval"),
    )

    def __init__(
        self, ctx: ComponentContext, config: dict[str, Any], clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(ctx, config)
        rate: float = config["rate"]
        window: int = config["window"]
        if not rate > 0:
            raise ConfigError(f"bad value {rate}; expected a positive number", key="rate")
        if window < 1:
            raise ConfigError(f"bad value {window}; expected a positive whole number", key="window")
        try:
            self.interval = parse_duration(config["interval"])
        except ValueError as exc:
            raise ConfigError(str(exc), key="interval") from None
        if self.interval <= 0:
            raise ConfigError("bad value 0; the interval must be longer than 0", key="interval")
        if rate <= 1 and rate != DEFAULT_RATE:
            self.log.warning("rate %s is read as 1, as Fluent Bit does", rate, extra={"component": ctx.component_id})
        if window <= 1:
            self.log.warning(
                "window %s is read as %s, as Fluent Bit does",
                window,
                DEFAULT_WINDOW,
                extra={"component": ctx.component_id},
            )
        self.rate = rate if rate > 1 else DEFAULT_RATE
        self.window = window if window > 1 else DEFAULT_WINDOW
        self.print_status: bool = config["print_status"]
        self.clock = clock
        self._start = clock()
        self._pane = 0  # index of the current pane since start
        self._panes: deque[int] = deque([0], maxlen=self.window)
        self._total = 0
        self._ticker: asyncio.Task[None] | None = None

    def _advance(self) -> bool:
        """Move to the pane the clock is in; True if it changed."""
        pane = int((self.clock() - self._start) / self.interval)
        passed = pane - self._pane
        if passed <= 0:
            return False
        for _ in range(min(passed, self.window)):
            self._panes.append(0)  # the oldest pane leaves the window
        self._pane = pane
        self._total = sum(self._panes)
        return True

    def process(self, records: list[Record]) -> list[Record]:
        self._advance()
        # Fluent Bit keeps a record while total / window < rate: that is every record until the
        # total reaches rate * window (a fractional rest still lets one more through).
        room = max(math.ceil(self.rate * self.window - self._total), 0)
        kept = records if room >= len(records) else records[:room]
        self._panes[-1] += len(kept)
        self._total += len(kept)
        return kept

    def status(self) -> str:
        return (
            f"limit is {self.rate:.2f} per {self.interval:g}s with window size of {self.window}, "
            f"current rate is: {self._total // self.window} per interval"
        )

    async def start(self) -> None:
        if self.print_status:
            self._ticker = asyncio.create_task(self._tick(), name=f"throttle-status-{self.ctx.component_id}")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._advance()
            self.log.info(self.status(), extra={"component": self.ctx.component_id})

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
            self._ticker = None
