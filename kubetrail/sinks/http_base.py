"""The HTTP client every HTTP-based output shares: options, TLS, auth, gzip, timeouts, errors.

One place decides how kubetrail talks HTTP so that ``http``, ``es``, ``opensearch``, ``splunk``,
``loki`` (and ``opentelemetry``) behave the same way:

* **Options** are Fluent Bit's: ``host``, ``port``, ``uri``, ``http_user``/``http_passwd``,
  ``header`` (repeatable, ``Name value``), ``compress gzip``, ``tls``, ``tls.verify``,
  ``tls.verify_hostname``, ``tls.ca_file``, ``tls.ca_path``, ``tls.crt_file``, ``tls.key_file``,
  ``tls.key_passwd``, ``tls.vhost``, ``tls.debug`` (accepted), ``net.connect_timeout``,
  ``net.keepalive``; added: ``net.io_timeout`` defaults to 60s instead of Fluent Bit's "none",
  because a destination that accepts a connection and never answers must not stall a pipeline.
  :func:`client_options` returns them with each plugin's own default port and URI.
* **TLS files rotate** (:class:`~kubetrail.core.tls_files.ClientTls`): each request asks for
  the current context, rebuilt when ``tls.crt_file``/``tls.key_file``/``tls.ca_file`` changed
  (stat at most once a second); aiohttp pools connections by context, so requests after a
  rotation open connections with the new certificate while requests in flight finish on theirs.
* **Status classification** (:func:`check_status`), the contract the sink runner relies on:
  2xx delivered; 408, 429, 5xx, timeouts and connection/TLS errors -> :class:`RetryableError`
  (``HttpRetryableError`` carries ``Retry-After``); 401, 403, 404, 407 -> retryable too, because
  they say the destination refuses *us* (credentials, URI), not the payload, and dead-lettering
  every record until someone fixes a token would lose nothing only on paper (so is nginx's 400
  for a client certificate it refuses, a rotation under way); any other 4xx ->
  :class:`PermanentError` whose message is the response's status, reason and body excerpt.
* **Bad answers** (an HTML page from a proxy, garbage instead of JSON) raise
  :class:`BadResponseError`, a retryable error naming the URL, status, content type and the
  first bytes, so the log says what actually came back.
* **gzip** uses compression level 1: audit events compress ~13x already at level 1 and
  the default level 6 costs several times the CPU, which in a Python process is the budget.
  Large bodies are compressed in a worker thread (zlib releases the GIL) so inputs keep flowing.
* **Two transports.** aiohttp (imported at the first request, not with this module) serves
  TLS and every output but ``http``; large bodies go out after the headers without aiohttp's
  join of the two (:mod:`kubetrail.sinks.http_streamed`). The ``http`` output on plain TCP
  (``HttpSink.plain_transport``) uses :mod:`kubetrail.sinks.http_plain` instead: h11 on a
  socket of its own, the body written from the block with the head in one system call, and
  no aiohttp import (~0.1 s of CPU per process, see that module).

The API (stable; other sinks build on it): :func:`client_options`, :class:`HttpSettings`
(``from_config``), :class:`HttpClient` (``start``, ``close``, ``url``, ``request``, ``send``),
:class:`HttpResponse` (``json``), :func:`check_status`, :func:`gzip_body`, and
:class:`HttpSink`, a :class:`Sink` that owns one client.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import ssl
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlencode

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from kubetrail import __version__
from kubetrail.core.component import ComponentContext, Sink
from kubetrail.core.errors import ConfigError, PermanentError, RetryableError
from kubetrail.core.options import Option
from kubetrail.core.secrets import Secret, SecretFileError, Text, derive, read_now, reveal
from kubetrail.core.tls_files import ClientTls
from kubetrail.sinks import http_plain

if TYPE_CHECKING:
    import aiohttp

GZIP_LEVEL = 1
GZIP_IN_THREAD_BYTES = 256 * 1024  # below this, a thread hop costs more than it saves
EXCERPT_CHARS = 300
USER_AGENT = f"kubetrail/{__version__}"

# Not the payload's fault: the destination refuses this client (auth, URI) -> retry, keep data.
REFUSED_CLIENT_STATUSES = frozenset({401, 403, 404, 407})
RETRYABLE_STATUSES = frozenset({408, 429})
# nginx's 400 pages for its internal 495 (certificate does not verify) and 496 (none sent).
CERTIFICATE_REFUSED_BODIES = (b"The SSL certificate error", b"No required SSL certificate was sent")


class HttpRetryableError(RetryableError):
    """A retryable HTTP failure; ``status`` is None for network errors and timeouts."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)  # the runner waits at least retry_after
        self.status = status


class BadResponseError(HttpRetryableError):
    """The destination answered something that is not what its API documents."""


# Fluent Bit's TLS options, the same for every network sink (HTTP and stream).
TLS_OPTIONS: tuple[Option, ...] = (
    Option("tls", "bool", False, help="Use TLS"),
    Option("tls.verify", "bool", True, help="Verify the server certificate"),
    Option("tls.verify_hostname", "bool", True, help="Check the certificate's host name (with tls.verify)"),
    Option("tls.ca_file", help="CA certificates (PEM) to verify the server with (default: the system's)"),
    Option("tls.ca_path", help="Directory of CA certificates"),
    Option("tls.crt_file", help="Client certificate (PEM) for mutual TLS"),
    Option("tls.key_file", help="Client private key (PEM)"),
    Option("tls.key_passwd", help="Password of tls.key_file (may name a file: ${file:/path})", secret=True),
    Option("tls.vhost", help="Server name for SNI and certificate checks (default: host)"),
    Option("tls.debug", "int", 1, help="Accepted for Fluent Bit compatibility"),
)


def client_options(
    default_port: int,
    default_uri: str | None = None,
    *,
    default_host: str = "127.0.0.1",
    bearer_token: bool = False,
    default_compress: str = "none",
) -> tuple[Option, ...]:
    """The shared HTTP options with a plugin's own defaults; ``uri`` only if the plugin has one."""
    options: list[Option] = [
        Option("host", "str", default_host, help="Host name or IP address of the destination"),
        Option("port", "int", default_port, help="TCP port of the destination"),
    ]
    if default_uri is not None:
        options.append(Option("uri", "str", default_uri, help="Path of the request"))
    options += [
        Option("http_user", help="Basic authentication user", secret=True),
        Option("http_passwd", "str", "", help="Basic authentication password (requires http_user)", secret=True),
    ]
    if bearer_token:
        options.append(Option("bearer_token", help="Sent as 'Authorization: Bearer <token>'", secret=True))
    options += [
        Option("header", multiple=True, help="Extra request header 'Name value'; repeat for several", secret=True),
        Option("compress", "choice", default_compress, choices=("gzip", "none", "off"), help="Body compression"),
        *TLS_OPTIONS,
        Option("net.connect_timeout", "duration", 10.0, help="Time to establish a connection"),
        Option("net.io_timeout", "duration", 60.0, help="Time to wait for an answer (0: no limit)"),
        Option("net.keepalive", "bool", True, help="Reuse connections"),
    ]
    return tuple(options)


def parse_headers(values: Iterable[Text], key: str = "header") -> list[tuple[str, Any]]:
    """``header`` values ``Name value`` -> pairs; a value without a name or value is a config error.

    A value with ``${file:...}`` (``Authorization Bearer ${file:/t}``) stays a secret that follows
    its file; its name must be written in the config, so it cannot change with the file."""
    headers: list[tuple[str, Any]] = []
    for text in values:
        name, _, value = (reveal(text) or "").strip().partition(" ")
        value = value.strip()
        if not name or not value or ":" in name:
            shown_text = text.text if isinstance(text, Secret) else text
            raise ConfigError(
                f"bad header {shown_text!r}; expected 'Name value', e.g. 'X-Scope-OrgID tenant1'", key=key
            )
        if isinstance(text, Secret):
            if not text.text.strip().startswith(name + " "):
                raise ConfigError(f"bad header {text.text!r}: write the header name before ${{file:...}}", key=key)
            headers.append((name, derive(lambda t: t.strip().partition(" ")[2].strip(), text)))
        else:
            headers.append((name, value))
    return headers


def build_ssl_context(config: Mapping[str, Any]) -> ssl.SSLContext:
    """The TLS context from Fluent Bit's ``tls.*`` options; a bad file is a config error naming
    the option at fault (:class:`~kubetrail.core.tls_files.ClientTls` reports it the same way
    when a rotated file is bad)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca_file, ca_path = config.get("tls.ca_file"), config.get("tls.ca_path")
    if ca_file or ca_path:
        try:
            context.load_verify_locations(cafile=ca_file, capath=ca_path)
        except (OSError, ssl.SSLError) as exc:
            key = "tls.ca_file" if ca_file else "tls.ca_path"
            raise ConfigError(f"cannot load CA certificates from {ca_file or ca_path}: {exc}", key=key) from None
    crt_file, key_file = config.get("tls.crt_file"), config.get("tls.key_file")
    if bool(crt_file) != bool(key_file):
        missing = "tls.key_file" if crt_file else "tls.crt_file"
        raise ConfigError("tls.crt_file and tls.key_file go together", key=missing)
    if crt_file:
        try:
            passwd = read_now(config.get("tls.key_passwd"))
        except SecretFileError as exc:
            raise ConfigError(str(exc), key="tls.key_passwd") from None
        _load_client_certificate(context, crt_file, str(key_file), passwd)
    if not config.get("tls.verify", True):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif not config.get("tls.verify_hostname", True):
        context.check_hostname = False
    return context


def _load_client_certificate(context: ssl.SSLContext, crt_file: str, key_file: str, passwd: str | None) -> None:
    """``load_cert_chain`` with its one "PEM lib" error told apart: which file is unreadable or
    not PEM, or a key that does not match the certificate (a half-done rotation)."""
    texts = {}
    for key, path in (("tls.crt_file", crt_file), ("tls.key_file", key_file)):
        try:
            with open(path, "rb") as handle:
                texts[key] = handle.read()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}", key=key) from None
    try:
        context.load_cert_chain(crt_file, key_file, password=passwd)
        return
    except (OSError, ssl.SSLError) as exc:
        error = exc
    if getattr(error, "reason", None) == "KEY_VALUES_MISMATCH":
        raise ConfigError(f"the key in {key_file} does not match the certificate in {crt_file}", key="tls.key_file")
    try:  # does the certificate file parse? (cadata takes PEM certificates only)
        ssl.create_default_context().load_verify_locations(cadata=texts["tls.crt_file"].decode("ascii", "replace"))
    except (ssl.SSLError, ValueError):
        raise ConfigError(f"{crt_file} holds no PEM certificate", key="tls.crt_file") from None
    hint = " (or tls.key_passwd is wrong)" if passwd else ""
    raise ConfigError(f"{key_file} holds no usable PEM private key{hint}: {error}", key="tls.key_file")


def client_tls(config: Mapping[str, Any]) -> ClientTls:
    """:func:`build_ssl_context` for ``config``, rebuilt whenever its files rotate (the key's
    password file too: an encrypted key is rotated with its password)."""
    files = {key: config.get(key) for key in ("tls.ca_file", "tls.crt_file", "tls.key_file")}
    passwd = config.get("tls.key_passwd")
    if isinstance(passwd, Secret):
        if len(passwd.files) != 1:
            raise ConfigError("may name one file (${file:/path}), not several", key="tls.key_passwd")
        files["tls.key_passwd"] = passwd.files[0].path
    return ClientTls(
        files,
        lambda: build_ssl_context(config),
        directories={"tls.ca_path": config.get("tls.ca_path")},
    )


def basic_authorization(user: str, passwd: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{passwd}".encode()).decode()


@dataclass
class HttpSettings:
    """Everything needed to talk to one destination, validated."""

    host: str
    port: int
    uri: str = "/"
    ssl_context: ssl.SSLContext | None = None  # the context at start (a fixed one if tls is None)
    server_hostname: str | None = None
    # The files behind ssl_context: each request asks it for the current context (rotations).
    tls: ClientTls | None = None
    # A value is a str or a secret read from a file (reveal() at each request).
    headers: list[tuple[str, Text]] = field(default_factory=list)
    gzip: bool = False
    connect_timeout: float = 10.0
    io_timeout: float = 60.0
    keepalive: bool = True

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> HttpSettings:
        """From the values of :func:`client_options` (raises :class:`ConfigError` naming the key)."""
        host = str(config.get("host") or "").strip()
        if not host:
            raise ConfigError("must not be empty", key="host")
        port = int(config.get("port") or 0)
        if not 0 < port < 65536:
            raise ConfigError(f"bad port {port}; expected 1-65535", key="port")
        uri = config.get("uri") or "/"
        if not uri.startswith("/"):
            uri = "/" + uri
        headers = parse_headers(config.get("header") or [])
        user, passwd = config.get("http_user"), config.get("http_passwd")
        if passwd and not user:
            raise ConfigError("http_passwd needs http_user", key="http_passwd")
        if user:
            headers.insert(0, ("Authorization", derive(basic_authorization, user, passwd)))
        token = config.get("bearer_token")
        if token:
            if user:
                raise ConfigError("use either bearer_token or http_user, not both", key="bearer_token")
            headers.append(("Authorization", derive("Bearer {}".format, token)))
        for name in ("net.connect_timeout", "net.io_timeout"):
            if config.get(name) is not None and config[name] < 0:
                raise ConfigError("must not be negative", key=name)
        tls = client_tls(config) if config.get("tls") else None
        return cls(
            host=host,
            port=port,
            uri=uri,
            ssl_context=tls.current if tls is not None else None,
            tls=tls,
            server_hostname=config.get("tls.vhost") or None,
            headers=headers,
            gzip=config.get("compress") == "gzip",
            connect_timeout=float(config.get("net.connect_timeout") or 10.0),
            io_timeout=float(config.get("net.io_timeout", 60.0) or 0.0),
            keepalive=bool(config.get("net.keepalive", True)),
        )

    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{scheme}://{host}:{self.port}"


@dataclass
class HttpResponse:
    method: str
    url: str
    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def excerpt(self, limit: int = EXCERPT_CHARS) -> str:
        text = self.body[: limit * 4].decode("utf-8", "replace").strip()
        text = " ".join(text.split())  # an HTML page or a stack trace on one log line
        return text if len(text) <= limit else text[:limit] + "..."

    def describe(self) -> str:
        return f"{self.method} {self.url}: HTTP {self.status} {self.reason}".rstrip()

    def json(self) -> Any:
        """The body as JSON, or :class:`BadResponseError` saying what came back instead."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            kind = self.headers.get("Content-Type", "no content type")
            raise BadResponseError(
                f"{self.describe()}: expected a JSON answer, got {kind}: {self.excerpt() or '(empty body)'!r}",
                self.status,
            ) from None


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds or an HTTP date -> seconds from now (None if absent/garbled)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def refuses_client_certificate(response: HttpResponse) -> bool:
    """nginx's (ingress-nginx's too) 400 for a client certificate it refuses: it verifies them
    after the handshake. The client is refused, not the data (a rotation under way): a sink that
    reads 400 as "the payload is bad" must check this first."""
    return response.status == 400 and any(text in response.body for text in CERTIFICATE_REFUSED_BODIES)


def check_status(response: HttpResponse) -> None:
    """Raise the error the sink runner should see for a non-2xx answer (see the module docstring)."""
    status = response.status
    if 200 <= status < 300:
        return
    message = f"{response.describe()}: {response.excerpt() or '(empty body)'}"
    if status >= 500 or status in RETRYABLE_STATUSES:
        raise HttpRetryableError(message, status, retry_after_seconds(response.headers.get("Retry-After")))
    if status in REFUSED_CLIENT_STATUSES:
        raise HttpRetryableError(f"{message} (check credentials, host and uri)", status)
    if refuses_client_certificate(response):
        raise HttpRetryableError(f"{message} (the server refused the client certificate: tls.crt_file)", status)
    if 400 <= status < 500:
        raise PermanentError(message)
    # 1xx/3xx: redirects are not followed (a POST body must not silently go elsewhere).
    raise BadResponseError(f"{message} (unexpected status)", status)


class SocketWritable(Protocol):
    """A request body made elsewhere (``kubetrail_native.FramedBody``): its size, the bytes from
    an offset on, and a write of ``head`` and then itself to a non-blocking socket that stops
    where the socket would block (returning the offset reached over both)."""

    def __len__(self) -> int: ...

    def tobytes(self, offset: int = 0) -> bytes: ...

    def send(self, fd: int, offset: int, head: bytes | None = None) -> int: ...


Body = bytes | SocketWritable


def gzip_sync(data: bytes) -> bytes:
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: gzip framing
    return compressor.compress(data) + compressor.flush()


async def gzip_body(data: bytes) -> bytes:
    if len(data) >= GZIP_IN_THREAD_BYTES:
        return await asyncio.to_thread(gzip_sync, data)
    return gzip_sync(data)


class HttpClient:
    """One aiohttp session to one destination, with the shared error handling; or, with
    ``plain_transport`` and no TLS, :mod:`kubetrail.sinks.http_plain`'s connections (no aiohttp
    imported: see that module for why)."""

    def __init__(self, settings: HttpSettings, *, plain_transport: bool = False) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._plain: http_plain.PlainHttpPool | None = None
        if plain_transport and settings.tls is None and settings.ssl_context is None:
            self._plain = http_plain.PlainHttpPool(
                settings.host,
                settings.port,
                connect_timeout=settings.connect_timeout,
                io_timeout=settings.io_timeout,
                keepalive=settings.keepalive,
            )

    async def start(self) -> None:
        if self._session is not None or self._plain is not None:
            return
        import aiohttp  # here, not at import: a plain-http ``http`` output never needs it

        s = self.settings
        connector = aiohttp.TCPConnector(
            ssl=s.ssl_context if s.ssl_context is not None else False,
            force_close=not s.keepalive,
            limit=0,  # the sink runner's workers bound concurrency
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=True,
            headers={"User-Agent": USER_AGENT},
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=s.connect_timeout or None,
                sock_read=s.io_timeout or None,
            ),
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        if self._plain is not None:
            self._plain.close()  # idle connections; a new request opens one again

    def url(self, path: str | None = None) -> str:
        return self.settings.base_url + (path if path is not None else self.settings.uri)

    async def request(
        self,
        method: str,
        path: str | None = None,
        body: Body | None = None,
        *,
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        compress: bool | None = None,
    ) -> HttpResponse:
        """Send one request and read the whole answer; network failures -> :class:`HttpRetryableError`.

        The status is *not* checked (see :func:`check_status` and :meth:`send`): some APIs put
        per-item results in a 200 or use 4xx for one item of many. ``compress`` defaults to the
        ``compress`` option; the configured ``header`` values come last so a user can override.
        """
        if self._session is None and self._plain is None:
            await self.start()
        s = self.settings
        url = self.url(path)
        all_headers: CIMultiDict[str] = CIMultiDict()
        if content_type:
            all_headers["Content-Type"] = content_type
        if headers:
            all_headers.update(headers)
        if body is not None and (s.gzip if compress is None else compress):
            body = await gzip_body(body if isinstance(body, bytes) else body.tobytes())
            all_headers["Content-Encoding"] = "gzip"
        for name, value in s.headers:
            all_headers[name] = value if isinstance(value, str) else value.get()  # a rotated file: its new value
        # The io timeout covers a silent server; this bounds a server that never reads the body.
        deadline = (s.connect_timeout + s.io_timeout) if s.io_timeout else None
        if self._plain is not None:
            return await self._plain_request(method, path, url, body, all_headers, params, deadline)
        return await self._aiohttp_request(method, url, body, all_headers, params, deadline)

    async def _plain_request(
        self,
        method: str,
        path: str | None,
        url: str,
        body: Body | None,
        headers: CIMultiDict[str],
        params: Mapping[str, str] | None,
        deadline: float | None,
    ) -> HttpResponse:
        assert self._plain is not None
        s = self.settings
        target = path if path is not None else s.uri
        if params:
            target += ("&" if "?" in target else "?") + urlencode(params)
        # aiohttp's defaults, so that a receiver sees the same request whichever client sent
        # it; a configured header of the same name replaces one (as aiohttp's do).
        sent: CIMultiDict[str] = CIMultiDict({"User-Agent": USER_AGENT, "Accept": "*/*"})
        sent.update(headers)
        try:
            async with asyncio.timeout(deadline):
                answer = await self._plain.request(method, target, list(sent.items()), body)
        except TimeoutError:
            raise HttpRetryableError(f"{method} {url}: no answer within {deadline or s.io_timeout:g}s") from None
        except http_plain.ConnectFailed as exc:
            raise HttpRetryableError(f"{method} {url}: cannot connect: {exc.os_error}") from None
        except (http_plain.ConnectTimeout, http_plain.ReadTimeout) as exc:
            raise HttpRetryableError(f"{method} {url}: {exc}") from None
        except http_plain.MalformedAnswer as exc:
            raise BadResponseError(f"{method} {url}: malformed HTTP answer: {exc}") from None
        except (http_plain.PlainHttpError, OSError) as exc:
            raise HttpRetryableError(f"{method} {url}: {type(exc).__name__}: {exc}") from None
        return HttpResponse(
            method, url, answer.status, answer.reason, CIMultiDictProxy(CIMultiDict(answer.headers)), answer.body
        )

    async def _aiohttp_request(
        self,
        method: str,
        url: str,
        body: Body | None,
        all_headers: CIMultiDict[str],
        params: Mapping[str, str] | None,
        deadline: float | None,
    ) -> HttpResponse:
        import aiohttp

        from kubetrail.sinks.http_streamed import STREAMED_BODY_BYTES, StreamedBody

        assert self._session is not None
        s = self.settings
        payload: bytes | StreamedBody | None = body if isinstance(body, bytes) or body is None else StreamedBody(body)
        if isinstance(body, bytes) and len(body) >= STREAMED_BODY_BYTES:
            payload = StreamedBody(body)
        try:
            async with asyncio.timeout(deadline):
                async with self._session.request(
                    method,
                    url,
                    data=payload,
                    headers=all_headers,
                    params=params,
                    allow_redirects=False,
                    server_hostname=s.server_hostname,
                    # The rotated context, if any: aiohttp pools connections by context, so
                    # requests after a rotation open new ones and open ones finish with theirs.
                    ssl=s.tls.context() if s.tls is not None else True,
                ) as response:
                    data = await response.read()
                    return HttpResponse(method, url, response.status, response.reason or "", response.headers, data)
        except TimeoutError:
            raise HttpRetryableError(f"{method} {url}: no answer within {deadline or s.io_timeout:g}s") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise HttpRetryableError(f"{method} {url}: TLS certificate rejected: {exc.certificate_error}") from None
        except aiohttp.ClientConnectorError as exc:
            raise HttpRetryableError(f"{method} {url}: cannot connect: {exc.os_error}") from None
        except aiohttp.ServerTimeoutError:
            raise HttpRetryableError(f"{method} {url}: no answer within {s.io_timeout:g}s") from None
        except aiohttp.ClientResponseError as exc:  # malformed status line or headers
            raise BadResponseError(f"{method} {url}: malformed HTTP answer: {exc.message}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise HttpRetryableError(f"{method} {url}: {type(exc).__name__}: {exc}") from None

    async def send(self, method: str, path: str | None = None, body: Body | None = None, **kwargs: Any) -> HttpResponse:
        """:meth:`request`, then :func:`check_status`: returns only 2xx answers."""
        response = await self.request(method, path, body, **kwargs)
        check_status(response)
        return response


class HttpSink(Sink):
    """A sink with one :class:`HttpClient` built from :func:`client_options` values."""

    # Whether plain-TCP requests go through kubetrail.sinks.http_plain instead of aiohttp (the
    # http output's; the other outputs keep aiohttp, whose behaviour their tests pin down).
    plain_transport = False

    def __init__(self, ctx: ComponentContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.http = HttpClient(HttpSettings.from_config(config), plain_transport=self.plain_transport)
        if self.http.settings.tls is not None:
            self.http.settings.tls.bind(ctx.logger, ctx.metrics)  # a bad rotated file logs and counts as this sink

    async def start(self) -> None:
        await self.http.start()

    async def close(self) -> None:
        await self.http.close()
