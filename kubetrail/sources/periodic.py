"""What the host metric inputs (``cpu``, ``mem``) share: a collector that makes one record every
``interval_sec`` + ``interval_nsec``, and reading ``/proc``.

Not a plugin. Ticks are scheduled against the monotonic clock from the start (as ``dummy``
does), so the records do not drift; while the pipeline is slow to take a record, missed ticks
are skipped, not made up for in a burst. ``proc_root`` (default ``/proc``) is read on every
tick: nothing is cached, since the values are what changes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from kubetrail.core.component import ComponentContext, Emitter, Source
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record

INTERVAL_OPTIONS = (
    Option("interval_sec", "int", 1, help="Seconds between records (with interval_nsec)"),
    Option("interval_nsec", "int", 0, help="Nanoseconds between records (with interval_sec)"),
    Option("pid", "int", 0, help="Measure this process instead of (cpu) or besides (mem) the host; 0: none"),
)


async def stopped_before(stop: asyncio.Event, due: float) -> bool:
    """Wait until the loop time ``due``; True when ``stop`` was set first (the collector ends)."""
    delay = due - asyncio.get_running_loop().time()
    if delay <= 0:
        return stop.is_set()
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except TimeoutError:
        return False
    return True


class PeriodicSource(Source):
    """Calls :meth:`sample` every period and sends the body it returns as one record (None:
    nothing this time)."""

    proc_root = "/proc"

    def __init__(self, ctx: ComponentContext, config: dict[str, Any], period: float) -> None:
        super().__init__(ctx, config)
        self.tag: str = config["tag"]
        self.period = period
        self.pid: int = max(0, config["pid"])
        self._stop = asyncio.Event()

    def sample(self) -> dict[str, Any] | None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stop.set()

    async def run(self, emitter: Emitter) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.period
        while not self._stop.is_set():
            if await stopped_before(self._stop, due):
                return
            body = self.sample()
            if body is not None:
                record = Record(self.tag, time.time_ns(), body)
                await emitter.send(Batch(self.tag, [record], None, 64 * len(body)))
            due += self.period
            now = loop.time()
            if due < now:
                due = now + self.period  # fell behind: skip the missed ticks

    def read(self, relative: str) -> str:
        with open(f"{self.proc_root}/{relative}", encoding="ascii", errors="replace") as file:
            return file.read()
