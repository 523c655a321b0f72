"""A loopback aiohttp server that records requests and answers from a script.

Used for what a real server will not do on demand: an HTML page from a proxy, garbage JSON,
a 503 with ``Retry-After``, a server that never answers. Every request is recorded with its
body already gunzipped, so tests can assert on exactly what the sink sent.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes  # decompressed (aiohttp's server already undoes Content-Encoding gzip)

    @property
    def wire_size(self) -> int:
        """Bytes on the wire (Content-Length), to check a body really was compressed."""
        return int(self.headers.get("Content-Length", "-1"))


@dataclass
class Answer:
    status: int = 200
    body: bytes = b"{}"
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (a hanging server)


Handler = Callable[[Recorded], Awaitable[Answer] | Answer]


class ScriptedServer:
    """``answers`` are used in order, then ``default``; or ``handler`` decides per request."""

    def __init__(self, handler: Handler | None = None) -> None:
        self.requests: list[Recorded] = []
        self.answers: list[Answer] = []
        self.default = Answer()
        self.handler = handler
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.scheme = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> ScriptedServer:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.scheme = "https" if ssl_context is not None else "http"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if body[:2] == b"\x1f\x8b":  # in case a server version leaves it compressed
            body = gzip.decompress(body)
        recorded = Recorded(request.method, request.path, dict(request.query), dict(request.headers), body)
        self.requests.append(recorded)
        if self.handler is not None:
            answer = self.handler(recorded)
            if not isinstance(answer, Answer):
                answer = await answer
        else:
            answer = self.answers.pop(0) if self.answers else self.default
        if answer.delay:
            await asyncio.sleep(answer.delay)
        return web.Response(
            status=answer.status, body=answer.body, content_type=answer.content_type, headers=answer.headers
        )
