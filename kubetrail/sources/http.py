"""The ``http`` input: records POSTed over HTTP, as Fluent Bit's ``in_http`` takes them (aiohttp).

Requests, as Fluent Bit answers them:

* ``POST /<anything>`` with ``Content-Type: application/json`` (an object, or an array of
  objects) or ``application/x-www-form-urlencoded`` (``a=1&b=x%20y``: one record of strings);
  ``Content-Encoding: gzip`` is decompressed, bounded by ``buffer_max_size``.
* The **tag** comes from the URL path: ``/app.log?x=1`` -> ``app.log`` (query string removed,
  percent-decoding applied, every character other than letters, digits, ``_`` and ``.``
  replaced by ``_``); ``/`` gives the input's own ``tag``. With ``tag_key``, a record whose
  value under that key is a string takes that as its tag (the key stays in the record).
* Every record is stamped with the arrival time.
* The success answer (``successful_response_code``: 201 by default, or 200 or 204, with the
  ``success_header`` lines) is sent only **once the records are accepted**: the batch is in
  every destination's buffer (in the disk queue with ``storage.type filesystem``). While the
  buffers are full the request waits, so a client that sends faster than the pipeline delivers
  is slowed down instead of told "accepted" for data that could not be kept.
* ``GET /health`` answers ``200`` with ``{"status": "ok", ...}`` as Fluent Bit does.

Bad requests get ``400`` with the problem in the body (``error: invalid JSON: ...``, ``error:
invalid 'Content-Type'``, ``error: header 'Content-Type' is not set``, ``error: no payload
found``, ``error: invalid HTTP method``, an array item that is not an object with its index),
a body over ``buffer_max_size`` (declared, read or after gzip) gets ``413`` and the connection is
closed (Fluent Bit closes it without an answer). Each is counted in
``kubetrail_errors_total{type="http_..."}`` and logged at most once a minute per kind; the server
goes on serving every other client. Bodies are never logged.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.parse
from datetime import UTC, datetime
from typing import Any

import orjson

from kubetrail.core.component import ComponentContext, Emitter, Source
from kubetrail.core.errors import ConfigError
from kubetrail.core.gzip_body import GzipBodyError, gunzip_bounded
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.sources.kubernetes_audit import BadRequest
from kubetrail.sources.server_base import SERVER_TLS_OPTIONS, Warnings, server_tls

_NOT_TAG_CHAR = re.compile(r"[^A-Za-z0-9_.]")
SUCCESS_CODES = (200, 201, 204)
HEALTH_MESSAGE = "I can only show you the door. You're the one that has to walk through it."


def tag_from_path(path: str) -> str | None:
    """Fluent Bit's tag from an (already percent-decoded) URL path; None for ``/``."""
    if len(path) <= 1:
        return None
    return _NOT_TAG_CHAR.sub("_", path[1:])


def parse_urlencoded(body: bytes) -> dict[str, str]:
    """``a=1&b=x+y`` -> ``{"a": "1", "b": "x y"}``: pairs without ``=`` or key are skipped, keys and
    values trimmed, as Fluent Bit does."""
    record: dict[str, str] = {}
    text = body.decode("utf-8", "replace")
    for part in text.split("&"):
        part = part.lstrip("\n")
        key, sep, value = part.partition("=")
        if not sep or not key:
            continue
        record[key.strip()] = urllib.parse.unquote_plus(value.strip())
    return record


class HttpSource(Source):
    plugin_name = "http"
    description = "Receives JSON or form-encoded records over HTTP; answers once they are accepted"
    options = (
        Option("listen", "str", "0.0.0.0", help="Address to listen on"),
        Option("port", "int", 9880, help="TCP port (0: any free port)"),
        Option("tag_key", help="Record key whose string value becomes the record's tag"),
        Option("successful_response_code", "int", 201, help="Answer once accepted: 200, 201 or 204"),
        Option("success_header", multiple=True, help="'Name value' header added to success answers (repeat)"),
        Option("buffer_max_size", "size", 4 * 1024 * 1024, help="Largest request body, also after gzip"),
        Option("buffer_chunk_size", "size", 512 * 1024, help="Bytes read from a request body at a time"),
        Option("add_remote_addr", "bool", False, help="Add the client's X-Forwarded-For address to each record"),
        Option("remote_addr_key", "str", "REMOTE_ADDR", help="Key of the address added by add_remote_addr"),
        Option("http2", "bool", True, help="Accepted for Fluent Bit compatibility; HTTP/1.1 is served"),
        *SERVER_TLS_OPTIONS,
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.tag: str = config["tag"]
        self.host: str = config["listen"]
        self.port: int = config["port"]
        self.tag_key: str | None = config["tag_key"]
        self.success: int = config["successful_response_code"]
        if self.success not in SUCCESS_CODES:
            raise ConfigError(f"{self.success} is not one of 200, 201, 204", key="successful_response_code")
        self.success_headers: dict[str, str] = {}
        for line in config["success_header"]:
            name, _, value = line.strip().partition(" ")
            if not name or not value.strip():
                raise ConfigError(f"{line!r} is not 'Name value'", key="success_header")
            self.success_headers[name] = value.strip()
        self.limit: int = config["buffer_max_size"]
        self.chunk: int = max(1, config["buffer_chunk_size"])
        self.remote_key: str | None = config["remote_addr_key"] if config["add_remote_addr"] else None
        self.tls = server_tls(config, self.log)
        self.warn = Warnings(self.log, self.metrics)
        self.started = asyncio.Event()
        self.bound_port: int | None = None
        self.requests: dict[int, int] = {}  # status -> count
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, emitter: Emitter) -> None:
        from aiohttp import web  # imported here: aiohttp costs 0.2 s to import for tail-only configs

        self._emitter = emitter
        app = web.Application(client_max_size=self.limit)
        app.router.add_route("*", "/{path:.*}", self._handle)
        # auto_decompress off: gzip is inflated here with a bound on its size.
        runner = web.AppRunner(app, handle_signals=False, access_log=None, auto_decompress=False, lingering_time=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.tls, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        addresses = runner.addresses  # (host, port, ...) per listening socket: the port when it was 0
        self.bound_port = addresses[0][1] if addresses else self.port
        self.started.set()
        self.log.info("http input listening", extra={"listen": self.host, "port": self.bound_port})
        try:
            await self._stop.wait()
        finally:
            self.started.clear()
            await runner.cleanup()

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        try:
            if request.method == "GET" and request.path == "/health":
                return self._answer(200, _health())
            if request.method != "POST":
                raise BadRequest(400, "error: invalid HTTP method")
            records = self._parse(request, await self._read_body(request))
            batches: dict[str, list[Record]] = {}
            for record in records:
                batches.setdefault(record.tag, []).append(record)
            for tag, items in batches.items():
                # Answered only after this returns: the records are in the sink buffers.
                await self._emitter.send(Batch(tag, items, None, request.content_length or 0))
            return self._answer(self.success, None)
        except BadRequest as exc:
            response = self._answer(exc.status, exc.message)
            if exc.status == 413:
                response.force_close()  # the rest of the body is not worth reading
            return response
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not stop the server
            self.metrics.error(type(exc).__name__)
            self.log.exception("http input request failed")
            return web.Response(status=500, text="error: internal error\n")

    def _answer(self, status: int, message: str | None) -> Any:
        from aiohttp import web

        self.requests[status] = self.requests.get(status, 0) + 1
        if status >= 400:
            self.warn(f"http_{status}", "http input: request refused", status=status, reason=message)
            return web.Response(status=status, text=(message or "") + "\n")
        headers = self.success_headers if status == self.success else {}
        if status == 204 or message is None:
            return web.Response(status=status, headers=headers)
        return web.Response(status=status, text=message, headers=headers, content_type="application/json")

    async def _read_body(self, request: Any) -> bytes:
        declared = request.content_length
        if declared is not None and declared > self.limit:
            raise BadRequest(413, f"error: body of {declared} bytes is over buffer_max_size ({self.limit})")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(self.chunk):
            size += len(chunk)
            if size > self.limit:
                raise BadRequest(413, f"error: body over buffer_max_size ({self.limit} bytes)")
            chunks.append(chunk)
        body = b"".join(chunks)
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            try:
                body = gunzip_bounded(body, self.limit)
            except GzipBodyError as exc:
                raise BadRequest(413 if exc.too_large else 400, f"error: {exc}") from None
        elif encoding not in ("", "identity"):
            raise BadRequest(400, f"error: content encoding {encoding!r} is not supported (gzip is)")
        return body

    def _parse(self, request: Any, body: bytes) -> list[Record]:
        ctype_header = request.headers.get("Content-Type")
        if not ctype_header:
            raise BadRequest(400, "error: header 'Content-Type' is not set")
        ctype = request.content_type
        if not body.strip():
            raise BadRequest(400, "error: no payload found")
        if ctype == "application/json":
            try:
                value = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise BadRequest(400, f"error: invalid JSON: {exc}") from None
            if isinstance(value, dict):
                items = [value]
            elif isinstance(value, list):
                items = value
                for index, item in enumerate(items):
                    if not isinstance(item, dict):
                        raise BadRequest(400, f"error: item {index} of the array is not a JSON object")
            else:
                raise BadRequest(400, "error: the JSON body must be an object or an array of objects")
        elif ctype == "application/x-www-form-urlencoded":
            form = parse_urlencoded(body)
            if not form:
                raise BadRequest(400, "error: no key=value pair in the form body")
            items = [form]
        else:
            raise BadRequest(400, "error: invalid 'Content-Type'")
        default_tag = tag_from_path(request.path) or self.tag
        remote = None
        if self.remote_key is not None:
            forwarded = request.headers.get("X-Forwarded-For")
            remote = forwarded.split(",")[0].strip() if forwarded else request.remote
        now = time.time_ns()
        records = []
        for item in items:
            tag = default_tag
            if self.tag_key is not None:
                value = item.get(self.tag_key)
                if isinstance(value, str) and value:
                    tag = value
            if remote is not None:
                item[self.remote_key] = remote
            records.append(Record(tag, now, item))
        return records


def _health() -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return orjson.dumps({"status": "ok", "message": HEALTH_MESSAGE, "timestamp": stamp}).decode()
