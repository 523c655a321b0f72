"""Acknowledgements: how a source learns that what it emitted has been delivered.

Every batch carries an :class:`AckToken`. The router *retains* the token once per sink the
batch is sent to; each sink *releases* it after durable delivery (fsync, HTTP 2xx, broker ack)
or after the data was handled for good (dropped on the user's ``retry_limit``, dead-lettered).
When the count reaches zero the token's callback runs exactly once.

Sinks finish out of order, but checkpoints (file offsets, resourceVersions) must only ever
cover delivered data. :class:`OrderedAcks` turns out-of-order completions into an in-order
stream of "everything up to position P is delivered", which is what a source stores.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

P = TypeVar("P")


class AckToken:
    """A reference count of outstanding deliveries for one batch.

    A new token holds one reference for the source itself, so that it cannot complete while the
    batch is still being routed; :meth:`seal` gives that reference up once routing is done.

    Two moments can differ: the batch is *delivered* when every reference is released (then the
    :meth:`on_complete` hooks run), and the source is *told* (its callback: checkpoint, 2xx) when
    moreover every :meth:`hold` is released. A filter that removed a record as a copy of one
    still in flight holds the batch so the source is not told before that twin is delivered,
    while what the batch itself delivered counts as delivered at once.
    """

    __slots__ = ("_callback", "_failed", "_held_failed", "_holds", "_hooks", "_pending")

    def __init__(self, callback: Callable[[bool], None] | None = None) -> None:
        self._pending = 1
        self._failed = False
        self._callback = callback
        self._hooks: list[Callable[[bool], None]] | None = None
        self._holds = 0
        self._held_failed = False

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def done(self) -> bool:
        return self._pending == 0

    def retain(self, count: int = 1) -> None:
        if self._pending <= 0:
            raise RuntimeError("retain() on an acknowledgement token that already completed")
        self._pending += count

    def release(self, delivered: bool = True) -> None:
        """One sink is finished with the batch; ``delivered=False`` records a drop."""
        if self._pending <= 0:
            raise RuntimeError("release() called more often than retain()")
        if not delivered:
            self._failed = True
        self._pending -= 1
        if self._pending == 0:
            hooks, self._hooks = self._hooks, None
            try:
                for hook in hooks or ():
                    hook(not self._failed)
            finally:  # a failing hook must not keep the source from its acknowledgement
                if not self._holds:
                    self._tell()

    def on_complete(self, hook: Callable[[bool], None]) -> None:
        """Also run ``hook(delivered)`` when the batch is delivered, *before* the source's callback.

        For a filter that must record what was delivered before the source acts on it (the
        ``kubernetes_audit`` filter persists delivered dedupe keys before a tail's checkpoint
        or a webhook's 2xx moves past them)."""
        if self._pending <= 0:
            raise RuntimeError("on_complete() on an acknowledgement token that already completed")
        if self._hooks is None:
            self._hooks = [hook]
        else:
            self._hooks.append(hook)

    def hold(self) -> None:
        """Keep the source's callback (not the hooks) from running until :meth:`unhold`."""
        if self._pending <= 0:
            raise RuntimeError("hold() on an acknowledgement token that already completed")
        self._holds += 1

    def unhold(self, delivered: bool = True) -> None:
        """Gives up a :meth:`hold`; ``delivered=False`` makes the source's callback say not delivered."""
        if self._holds <= 0:
            raise RuntimeError("unhold() called more often than hold()")
        if not delivered:
            self._held_failed = True
        self._holds -= 1
        if not self._holds and not self._pending:
            self._tell()

    def _tell(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback(not (self._failed or self._held_failed))

    def seal(self) -> None:
        """Routing is finished: give up the source's own reference."""
        self.release(True)


class OrderedAcks(Generic[P]):
    """Hands out tokens in emission order and reports the highest contiguous delivered position.

    ``on_advance(position)`` is called with the position of the newest batch such that it and
    every batch before it have completed. Sources store that position as their checkpoint.
    """

    def __init__(self, on_advance: Callable[[P], None]) -> None:
        self._on_advance = on_advance
        self._queue: deque[list[object]] = deque()  # [position, completed]

    def __len__(self) -> int:
        """Batches emitted but not yet delivered (the in-flight window)."""
        return len(self._queue)

    def token(self, position: P | None, on_complete: Callable[[bool], None] | None = None) -> AckToken:
        """A token for the batch ending at ``position``; ``on_complete`` runs when *it* finishes,
        before the in-order checkpoint is considered (e.g. to record delivered identities).
        A ``None`` position takes part in the ordering but is never reported itself."""
        entry: list[object] = [position, False]
        self._queue.append(entry)

        def complete(delivered: bool) -> None:
            if on_complete is not None:
                on_complete(delivered)
            entry[1] = True
            self._drain()

        return AckToken(complete)

    def _drain(self) -> None:
        newest: P | None = None
        while self._queue and self._queue[0][1]:
            position = self._queue.popleft()[0]
            if position is not None:
                newest = position  # type: ignore[assignment]
        if newest is not None:
            self._on_advance(newest)
