"""Moves a source's batch through the matching transforms and into the matching sink buffers.

Routes are resolved once per distinct tag and cached. The acknowledgement token is retained
once per destination sink before any sink can see the batch, and the source's own reference is
given up last, so a token can never complete while the batch is still being routed. A batch no
output matches is counted as dropped (reason ``unrouted``) and acknowledged, as Fluent Bit
drops records no output matches. A send that does not finish (cancelled at shutdown while a sink
buffer is full, or after the send before it failed) keeps that reference: the batch counts as
in flight, not delivered, and is read again after a restart.

**Processors** (YAML ``processors: {logs: [...]}``) are filters bound to one input or output:
an input's run on its batches before routing, an output's on what reaches that output before
it is queued. A record a processor drops is acknowledged as filtered, exactly like a filter
drop (the token simply is not retained for it).

**Re-emitted records** (``rewrite_tag``, ``multiline`` with ``buffer on``): a filter that
implements :class:`Reemitting` hands back copies beside its output. Each copy is a new batch
whose token holds a reference on every batch it came from (taken by the filter while those are
still being routed), so a source's checkpoint moves only once the copy is delivered too. A copy
is routed again from the start, like a new input's records (Fluent Bit's emitter input), except
through the filters it already came out of: Fluent Bit's emitter never hands a filter its own
output, and carrying the whole set means two rewrite_tag filters that feed each other cannot
loop either. A filter that sets ``continues_after`` (multiline: the copy has the same tag and is
the rest of the same stream) has its copies go on after it instead, so the filters before it do
not see those records twice. Copies are routed after the batch they came from, within its send,
so the source's backpressure holds them back too.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from kubetrail.core.component import Transform
from kubetrail.core.config.condition import Condition
from kubetrail.core.metrics import ComponentMetrics
from kubetrail.core.record import Batch, Record
from kubetrail.runtime.routing import TagMatcher
from kubetrail.runtime.sink_runner import SinkRunner


@dataclass
class RoutedTransform:
    transform: Transform
    matcher: TagMatcher
    metrics: ComponentMetrics
    component_id: str
    condition: Condition | None = None  # a processor's ``condition:``: only matching records
    reemits: bool = field(init=False)  # the filter emits copies (checked once, not per batch)

    def __post_init__(self) -> None:
        self.reemits = isinstance(self.transform, Reemitting)


@dataclass
class RoutedSink:
    runner: SinkRunner
    matcher: TagMatcher
    processors: list[RoutedTransform] = field(default_factory=list)


@dataclass
class Route:
    transforms: list[RoutedTransform] = field(default_factory=list)
    sinks: list[SinkRunner] = field(default_factory=list)
    sink_processors: list[list[RoutedTransform]] = field(default_factory=list)


@runtime_checkable
class Reemitting(Protocol):
    """A filter that emits records under new tags or later (Fluent Bit's emitter input)."""

    emitter_metrics: ComponentMetrics | None

    def process_emitting(self, batch: Batch) -> tuple[Batch, list[Batch]]:
        """The batch after this filter, and the copies to route again from the start. Each copy
        carries a token of its own that holds a reference on the batches it came from."""
        ...


Skip = frozenset[int]  # ids of the transforms a re-emitted batch already came out of


class Router:
    def __init__(self, transforms: list[RoutedTransform], sinks: list[RoutedSink], logger: logging.Logger) -> None:
        self._transforms = transforms
        self._sinks = sinks
        self._routes: dict[str, Route] = {}
        self.log = logger

    def route(self, tag: str) -> Route:
        route = self._routes.get(tag)
        if route is None:
            sinks = [s for s in self._sinks if s.matcher.matches(tag)]
            route = Route(
                [t for t in self._transforms if t.matcher.matches(tag)],
                [s.runner for s in sinks],
                [s.processors for s in sinks],
            )
            if len(self._routes) > 100_000:  # tags derived from paths can be unbounded
                self._routes.clear()
            self._routes[tag] = route
        return route

    async def send(
        self,
        batch: Batch,
        source_metrics: ComponentMetrics,
        durable: bool = False,
        *,
        after: Awaitable[None] | None = None,
        processors: Sequence[RoutedTransform] = (),
        skip: Skip = frozenset(),
    ) -> None:
        """``durable``: the source has ``storage.type filesystem`` (see :mod:`.disk_buffer`).
        ``after``: the source's previous send, which must reach the sinks first (see
        :class:`~kubetrail.core.component.Emitter`); this batch's filters run meanwhile.
        ``processors``: the input's own processors, run before routing. ``skip``: filters a
        re-emitted batch already came out of."""
        source_metrics.records_out.inc(len(batch))
        source_metrics.bytes_out.inc(batch.size_bytes)
        token = batch.ack
        routed = False
        try:
            copies: list[tuple[Batch, RoutedTransform, Skip]] = []
            if processors:
                batch = await self._chain(processors, batch, skip, copies)
            route = self.route(batch.tag)
            await self._route(batch, route, source_metrics, durable, after, skip, copies)
            for emitted, origin, emitted_skip in copies:
                await self.reemit(emitted, origin, durable, emitted_skip)
            routed = True
        finally:
            # An interrupted send (cancelled at shutdown, or the send before it failed) keeps the
            # source's reference: the batch stays in flight, so no checkpoint moves past it and
            # it is read again after a restart. Sealing it would count it as delivered.
            if token is not None and routed:
                token.seal()

    async def reemit(self, batch: Batch, origin: RoutedTransform, durable: bool, skip: Skip) -> None:
        """Route a batch a filter emitted (a rewritten tag, a joined multiline message) from the
        start, past the filters in ``skip``. Also what a filter's own timer calls."""
        metrics = getattr(origin.transform, "emitter_metrics", None) or origin.metrics
        if getattr(origin.transform, "continues_after", False):
            # A joined message goes on after the filter that joined it, not from the start.
            ids = [id(t.transform) for t in self.route(batch.tag).transforms]
            if id(origin.transform) in ids:
                skip = skip | frozenset(ids[: ids.index(id(origin.transform)) + 1])
        durable = durable or getattr(origin.transform, "durable_copies", False)  # emitter_storage.type
        await self.send(batch, metrics, durable, skip=skip)

    async def _chain(
        self,
        transforms: Sequence[RoutedTransform],
        batch: Batch,
        skip: Skip,
        copies: list[tuple[Batch, RoutedTransform, Skip]],
    ) -> Batch:
        """Run filters (or processors) in order; copies they emit are collected in ``copies``."""
        out = batch
        for routed in transforms:
            transform = routed.transform
            if id(transform) in skip:
                continue
            before = len(out)
            routed.metrics.records_in.inc(before)
            try:
                if routed.condition is not None:
                    out = await self._conditional(routed, out)
                elif routed.reemits:
                    out, emitted = transform.process_emitting(out)  # type: ignore[attr-defined]
                    copy_skip = skip | {id(transform)}
                    copies.extend((copy, routed, copy_skip) for copy in emitted)
                else:
                    out = await transform.process_batch_async(out)
            except Exception as exc:
                # A filter bug must not lose data: pass the batch on unfiltered, loudly.
                routed.metrics.error(type(exc).__name__)
                self.log.exception(
                    "filter failed; batch passed on unfiltered",
                    extra={"component": routed.component_id, "error": str(exc)},
                )
            routed.metrics.records_out.inc(len(out))
            routed.metrics.dropped(before - len(out), "filtered")
            if not len(out):
                break
        return out

    @staticmethod
    async def _conditional(routed: RoutedTransform, batch: Batch) -> Batch:
        """A processor with a condition sees only the records that meet it, in runs of adjacent
        ones, so the others pass unchanged and in their place (Fluent Bit 4's conditional
        processing)."""
        condition = routed.condition
        assert condition is not None
        records = batch.records
        flags = [condition.holds(record.body) for record in records]
        if not any(flags):
            return batch
        if all(flags):
            return await routed.transform.process_batch_async(batch)
        out: list[Record] = []
        start = 0
        for index in range(1, len(records) + 1):
            if index == len(records) or flags[index] != flags[start]:
                run = records[start:index]
                if flags[start]:
                    out.extend((await routed.transform.process_batch_async(batch.derive(run))).records)
                else:
                    out.extend(run)
                start = index
        return batch.derive(out)

    async def _route(
        self,
        batch: Batch,
        route: Route,
        source_metrics: ComponentMetrics,
        durable: bool,
        after: Awaitable[None] | None,
        skip: Skip = frozenset(),
        copies: list[tuple[Batch, RoutedTransform, Skip]] | None = None,
    ) -> None:
        token = batch.ack
        copies = [] if copies is None else copies
        out = await self._chain(route.transforms, batch, skip, copies) if len(batch) else batch
        if after is not None:
            # Before any return: a batch after this one waits for this send, not the one before.
            await after
        if not len(out):
            return
        if not route.sinks:
            source_metrics.dropped(len(out), "unrouted")
            return
        # An output's processors see only what reaches that output; one that keeps nothing is
        # not retained for (its records were filtered, as a filter drop is).
        targets: list[tuple[SinkRunner, Batch]] = []
        for runner, processors in zip(route.sinks, route.sink_processors, strict=True):
            own = await self._chain(processors, _private(out), skip, copies) if processors else out
            if len(own):
                targets.append((runner, own))
        if token is not None and targets:
            token.retain(len(targets))
        for runner, own in targets:
            await runner.enqueue(own, durable)


def _private(batch: Batch) -> Batch:
    """A copy of ``batch`` whose records an output's processors may change without the change
    reaching the other outputs (unparsed records share their immutable bytes)."""
    records = [
        Record(r.tag, r.time_ns, None, r.raw, r.identity, r.meta)
        if r.raw is not None
        else Record(r.tag, r.time_ns, copy.deepcopy(r.body_), None, r.identity, copy.copy(r.meta))
        for r in batch.records
    ]
    return batch.derive(records)
