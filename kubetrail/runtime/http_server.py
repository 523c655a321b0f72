"""The monitoring endpoints, with Fluent Bit's paths and default port (2020).

``/api/v1/health``, ``/api/v1/uptime``, Prometheus text at ``/api/v2/metrics/prometheus`` and
``/metrics``, and build information at ``/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kubetrail import __version__
from kubetrail.core.metrics import MetricsRegistry


class MonitoringServer:
    def __init__(self, metrics: MetricsRegistry, listen: str, port: int, healthy: Callable[[], bool]) -> None:
        self.metrics = metrics
        self.listen = listen
        self.port = port
        self.healthy = healthy
        self.started = time.time()
        self._runner: web.AppRunner | None = None
        self.bound_port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._root)
        app.router.add_get("/api/v1/health", self._health)
        app.router.add_get("/api/v1/uptime", self._uptime)
        app.router.add_get("/api/v2/metrics/prometheus", self._prometheus)
        app.router.add_get("/metrics", self._prometheus)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.listen, self.port)
        await site.start()
        addresses = self._runner.addresses  # (host, port, ...) per listening socket: the port when it was 0
        self.bound_port = addresses[0][1] if addresses else self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _root(self, _request: web.Request) -> web.Response:
        return web.json_response({"kubetrail": {"version": __version__}})

    async def _health(self, _request: web.Request) -> web.Response:
        if self.healthy():
            return web.Response(text="ok\n")
        return web.Response(text="error\n", status=500)

    async def _uptime(self, _request: web.Request) -> web.Response:
        uptime = int(time.time() - self.started)
        days, rest = divmod(uptime, 86400)
        hours, rest = divmod(rest, 3600)
        minutes, seconds = divmod(rest, 60)
        human = f"Fluent Bit compatible; up {days} day(s), {hours} hour(s), {minutes} minute(s), {seconds} second(s)"
        return web.json_response({"uptime_sec": uptime, "uptime_hr": human})

    async def _prometheus(self, _request: web.Request) -> web.Response:
        self.metrics.uptime.set(time.time() - self.started)
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
