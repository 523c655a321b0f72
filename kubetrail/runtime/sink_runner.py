"""Runs one sink: a bounded buffer, workers, retries with backoff, acknowledgements, metrics.

Delivery policy, the same for every sink:

* :class:`RetryableError` (and any unexpected exception) is retried with exponential backoff
  and jitter until ``retry_limit`` is used up (``no_limits`` by default: an informational
  pipeline still must not lose data because a backend restarted);
* :class:`PermanentError` is not retried; the batch is counted as dropped;
* after success or a final drop the batch's token is released, so the source's checkpoint
  can move. A batch that never finished (shutdown during a retry) is *not* released and is
  therefore replayed by its source next time.

State changes (failing -> recovered) are logged once, not once per attempt.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from kubetrail.core.component import Sink
from kubetrail.core.errors import PermanentError
from kubetrail.core.metrics import ComponentMetrics
from kubetrail.core.record import Batch

BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0


class SinkRunner:
    def __init__(
        self,
        sink: Sink,
        component_id: str,
        metrics: ComponentMetrics,
        logger: logging.Logger,
        retry_limit: int | None,
        workers: int = 1,
        max_batches: int = 16,
        backoff_base: float = BACKOFF_BASE,
    ) -> None:
        self.sink = sink
        self.component_id = component_id
        self.metrics = metrics
        self.log = logger
        self.retry_limit = retry_limit  # None: retry forever
        self.workers = max(1, workers)
        self.backoff_base = backoff_base
        self._queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=max_batches)
        self._tasks: list[asyncio.Task[None]] = []
        self._failing = False
        self._buffered_records = 0
        self._buffered_bytes = 0
        self._started = False

    async def enqueue(self, batch: Batch) -> None:
        """Waits while the buffer is full: that wait is the backpressure sources feel."""
        self._buffered_records += len(batch)
        self._buffered_bytes += batch.size_bytes
        self.metrics.records_in.inc(len(batch))
        self.metrics.bytes_in.inc(batch.size_bytes)
        self._update_gauges()
        await self._queue.put(batch)

    def start(self) -> None:
        for index in range(self.workers):
            self._tasks.append(asyncio.create_task(self._work(), name=f"{self.component_id}.worker{index}"))

    async def drain(self) -> None:
        """Deliver what is buffered, then stop the workers."""
        for _ in self._tasks:
            await self._queue.put(None)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def _work(self) -> None:
        await self._start_sink()
        while True:
            batch = await self._queue.get()
            if batch is None:
                return
            await self._deliver(batch)
            self._buffered_records -= len(batch)
            self._buffered_bytes -= batch.size_bytes
            self._update_gauges()

    async def _start_sink(self) -> None:
        if self._started:
            return
        self._started = True
        attempt = 0
        while True:
            try:
                await self.sink.start()
                return
            except Exception as exc:
                attempt += 1
                self.metrics.error("start")
                delay = self._backoff(attempt)
                self.log.error("sink failed to start, retrying", extra={"error": str(exc), "retry_in": delay})
                await asyncio.sleep(delay)

    async def _deliver(self, batch: Batch) -> None:
        attempt = 0
        while True:
            try:
                await self.sink.write(batch)
            except PermanentError as exc:
                self.metrics.error("permanent")
                self.metrics.dropped(len(batch), "rejected")
                self.log.error(
                    "batch rejected permanently; dropped",
                    extra={"error": str(exc), "records": len(batch)},
                )
                self._finish(batch, delivered=False)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                self.metrics.error(type(exc).__name__)
                if self.retry_limit is not None and attempt > self.retry_limit:
                    self.metrics.dropped(len(batch), "retry_limit")
                    self.log.error(
                        "delivery failed and retry_limit is used up; batch dropped",
                        extra={"error": str(exc), "records": len(batch), "attempts": attempt},
                    )
                    self._failing = True
                    self._finish(batch, delivered=False)
                    return
                delay = self._backoff(attempt)
                if not self._failing:
                    self.log.warning(
                        "delivery failed; retrying with backoff", extra={"error": str(exc), "retry_in": round(delay, 2)}
                    )
                    self._failing = True
                self.metrics.retries.inc()
                await asyncio.sleep(delay)
                continue
            if self._failing:
                self.log.info("delivery recovered", extra={"attempts": attempt + 1})
                self._failing = False
            self.metrics.records_out.inc(len(batch))
            self.metrics.bytes_out.inc(batch.size_bytes)
            self.metrics.batch_latency.observe(time.monotonic() - batch.created)
            self._finish(batch, delivered=True)
            return

    def _backoff(self, attempt: int) -> float:
        ceiling = min(BACKOFF_CAP, self.backoff_base * (2 ** min(attempt - 1, 16)))
        return random.uniform(ceiling / 2, ceiling)  # "equal jitter": never zero, never in lockstep

    def _finish(self, batch: Batch, delivered: bool) -> None:
        if batch.ack is not None:
            batch.ack.release(delivered)

    def _update_gauges(self) -> None:
        self.metrics.buffer_records.set(self._buffered_records)
        self.metrics.buffer_bytes.set(self._buffered_bytes)
