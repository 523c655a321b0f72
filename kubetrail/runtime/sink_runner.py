"""Runs one sink: buffers, workers, retries with backoff, dead letters, acknowledgements, metrics.

Delivery policy, the same for every sink:

* :class:`RetryableError` (and any unexpected exception: a bug must not lose data) is retried
  with exponential backoff and "equal jitter" (a random wait in ``[c/2, c]`` with
  ``c = min(scheduler.cap, scheduler.base * 2**(attempt-1))``, never zero, never in lockstep
  with other outputs) until ``retry_limit`` is used up (``no_limits`` by default: an
  informational pipeline still must not lose data because a backend restarted). A
  ``retry_after`` on the error (HTTP ``Retry-After``) raises the wait to at least that, up to
  the cap;
* :class:`PermanentError` is not retried: the batch (or, with ``rejected``, only those records;
  the rest counts as delivered) goes to the dead-letter file with the reason when
  ``storage.keep.rejected`` is on (see :mod:`kubetrail.core.dead_letter`), otherwise it is counted as dropped;
* a batch whose ``retry_limit`` is used up is handled the same way (reason ``retry_limit``);
* after success, or once a failed batch is handled for good, the batch's token is released so
  the source's checkpoint can move (``delivered=False`` only when records were really lost:
  dropped without a dead letter). A batch that never finished (shutdown during a retry) is
  *not* released and is therefore replayed next time.

``workers`` deliveries run concurrently, each on its own batch; a failing batch holds only its
own worker, so with several workers the others keep delivering.

A sink that can write several batches in one call (``Sink.group_key`` / ``write_group``: the
file output, one fsync for batches queued for the same file) gets the batches queued right
behind the one a worker takes, up to half the buffer (GROUP_MAX_BATCHES, GROUP_MAX_BYTES, or a
lower ``group_max_bytes`` of the sink's own: the http output, one request per group): a
group commit, so the fsyncs stop limiting a busy output; the other half fills meanwhile. Each
batch of a group is acknowledged after the group's write; a failed group write leaves nothing
behind and its batches then go through the per-batch policy above, one by one.

Two buffers feed the workers: batches from ``memory`` inputs wait in a bounded in-memory buffer
(``max_batches`` queued or being delivered, and at most ``max_bytes`` of their input bytes;
``enqueue`` waits while it is full: that wait is the backpressure the input feels); batches
from ``filesystem`` inputs go through this output's :class:`~.disk_buffer.DiskQueue`, which
acknowledges them once they are on disk and feeds them to the same workers.

The buffer is bounded by bytes as well as by batches because a batch's size is the input's to
choose (tail's ``batch_size``, an audit webhook body, a joined multiline message): 16 batches of
a 64 MB ``batch_size`` would otherwise hold 1 GB. A batch is let in when it fits under
``max_bytes`` or the buffer is empty (so one batch bigger than the limit still passes, alone):
the buffer holds at most ``max(max_bytes, the largest batch)``. With the default 1 MiB tail
batches the 16-batch limit is reached first (16 MiB), so the byte limit changes nothing there.

State changes (failing -> recovered) are logged once, not once per attempt.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from kubetrail.core.component import Sink
from kubetrail.core.dead_letter import DeadLetters
from kubetrail.core.errors import PermanentError
from kubetrail.core.metrics import ComponentMetrics
from kubetrail.core.record import Batch, Record
from kubetrail.runtime.disk_buffer import DiskQueue

BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
# A group write (see Sink.write_group) takes at most this many queued batches / input bytes.
GROUP_MAX_BATCHES = 16
GROUP_MAX_BYTES = 16 * 1024 * 1024
# Input bytes an output's memory buffer holds at most (queued or being delivered); see above.
MAX_BUFFER_BYTES = 64 * 1024 * 1024


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
        *,
        max_bytes: int = MAX_BUFFER_BYTES,
        backoff_cap: float = BACKOFF_CAP,
        spool: DiskQueue | None = None,
        dead_letters: DeadLetters | None = None,
    ) -> None:
        self.sink = sink
        self.component_id = component_id
        self.metrics = metrics
        self.log = logger
        self.retry_limit = retry_limit  # None: retry forever
        self.workers = max(1, workers)
        self.backoff_base = backoff_base
        self.backoff_cap = max(backoff_cap, backoff_base)
        self.spool = spool
        self.dead_letters = dead_letters
        # The buffer: batches queued *or being delivered*, at most max_batches (a group in hand
        # counts too, so grouping does not double the memory a full buffer holds).
        self._queue: asyncio.Queue[Batch | None] = asyncio.Queue()
        self._slots = asyncio.Semaphore(max(1, max_batches))
        self.max_bytes = max(1, max_bytes)
        self._room = asyncio.Event()  # set when a delivery gives bytes back (see _put)
        self._admit = asyncio.Lock()  # one producer at a time waits for room by bytes
        self._group_max = max(1, min(GROUP_MAX_BATCHES, max_batches // 2))  # half: the other fills meanwhile
        self._tasks: list[asyncio.Task[None]] = []
        self._failing = False
        self._buffered_records = 0
        self._buffered_bytes = 0
        self._buffered_batches = 0
        self._started = False
        self._sink_started: asyncio.Future[None] | None = None

    def open(self) -> None:
        """Open (and recover) the filesystem buffer; raises StorageError when it cannot be used."""
        if self.spool is not None:
            self.spool.open()

    async def enqueue(self, batch: Batch, durable: bool = False) -> None:
        """Waits while the buffer is full: that wait is the backpressure sources feel.

        ``durable``: the batch comes from a ``storage.type filesystem`` input; with a filesystem
        buffer it is written there and acknowledged once on disk."""
        if durable and self.spool is not None:
            await self.spool.append(batch)
            return
        await self._put(batch)

    async def _put(self, batch: Batch) -> None:
        # Counted once it has a place: a wait cancelled at shutdown leaves the counts as they were.
        await self._slots.acquire()
        try:
            # Room by bytes too, first come first served (a big batch waiting for room is not
            # overtaken by small ones forever); an empty buffer takes any batch, so one bigger
            # than max_bytes cannot wait forever. No await between this check and the count.
            async with self._admit:
                while self._buffered_batches and self._buffered_bytes + batch.size_bytes > self.max_bytes:
                    self._room.clear()
                    await self._room.wait()
                self._count_in(batch)
        except BaseException:
            self._slots.release()
            raise
        self._queue.put_nowait(batch)

    def _count_in(self, batch: Batch) -> None:
        """``batch`` has its place in the buffer: counted in the gauges and metrics."""
        self._buffered_records += len(batch)
        self._buffered_bytes += batch.size_bytes
        self._buffered_batches += 1
        self.metrics.records_in.inc(len(batch))
        self.metrics.bytes_in.inc(batch.size_bytes)
        self._update_gauges()

    def start(self) -> None:
        for index in range(self.workers):
            self._tasks.append(asyncio.create_task(self._work(), name=f"{self.component_id}.worker{index}"))
        if self.spool is not None:
            self.spool.start(self._put)

    async def drain(self) -> None:
        """Deliver what is buffered (memory and disk), then stop the workers."""
        if self.spool is not None:
            await self.spool.drain()
        for _ in self._tasks:
            await self._queue.put(None)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def undelivered(self) -> int:
        """Records handed to this sink and not yet delivered (queued or being sent)."""
        return self._buffered_records

    @property
    def undelivered_batches(self) -> int:
        """Batches handed to this sink and not yet delivered (queued or being sent)."""
        return self._buffered_batches

    @property
    def spooled_bytes(self) -> int:
        """Bytes the filesystem buffer still holds undelivered (0 without one, or once drained)."""
        if self.spool is None or self.spool.empty:
            return 0
        return self.spool.disk_bytes

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.spool is not None:
            self.spool.close()

    async def _work(self) -> None:
        await self._start_sink()
        batch: Batch | None = None
        while True:
            if batch is None:
                batch = await self._queue.get()
                if batch is None:
                    return
            group, after, stop = self._group(batch)
            if len(group) == 1:
                await self._deliver(batch)
            else:
                await self._deliver_group(group)
            for done in group:
                self._buffered_records -= len(done)
                self._buffered_bytes -= done.size_bytes
                self._buffered_batches -= 1
                self._slots.release()
            self._room.set()
            self._update_gauges()
            if stop:
                return
            batch = after

    def _group(self, batch: Batch) -> tuple[list[Batch], Batch | None, bool]:
        """``batch`` and the batches queued right behind it that the sink can write in the same
        call (same ``group_key``, up to half the buffer / GROUP_MAX_BYTES); the batch taken
        from the queue that does not belong (delivered next); whether the drain's end marker
        was taken (the worker stops after this group)."""
        group_key = getattr(self.sink, "group_key", None)  # None on sinks that are not Sink subclasses
        group = [batch]
        key = group_key(batch) if group_key is not None else None
        if key is None:
            return group, None, False
        assert group_key is not None  # a key came from it
        size = batch.size_bytes
        # A sink may cap its groups lower (``group_max_bytes``: the http output keeps a request
        # within a Fluent Bit chunk's size); a batch then joins only if the group stays within.
        cap: int | None = getattr(self.sink, "group_max_bytes", None)
        limit = GROUP_MAX_BYTES if cap is None else min(cap, GROUP_MAX_BYTES)
        while len(group) < self._group_max and size < limit and not self._queue.empty():
            more = self._queue.get_nowait()
            if more is None:
                return group, None, True
            if group_key(more) != key or (cap is not None and size + more.size_bytes > limit):
                return group, more, False
            group.append(more)
            size += more.size_bytes
        return group, None, False

    async def _deliver_group(self, group: list[Batch]) -> None:
        """Several batches in one write (the file output: one fsync). A failure hands each
        back to :meth:`_deliver`, with its retries, dead letters and metrics: the group write
        leaves nothing behind when it fails (see ``Sink.write_group``)."""
        try:
            await self.sink.write_group(group)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.metrics.error(type(exc).__name__)
            if not self._failing:  # a lasting failure is logged once, by _deliver
                self.log.warning("group write failed; writing its batches one by one", extra={"error": str(exc)})
            for batch in group:
                await self._deliver(batch)
            return
        self._delivered(group, attempts=1)

    async def _start_sink(self) -> None:
        # Several workers share one sink: the first starts it, the others wait for that.
        if self._sink_started is not None:
            await asyncio.shield(self._sink_started)
            return
        self._sink_started = asyncio.get_running_loop().create_future()
        attempt = 0
        while True:
            try:
                await self.sink.start()
                self._sink_started.set_result(None)
                return
            except asyncio.CancelledError:
                raise
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
                rejected = exc.rejected
                if rejected is None:
                    pairs = [(record, str(exc)) for record in batch.records]
                else:
                    pairs = [(record, reason) for record, reason in rejected]
                    self._count_delivered(batch, len(batch) - len(pairs))
                kept = await self._reject(pairs, "rejected", str(exc), len(batch))
                self._finish(batch, delivered=kept)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                self.metrics.error(type(exc).__name__)
                if self.retry_limit is not None and attempt > self.retry_limit:
                    reason = f"retry_limit ({self.retry_limit}) used up; last error: {exc}"
                    kept = await self._reject(
                        [(record, reason) for record in batch.records], "retry_limit", str(exc), len(batch)
                    )
                    self._failing = True
                    self._finish(batch, delivered=kept)
                    return
                delay = self._backoff(attempt, getattr(exc, "retry_after", None))
                if not self._failing:
                    self.log.warning(
                        "delivery failed; retrying with backoff", extra={"error": str(exc), "retry_in": round(delay, 2)}
                    )
                    self._failing = True
                self.metrics.retries.inc()
                await asyncio.sleep(delay)
                continue
            self._delivered([batch], attempts=attempt + 1)
            return

    def _delivered(self, batches: list[Batch], attempts: int) -> None:
        """``batches`` written whole: the end of a failing spell is logged, each is counted and acked."""
        if self._failing:
            self.log.info("delivery recovered", extra={"attempts": attempts})
            self._failing = False
        for batch in batches:
            self._count_delivered(batch, len(batch))
            self._finish(batch, delivered=True)

    def _count_delivered(self, batch: Batch, records: int) -> None:
        if records <= 0:
            return
        self.metrics.records_out.inc(records)
        self.metrics.bytes_out.inc(batch.size_bytes if records == len(batch) else 0)
        self.metrics.batch_latency.observe(time.monotonic() - batch.created)

    async def _reject(self, pairs: list[tuple[Record, str]], kind: str, error: str, batch_size: int) -> bool:
        """Records that will not be delivered: dead-letter them (True) or drop them (False)."""
        if not pairs:
            return True
        if self.dead_letters is not None and await self.dead_letters.write(pairs, kind):
            self.log.error(
                "records rejected; written to the dead-letter file",
                extra={"reason": kind, "error": error, "records": len(pairs), "of": batch_size,
                       "path": str(self.dead_letters.path)},
            )  # fmt: skip
            return True
        self.metrics.dropped(len(pairs), kind)
        self.log.error(
            "records rejected; dropped (storage.keep.rejected is off)",
            extra={"reason": kind, "error": error, "records": len(pairs), "of": batch_size},
        )
        return False

    def _backoff(self, attempt: int, retry_after: float | None = None) -> float:
        ceiling = min(self.backoff_cap, self.backoff_base * (2 ** min(attempt - 1, 32)))
        delay = random.uniform(ceiling / 2, ceiling)  # "equal jitter": never zero, never in lockstep
        if retry_after is not None and retry_after > delay:
            delay = min(float(retry_after), self.backoff_cap)
        return delay

    def _finish(self, batch: Batch, delivered: bool) -> None:
        if batch.ack is not None:
            batch.ack.release(delivered)

    def _update_gauges(self) -> None:
        self.metrics.buffer_records.set(self._buffered_records)
        self.metrics.buffer_bytes.set(self._buffered_bytes)
