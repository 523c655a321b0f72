"""A real HTTP server on loopback standing in for a misbehaving API server, and an Events
source pointed at it. For bad-input and protocol-edge tests the real control plane cannot
produce on demand (each 410 form, expired continue tokens, garbage answers)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from kubetrail.core.component import ComponentContext
from kubetrail.core.metrics import MetricsRegistry
from kubetrail.core.options import resolve_options
from kubetrail.parsers.registry import ParserRegistry
from kubetrail.runtime.plugins import COMMON_INPUT_OPTIONS
from kubetrail.sources.kubernetes_events import KubernetesEventsSource
from tests.unit.helpers import section

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[str]:
    """Serve every path with ``handler``; yields the base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def events_source(url: str, registry: MetricsRegistry | None = None, **props: Any) -> KubernetesEventsSource:
    sec = section(
        "input", kube_url=url, kube_token_file="", kube_ca_file="", interval_nsec="1000000", tag="ev", **props
    )
    values = resolve_options(sec, (*COMMON_INPUT_OPTIONS, *KubernetesEventsSource.options), "t")
    registry = registry or MetricsRegistry()
    ctx = ComponentContext(
        "ev.0", registry.component("ev.0", "source", "kubernetes_events"), logging.getLogger("t"), ParserRegistry()
    )
    return KubernetesEventsSource(ctx, values)


def event(name: str, rv: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "d", "uid": f"uid-{name}", "resourceVersion": rv},
        "reason": "R",
        "lastTimestamp": "2026-11-28T12:00:00Z",
    }
