"""The ``dummy`` input: the same record over and over, with Fluent Bit's ``in_dummy`` timing.

Every tick emits ``copies`` records whose body is the ``dummy`` JSON object (and, in
``meta["metadata"]``, the ``metadata`` object: Fluent Bit's log-event metadata). The tick is
``interval_sec`` + ``interval_nsec`` when either is set, else ``1/rate`` seconds (``rate`` above
1), else one second. ``samples`` limits the number of ticks (0: no limit); after the last one
the input stays idle, as Fluent Bit's does (it does not end the pipeline). ``flush_on_startup``
emits the first tick at once instead of after one period.

Timestamps, as Fluent Bit computes them: with ``start_time_sec``/``start_time_nsec`` (either
>= 0), the first record is stamped at that time and later ones move on with the clock from there
(start + time since start-up); otherwise the current time. ``fixed_timestamp on`` stamps every
record with the first timestamp.

Ticks are scheduled against the monotonic clock from the start, not "sleep a period after each
send", so ``rate 1000`` gives 1,000 ticks a second while the pipeline keeps up; while it does not
(``send`` waits on full buffers), ticks are not made up for later. ``dummy`` that is not a JSON
object is a configuration error (Fluent Bit falls back to ``{"message":"dummy"}`` with a warning).
"""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import orjson

from kubetrail.core.component import ComponentContext, Emitter, Source
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.sources.periodic import stopped_before

DEFAULT_MESSAGE = '{"message":"dummy"}'


def _json_object(text: str, key: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc}", key=key) from None
    if not isinstance(value, dict):
        raise ConfigError("must be a JSON object ({...})", key=key)
    return value


class DummySource(Source):
    plugin_name = "dummy"
    description = "Generates the same record at a fixed rate (testing, load generation)"
    options = (
        Option("dummy", "str", DEFAULT_MESSAGE, help="The record, a JSON object"),
        Option("metadata", "str", "{}", help="Log-event metadata, a JSON object"),
        Option("rate", "int", 1, help="Ticks per second (when no interval is set)"),
        Option("interval_sec", "int", 0, help="Seconds between ticks (with interval_nsec; overrides rate)"),
        Option("interval_nsec", "int", 0, help="Nanoseconds between ticks (with interval_sec)"),
        Option("samples", "int", 0, help="Number of ticks, then idle (0: no limit)"),
        Option("copies", "int", 1, help="Records per tick"),
        Option("start_time_sec", "int", -1, help="Timestamp of the first record, seconds (-1: now)"),
        Option("start_time_nsec", "int", -1, help="Timestamp of the first record, nanoseconds part (-1: now)"),
        Option("fixed_timestamp", "bool", False, help="Stamp every record with the first timestamp"),
        Option("flush_on_startup", "bool", False, help="Emit the first tick at start instead of after one period"),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.tag: str = config["tag"]
        self.body = _json_object(config["dummy"], "dummy")
        self.metadata = _json_object(config["metadata"], "metadata")
        interval_sec, interval_nsec = config["interval_sec"], config["interval_nsec"]
        if interval_sec < 0 or interval_nsec < 0:
            interval_sec = interval_nsec = 0  # Fluent Bit overrides illegal intervals with the default
        if interval_sec > 0 or interval_nsec > 0:
            self.period = interval_sec + interval_nsec / 1e9
        elif config["rate"] > 1:
            self.period = 1.0 / config["rate"]
        else:
            self.period = 1.0
        self.samples: int = max(0, config["samples"])
        self.copies: int = config["copies"]
        if self.copies < 1:
            raise ConfigError("must be at least 1", key="copies")
        start_sec, start_nsec = config["start_time_sec"], config["start_time_nsec"]
        self.start_ns: int | None = None
        if start_sec >= 0 or start_nsec >= 0:
            self.start_ns = max(0, start_sec) * 1_000_000_000 + max(0, start_nsec)
        self.fixed: bool = config["fixed_timestamp"]
        self.flush_on_startup: bool = config["flush_on_startup"]
        self.ticks = 0
        self._base_ns = time.time_ns()
        self._fixed_ns: int | None = None
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def _timestamp(self) -> int:
        if self.fixed:
            if self._fixed_ns is None:
                self._fixed_ns = self.start_ns if self.start_ns is not None else self._base_ns
            return self._fixed_ns
        if self.start_ns is not None:
            return self.start_ns + (time.time_ns() - self._base_ns)
        return time.time_ns()

    def _tick_batch(self) -> Batch:
        stamp = self._timestamp()
        meta = {"metadata": self.metadata} if self.metadata else None
        # A copy per record: filters change bodies in place, and one record's change must not
        # show up in the next.
        records = [Record(self.tag, stamp, copy.deepcopy(self.body), None, None, meta) for _ in range(self.copies)]
        return Batch(self.tag, records, None, len(self.config["dummy"]) * self.copies)

    async def run(self, emitter: Emitter) -> None:
        self._base_ns = time.time_ns()
        loop = asyncio.get_running_loop()
        start = loop.time()
        due = start if self.flush_on_startup else start + self.period
        while not self._stop.is_set():
            if self.samples and self.ticks >= self.samples:
                await self._stop.wait()  # idle, as Fluent Bit's collector after the last sample
                return
            if await stopped_before(self._stop, due):
                return
            await emitter.send(self._tick_batch())
            self.ticks += 1
            due += self.period
            now = loop.time()
            if due < now - self.period:
                due = now  # fell behind (full buffers): do not burst to catch up
