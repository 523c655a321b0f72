"""Moves a source's batch through the matching transforms and into the matching sink buffers.

Routes are resolved once per distinct tag and cached. The acknowledgement token is retained
once per destination sink before any sink can see the batch, and the source's own reference is
given up last, so a token can never complete while the batch is still being routed. A batch no
output matches is counted as dropped (reason ``unrouted``) and acknowledged, as Fluent Bit
drops records no output matches. A send that does not finish (cancelled at shutdown while a sink
buffer is full, or after the send before it failed) keeps that reference: the batch counts as
in flight, not delivered, and is read again after a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field

from kubetrail.core.component import Transform
from kubetrail.core.metrics import ComponentMetrics
from kubetrail.core.record import Batch
from kubetrail.runtime.routing import TagMatcher
from kubetrail.runtime.sink_runner import SinkRunner


@dataclass
class RoutedTransform:
    transform: Transform
    matcher: TagMatcher
    metrics: ComponentMetrics
    component_id: str


@dataclass
class RoutedSink:
    runner: SinkRunner
    matcher: TagMatcher


@dataclass
class Route:
    transforms: list[RoutedTransform] = field(default_factory=list)
    sinks: list[SinkRunner] = field(default_factory=list)


class Router:
    def __init__(self, transforms: list[RoutedTransform], sinks: list[RoutedSink], logger: logging.Logger) -> None:
        self._transforms = transforms
        self._sinks = sinks
        self._routes: dict[str, Route] = {}
        self.log = logger

    def route(self, tag: str) -> Route:
        route = self._routes.get(tag)
        if route is None:
            route = Route(
                [t for t in self._transforms if t.matcher.matches(tag)],
                [s.runner for s in self._sinks if s.matcher.matches(tag)],
            )
            if len(self._routes) > 100_000:  # tags derived from paths can be unbounded
                self._routes.clear()
            self._routes[tag] = route
        return route

    def leaves_check(self, tag: str) -> bool:
        """True when the first filter on the route of ``tag`` validates a lazy block's lines itself
        (``Transform.checks_json_lines``): an unchecked batch is then handed to it as it is."""
        transforms = self.route(tag).transforms
        return bool(transforms) and transforms[0].transform.checks_json_lines

    async def send(
        self,
        batch: Batch,
        source_metrics: ComponentMetrics,
        durable: bool = False,
        *,
        after: Awaitable[None] | None = None,
    ) -> None:
        """``durable``: the source has ``storage.type filesystem`` (see :mod:`.disk_buffer`).
        ``after``: the source's previous send, which must reach the sinks first (see
        :class:`~kubetrail.core.component.Emitter`); this batch's filters run meanwhile."""
        route = self.route(batch.tag)
        source_metrics.records_out.inc(len(batch))
        source_metrics.bytes_out.inc(batch.size_bytes)
        token = batch.ack
        routed = False
        try:
            await self._route(batch, route, source_metrics, durable, after)
            routed = True
        finally:
            # An interrupted send (cancelled at shutdown, or the send before it failed) keeps the
            # source's reference: the batch stays in flight, so no checkpoint moves past it and
            # it is read again after a restart. Sealing it would count it as delivered.
            if token is not None and routed:
                token.seal()

    async def _route(
        self,
        batch: Batch,
        route: Route,
        source_metrics: ComponentMetrics,
        durable: bool,
        after: Awaitable[None] | None,
    ) -> None:
        token = batch.ack
        out = batch
        for routed in route.transforms:
            if not routed.transform.checks_json_lines:
                out.check()
            before = len(out)
            routed.metrics.records_in.inc(before)
            try:
                out = await routed.transform.process_batch_async(out)
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
        out.check()  # a filter that failed passed it on as it came
        if after is not None:
            # Before any return: a batch after this one waits for this send, not the one before.
            await after
        if not len(out):
            return
        if not route.sinks:
            source_metrics.dropped(len(out), "unrouted")
            return
        if token is not None:
            token.retain(len(route.sinks))
        for runner in route.sinks:
            await runner.enqueue(out, durable)
