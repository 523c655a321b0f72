"""The ``kubernetes_audit`` input: the API server's audit **webhook** backend, on aiohttp.

The API server POSTs ``audit.k8s.io/v1`` ``EventList`` batches (up to 400 events) and retries
any failure or non-2xx answer with backoff (10 s, x1.5, 5 tries), then drops the batch. So the
one rule that makes the webhook lossless is: **answer 2xx only once the batch is safe**. Here
that means every sink the batch was routed to has delivered it: the batch's
:class:`~kubetrail.core.acks.AckToken` completed with ``delivered=True``. (With the memory
buffer, the only one the runtime has today, "safe" is therefore stronger than "accepted in
memory": it is "written by every sink". When a filesystem buffer exists, a sink that spools
acknowledges on spool, and the same code answers as soon as the spool has it.)

Answers, and why:

* ``200`` once delivered; ``429`` + ``Retry-After`` when the pipeline cannot take the batch now
  (sink buffers full: the router's ``send`` did not return within ``ack_timeout``, or more than
  ``max_pending`` batches are already waiting for buffer space); ``503`` + ``Retry-After`` when
  the batch was admitted but not delivered within ``ack_timeout`` (sinks down or slow), or a
  sink dropped it. The API server then re-sends the same batch; the ``kubernetes_audit`` filter
  removes what was already delivered (and makes a re-sent batch wait for its still-in-flight
  twin instead of answering early; see the delivery hook below).
* ``400`` naming the problem (malformed JSON with its byte position, a wrong ``kind`` or
  ``apiVersion``, an event without ``auditID``/``stage``, with its JSON path); ``401`` for a
  missing or wrong bearer token; ``403`` for a TLS connection without a client certificate (a
  certificate from another CA fails the TLS handshake itself); ``408`` for a body that does
  not arrive within ``read_timeout`` (a slow client holds one coroutine, never the server);
  ``413`` over ``buffer_max_size`` (declared, read, or after gzip decompression, which is
  bounded so a gzip bomb never expands past the limit); ``415`` for a content type other than
  JSON or a content encoding other than gzip.

Accepted payloads: an ``EventList``, a single ``Event``, or a JSON array of events. Each event
becomes one record whose body is the event's **original bytes** (a ``msgspec.Raw`` slice of the
request, so nothing is re-serialised), stamped with ``stageTimestamp`` (microseconds; then
``requestReceivedTimestamp``, then ``timestamp`` of old ``v1beta1`` events, then arrival), with
``identity=(auditID, stage)``. Parsing is two C passes over the body with msgspec (one for the
raw item slices, one for the few fields needed), no per-event ``json.loads``.

Security defaults: listening on a non-loopback address needs TLS *and* client authentication
(``tls.ca_file`` client certificates and/or ``bearer_token_file``), unless ``insecure on``; when
both are configured both must pass. The certificate, key, CA and token files are mounted
secrets that rotate: each TLS handshake goes through an SNI callback (called by OpenSSL with or
without SNI) that swaps in a freshly built ``SSLContext`` when any file's inode, size or mtime
changed, and the token file is re-checked the same way on each request. Established
connections keep the context they were made with, so nothing in flight is dropped; a half
written rotation (key not matching the certificate yet) keeps the previous context and is
retried on the next handshake. Request bodies are never logged: audit events carry secrets
until the filter redacts them.

Delivery hook: the ``kubernetes_audit`` filter works with the batch's token, as with any
source's: it may ``hold()`` it (to hold the answer back while a twin of a removed duplicate is
in flight) and register ``on_complete`` hooks, which run before this source's callback. That is
how the filter persists only *delivered* keys for deduplication, before the 2xx: a kill -9
between "filtered" and "delivered" cannot turn the API server's retry into a loss, and one
after the answer cannot turn a tail's replay of the same events into duplicates.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import os
import ssl
import time
from datetime import datetime
from typing import Any

import msgspec

from kubetrail.core.acks import AckToken
from kubetrail.core.component import ComponentContext, Emitter, Source
from kubetrail.core.errors import ConfigError
from kubetrail.core.gzip_body import GzipBodyError, gunzip_bounded
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record, decode_body

DEFAULT_PORT = 8443  # HTTPS alternative port: the receiver is meant to run with TLS
API_VERSIONS = frozenset({"audit.k8s.io/v1", "audit.k8s.io/v1beta1"})
WARNING_INTERVAL = 60.0
READ_CHUNK = 256 * 1024


class _Envelope(msgspec.Struct):
    """Top level of an object body: an EventList's items stay undecoded byte slices."""

    kind: str | None = None
    apiVersion: str | None = None
    items: list[msgspec.Raw] | None = None


class _Event(msgspec.Struct):
    """The only fields of an audit event the input reads; the rest is skipped in C."""

    auditID: str
    stage: str
    kind: str | None = None
    stageTimestamp: datetime | None = None
    requestReceivedTimestamp: datetime | None = None
    timestamp: datetime | None = None


class _EventList(msgspec.Struct):
    items: list[_Event] | None = None


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_EVENT_LIST = msgspec.json.Decoder(_EventList)
_EVENT = msgspec.json.Decoder(_Event)
_RAW_ARRAY = msgspec.json.Decoder(list[msgspec.Raw])
_EVENT_ARRAY = msgspec.json.Decoder(list[_Event])


class BadRequest(Exception):
    """A request the receiver answers with ``status`` and ``message`` (never with body content)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _file_signature(paths: tuple[str, ...]) -> tuple[tuple[int, int, int], ...]:
    """Changes when a mounted secret is replaced (symlink swap: new inode) or rewritten in place."""
    result = []
    for path in paths:
        st = os.stat(path)  # follows the ..data symlinks of a Kubernetes secret volume
        result.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(result)


class TlsFiles:
    """Builds server ``SSLContext`` objects from files and rebuilds them when the files change."""

    def __init__(self, crt: str, key: str, ca: str | None, log: Any) -> None:
        self.crt, self.key, self.ca = crt, key, ca
        self.log = log
        self._paths = (crt, key) if ca is None else (crt, key, ca)
        self._signature = _file_signature(self._paths)
        self.current = self._build()  # raises at build time: a broken config must not start
        self.reloads = 0
        # The listening context only dispatches: OpenSSL calls this for every ClientHello (with
        # or without SNI) and the connection continues with the context we assign.
        self.listening = self._build()
        self.listening.sni_callback = self._on_hello

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.crt, self.key)
        if self.ca is not None:
            ctx.load_verify_locations(cafile=self.ca)
            # OPTIONAL rather than REQUIRED: a client without a certificate completes the
            # handshake and is told why in an HTTP 403, instead of a bare TLS alert. A
            # certificate that does not verify still fails the handshake.
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def refresh(self) -> None:
        try:
            signature = _file_signature(self._paths)
        except OSError as exc:
            self.log.warning("TLS file missing; keeping the loaded certificate", extra={"error": str(exc)})
            return
        if signature == self._signature:
            return
        try:
            ctx = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            # Typically the certificate is new and the key not yet: retry on the next handshake.
            self.log.warning(
                "TLS files changed but do not load yet; keeping the previous ones", extra={"error": str(exc)}
            )
            return
        self._signature = signature
        self.current = ctx
        self.reloads += 1
        self.log.info("TLS certificate/key/CA reloaded", extra={"crt_file": self.crt})

    def _on_hello(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        self.refresh()
        sslobj.context = self.current


class TokenFile:
    """Bearer tokens from a file, one per line (several allow an overlapping rotation)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._signature: tuple[tuple[int, int, int], ...] = ()
        self._tokens: list[bytes] = []
        self.refresh(strict=True)

    def refresh(self, strict: bool = False) -> None:
        try:
            signature = _file_signature((self.path,))
            if signature == self._signature:
                return
            with open(self.path, "rb") as fh:
                tokens = [line.strip() for line in fh.read().splitlines() if line.strip()]
        except OSError:
            if strict:
                raise
            return  # a vanished file during a rotation: keep the tokens we have
        if not tokens and not strict:
            return  # caught between truncate and write
        self._signature = signature
        self._tokens = tokens

    def accepts(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        self.refresh()
        offered = header[7:].strip().encode()
        ok = False
        for token in self._tokens:
            ok |= hmac.compare_digest(offered, token)  # check all: no timing hint of which matched
        return ok and bool(self._tokens)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class KubernetesAuditSource(Source):
    plugin_name = "kubernetes_audit"
    description = "Receives audit.k8s.io EventLists from the API server's audit webhook; answers 2xx once delivered"
    options = (
        Option("listen", "str", "0.0.0.0", help="Address to listen on"),
        Option("port", "int", DEFAULT_PORT, help="TCP port (0: any free port)"),
        Option("path", "str", "/audit", help="URL path the API server posts to"),
        Option("tls.crt_file", help="Serving certificate (PEM, may hold the chain); reloaded when it changes"),
        Option("tls.key_file", help="Private key of tls.crt_file; reloaded when it changes"),
        Option("tls.ca_file", help="CA bundle; when set, clients must present a certificate it signed"),
        Option("bearer_token_file", help="File with the accepted bearer token(s), one per line; re-read on change"),
        Option("buffer_max_size", "size", 12 * 1024 * 1024, help="Largest request body, before and after gzip"),
        Option("insecure", "bool", False, help="Allow a non-loopback listen address without TLS and client auth"),
        Option(
            "ack_timeout",
            "duration",
            25.0,
            help="Wait this long for delivery before answering 503 (429 if not admitted)",
        ),
        Option("read_timeout", "duration", 30.0, help="A request body must arrive within this time (else 408)"),
        Option("max_pending", "int", 8, help="Batches waiting for sink buffer space before new ones get 429 at once"),
        Option("retry_after", "int", 5, help="Seconds in the Retry-After header of 429/503 answers"),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.tag: str = config["tag"]
        self.host: str = config["listen"]
        self.port: int = config["port"]
        self.path: str = config["path"]
        if not self.path.startswith("/"):
            raise ConfigError("must start with '/'", key="path")
        self.limit: int = config["buffer_max_size"]
        self.ack_timeout: float = config["ack_timeout"]
        self.read_timeout: float = config["read_timeout"]
        self.max_pending: int = max(1, config["max_pending"])
        self.retry_after = str(max(1, config["retry_after"]))
        crt, key, ca = config["tls.crt_file"], config["tls.key_file"], config["tls.ca_file"]
        if bool(crt) != bool(key):
            raise ConfigError(
                "tls.crt_file and tls.key_file go together", key="tls.crt_file" if not crt else "tls.key_file"
            )
        if ca and not crt:
            raise ConfigError(
                "client certificates (tls.ca_file) need TLS: set tls.crt_file and tls.key_file", key="tls.ca_file"
            )
        self.tls: TlsFiles | None = None
        if crt:
            try:
                self.tls = TlsFiles(crt, key, ca, self.log)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load the TLS files: {exc}", key="tls.crt_file") from None
        self.require_cert = bool(ca)
        self.tokens: TokenFile | None = None
        if config["bearer_token_file"]:
            try:
                self.tokens = TokenFile(config["bearer_token_file"])
            except OSError as exc:
                raise ConfigError(f"cannot read: {exc.strerror}", key="bearer_token_file") from None
        if not _is_loopback(self.host) and not config["insecure"]:
            if self.tls is None:
                raise ConfigError(
                    f"refusing to listen on {self.host} without TLS: audit events carry credentials; set "
                    "tls.crt_file/tls.key_file (and tls.ca_file or bearer_token_file), or 'insecure on'",
                    key="listen",
                )
            if not (self.require_cert or self.tokens):
                raise ConfigError(
                    f"refusing to listen on {self.host} without client authentication: set tls.ca_file "
                    "(client certificates) or bearer_token_file, or 'insecure on'",
                    key="listen",
                )
        self._stop = asyncio.Event()
        self._pending = 0  # batches handed to the router whose send() has not returned
        self._last_warning: dict[int, float] = {}
        self.bound_port: int | None = None
        self.started = asyncio.Event()
        self.requests: dict[int, int] = {}  # status -> count, for tests and debugging

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(self, emitter: Emitter) -> None:
        from aiohttp import web  # imported here: aiohttp costs 0.2 s to import for tail-only configs

        self._emitter = emitter
        app = web.Application(client_max_size=self.limit)
        app.router.add_route("*", self.path, self._handle)
        # auto_decompress off: we decompress gzip ourselves with a bound on the output size.
        # Lingering close is short: after a 413 we do not want to read 100 MB "politely".
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            auto_decompress=False,
            lingering_time=1.0,
            shutdown_timeout=self.ack_timeout + 1.0,
        )
        await runner.setup()
        ssl_ctx = self.tls.listening if self.tls is not None else None
        site = web.TCPSite(runner, self.host, self.port, ssl_context=ssl_ctx, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        addresses = runner.addresses  # (host, port, ...) per listening socket: the port when it was 0
        self.bound_port = addresses[0][1] if addresses else self.port
        self.started.set()
        self.log.info(
            "audit webhook listening",
            extra={"listen": self.host, "port": self.bound_port, "path": self.path, "tls": self.tls is not None},
        )
        try:
            await self._stop.wait()
        finally:
            # Stop accepting, let requests in flight finish (they wait at most ack_timeout).
            self.started.clear()
            await runner.cleanup()
            self.log.info("audit webhook stopped")

    # -- requests ----------------------------------------------------------------------------

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        try:
            if request.method != "POST":
                raise BadRequest(405, "only POST is accepted")
            self._authenticate(request)
            body = await self._read_body(request)
            records, raw_block = self._parse(body)
            if not records:
                return self._answer(200, "")
            status, message = await self._deliver(records, raw_block, len(body))
            return self._answer(status, message)
        except BadRequest as exc:
            response = self._answer(exc.status, exc.message)
            if exc.status in (408, 413):
                response.force_close()  # the rest of the body is not worth reading
            return response
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not kill the server; the API server will retry
            self.metrics.error(type(exc).__name__)
            self.log.exception("audit webhook request failed")
            return web.json_response({"error": "internal error"}, status=500)

    def _answer(self, status: int, message: str) -> Any:
        from aiohttp import web

        self.requests[status] = self.requests.get(status, 0) + 1
        headers = {}
        if status in (429, 503):
            headers["Retry-After"] = self.retry_after
        if status >= 400:
            self.metrics.error(f"http_{status}")
            now = time.monotonic()
            if now - self._last_warning.get(status, -WARNING_INTERVAL) >= WARNING_INTERVAL:
                self._last_warning[status] = now  # once a minute per status: a flood must not flood the log
                self.log.warning("audit webhook request refused", extra={"status": status, "reason": message})
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        body = {"error": message} if status >= 400 else {}
        return web.json_response(body, status=status, headers=headers)

    def _authenticate(self, request: Any) -> None:
        if self.tokens is not None and not self.tokens.accepts(request.headers.get("Authorization")):
            raise BadRequest(401, "missing or wrong bearer token")
        if self.require_cert:
            transport = request.transport
            cert = transport.get_extra_info("peercert") if transport is not None else None
            if not cert:
                raise BadRequest(403, "a client certificate signed by tls.ca_file is required")

    async def _read_body(self, request: Any) -> bytes:
        ctype = request.content_type  # aiohttp defaults a missing header to application/octet-stream
        if ctype != "application/json" and not (ctype.startswith("application/") and ctype.endswith("+json")):
            raise BadRequest(415, f"content type must be application/json, got {ctype!r}")
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip", "x-gzip", ""):
            raise BadRequest(415, f"content encoding must be gzip or identity, got {encoding!r}")
        declared = request.content_length
        if declared is not None and declared > self.limit:
            raise BadRequest(413, f"body of {declared} bytes is over buffer_max_size ({self.limit})")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.read_timeout):
                while True:
                    chunk = await request.content.readany()
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > self.limit:
                        raise BadRequest(413, f"body over buffer_max_size ({self.limit} bytes)")
                    chunks.append(chunk)
        except TimeoutError:
            raise BadRequest(408, f"body not received within read_timeout ({self.read_timeout:g} s)") from None
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if encoding in ("gzip", "x-gzip"):
            try:
                body = gunzip_bounded(body, self.limit)
            except GzipBodyError as exc:
                raise BadRequest(413 if exc.too_large else 400, str(exc)) from None
        return body

    def _parse(self, body: bytes) -> tuple[list[Record], bytes | None]:
        """Body -> records (original bytes per event) and, when possible, the block of JSON lines."""
        head = body.lstrip()[:1]
        try:
            if head == b"[":
                raws = _RAW_ARRAY.decode(body)
                events = _EVENT_ARRAY.decode(body)
            elif head == b"{":
                envelope = _ENVELOPE.decode(body)
                if envelope.apiVersion is not None and envelope.apiVersion not in API_VERSIONS:
                    raise BadRequest(400, f"apiVersion must be audit.k8s.io/v1, got {envelope.apiVersion!r}")
                if envelope.kind == "EventList":
                    raws = envelope.items or []
                    events = _EVENT_LIST.decode(body).items or []
                elif envelope.kind in ("Event", None):
                    raws = [msgspec.Raw(body.strip())]
                    events = [_EVENT.decode(body)]
                else:
                    raise BadRequest(400, f"kind must be EventList or Event, got {envelope.kind!r}")
            else:
                raise BadRequest(400, "malformed JSON: expected an EventList, an Event or an array of events")
        except msgspec.ValidationError as exc:
            raise BadRequest(400, f"not an audit event: {exc}") from None
        except msgspec.DecodeError as exc:
            raise BadRequest(400, f"malformed JSON: {exc}") from None
        except RecursionError:
            raise BadRequest(400, "malformed JSON: nested too deeply") from None
        tag = self.tag
        now = time.time_ns()
        # Events of a pretty-printed body contain newlines; their bytes cannot be JSON lines.
        compact = b"\n" not in body and b"\r" not in body
        records: list[Record] = []
        append = records.append
        for index, (event, raw) in enumerate(zip(events, raws, strict=True)):
            if event.kind is not None and event.kind != "Event":
                raise BadRequest(400, f"items[{index}]: kind must be Event, got {event.kind!r}")
            stamp = event.stageTimestamp or event.requestReceivedTimestamp or event.timestamp
            time_ns = now if stamp is None else round(stamp.timestamp() * 1_000_000) * 1000
            if compact:
                append(Record(tag, time_ns, None, bytes(raw), (event.auditID, event.stage)))
            else:
                # decode_body: a number beyond a double (a request body is logged as sent) is kept
                # as its text; msgspec's decode refused it, and failed every retry of the batch.
                append(Record(tag, time_ns, decode_body(bytes(raw)), None, (event.auditID, event.stage)))
        raw_block = b"\n".join([r.raw for r in records]) + b"\n" if compact and records else None  # type: ignore[misc]
        return records, raw_block

    async def _deliver(self, records: list[Record], raw_block: bytes | None, size: int) -> tuple[int, str]:
        if self._pending >= self.max_pending:
            return 429, "sink buffers are full; retry later"
        loop = asyncio.get_running_loop()
        delivered: asyncio.Future[bool] = loop.create_future()

        def complete(ok: bool) -> None:  # after the token's on_complete hooks (the filter's)
            if not delivered.done():
                delivered.set_result(ok)

        token = AckToken(complete)
        batch = Batch(self.tag, records, token, size, raw_block=raw_block)
        self._pending += 1
        # Not cancelled on timeout: cancelling the router half-way could leave the batch in some
        # sinks and not others. An admitted batch is delivered even if we already answered 429.
        sending = asyncio.ensure_future(self._send(batch))
        try:
            async with asyncio.timeout(self.ack_timeout):
                ok = await asyncio.shield(delivered)
        except TimeoutError:
            if not sending.done():
                return 429, "sink buffers are full; retry later"
            return 503, f"not delivered within ack_timeout ({self.ack_timeout:g} s); retry later"
        if not ok:
            return 503, "a sink dropped the batch; retry later"
        return 200, ""

    async def _send(self, batch: Batch) -> None:
        try:
            await self._emitter.send(batch)
        finally:
            self._pending -= 1
