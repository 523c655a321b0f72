"""The ``http`` output: one POST (or PUT) per batch or group of batches, with Fluent Bit's options.

Formats are Fluent Bit's JSON family (``json``, ``json_lines``, ``json_stream``) encoded by
:mod:`kubetrail.sinks.json_format`, the same code as ``stdout``; an unmodified batch in
``json_lines`` without a date key is sent as the source's own bytes. Fluent Bit's default format
is ``msgpack``, which kubetrail does not write: the default here is ``json``, and ``msgpack`` or
``gelf`` are configuration errors rather than a silent change of wire format.

A batch is acknowledged after a 2xx; everything else follows
:func:`~kubetrail.sinks.http_base.check_status` (retry 408/429/5xx/network errors, dead-letter
other 4xx with the server's reason).

A block with a date key (or in ``json``) is not framed into a new bytes object: the native
``FramedBody`` formats only each line's prefix (the date, the separators) and, on a plain TCP
connection, writes prefixes and lines to the socket with ``writev`` straight from the block,
as the file output writes ``out_file``. Every request filled a buffer
as large as its batch before (and aiohttp joined it with the headers into a second one), which
cost more CPU than the send itself. The bytes on the wire are the same as ``encode_batch``'s
(tests compare them); gzip and TLS take the framed bytes.

Without ``tls`` the requests go through :mod:`kubetrail.sinks.http_plain` (h11 on a socket of
its own), not aiohttp: importing aiohttp cost ~0.1 s of CPU per process, about 11% of a
300,000-line run, and its per-request Python more than h11's; where the socket would block the
request waits for it on the event loop and goes on from the offset reached, instead of copying
the rest of the body into aiohttp's transport. With ``tls`` aiohttp serves as before.

Batches queued one behind the other share one request (``group_key`` / ``write_group``, the
sink runner's group write) up to ``group_max_bytes`` of input, 2 MiB: about one Fluent Bit
chunk, the most Fluent Bit's http output sends in one request, so a receiver sized for Fluent
Bit takes them. Each request cost ~0.2 ms of CPU here whatever its size (aiohttp's Python and
the kernel's loopback path), about 50 ms over 266 MB in 1 MiB batches; half as many requests
save half of that. The bodies are joined natively (``FramedBody.join``: no line copied; one
array for ``json``). A failed request delivered nothing, and the runner then sends each batch
on its own. ``json_lines`` without a date key is not grouped: its body is the block itself,
and joining blocks would copy every byte.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetrail.core.component import ComponentContext
from kubetrail.core.config.compat import no_effect
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch
from kubetrail.sinks.http_base import Body, HttpSink, client_options
from kubetrail.sinks.json_format import (
    JSON_DATE_OPTIONS,
    JSON_FORMATS,
    block_frame_args,
    block_framing,
    date_key_option,
    encode_batch,
)

try:  # optional (built from native/): a block's framed body, written from the block itself
    from kubetrail_native import FramedBody as _FramedBody
except ImportError:  # pragma: no cover - depends on the installation
    _FramedBody = None
FramedBody: Any = _FramedBody

CONTENT_TYPES = {
    "json": "application/json",
    "json_lines": "application/x-ndjson",
    "json_stream": "application/json",
}


class HttpOutputSink(HttpSink):
    plugin_name = "http"
    description = "POSTs each batch as JSON to an HTTP endpoint"
    # Batches queued together share a request up to this many input bytes: about a Fluent Bit
    # chunk (2 MB), the most its http output sends at once, so no receiver sees bigger bodies.
    group_max_bytes = 2 * 1024 * 1024
    plain_transport = True  # without tls: kubetrail.sinks.http_plain, not aiohttp (module docstring)
    options = (
        *client_options(80, "/", bearer_token=True),
        Option(
            "format", "choice", "json", choices=JSON_FORMATS, help="Body format (Fluent Bit's msgpack is not written)"
        ),
        *JSON_DATE_OPTIONS,
        Option("http_method", "choice", "post", choices=("post", "put")),
        Option("header_tag", help="Header that carries the batch's tag"),
        Option("log_response_payload", "bool", True, help="Accepted; errors always quote the start of the answer"),
        Option("allow_duplicated_headers", "bool", True, help="Accepted for Fluent Bit compatibility"),
        Option("http.response_timeout", "duration", None, help="Time to wait for an answer (sets net.io_timeout)"),
        no_effect("http.read_idle_timeout", "duration", None, why="net.io_timeout bounds every read"),
        # Fluent Bit features this output does not have: accepted while off, refused when used.
        Option("aws_auth", "bool", False, help="Not supported (AWS SigV4 signing); on is refused"),
        Option("oauth2.enable", "bool", False, help="Not supported (OAuth 2.0 client credentials); on is refused"),
        Option("proxy", help="Not supported; refused when set"),
        Option("body_key", help="Not supported (one request per record); refused when set"),
        Option("headers_key", help="Not supported (one request per record); refused when set"),
        *(
            no_effect(name, why="aws_auth (SigV4 signing) is not supported")
            for name in (
                "aws_region",
                "aws_service",
                "aws_sts_endpoint",
                "aws_role_arn",
                "aws_external_id",
                "aws_profile",
            )
        ),
        *(
            no_effect(f"oauth2.{name}", why="oauth2 is not supported")
            for name in (
                "audience",
                "auth_method",
                "client_id",
                "client_secret",
                "connect_timeout",
                "jwt_aud",
                "jwt_cert_file",
                "jwt_header",
                "jwt_key_file",
                "jwt_ttl_seconds",
                "refresh_skew_seconds",
                "resource",
                "scope",
                "timeout",
                "token_url",
                "user_agent",
            )
        ),
        *(
            no_effect(f"gelf_{name}_key", why="format gelf is not written here; use the gelf output")
            for name in ("timestamp", "host", "short_message", "full_message", "level")
        ),
    )

    def __init__(self, ctx: ComponentContext, config: Mapping[str, Any]) -> None:
        refused = {
            "aws_auth": "AWS SigV4 signing is not supported; put a signing proxy in front, or use the service's "
            "own credentials (header, http_user/http_passwd, bearer_token)",
            "oauth2.enable": "OAuth 2.0 client credentials are not supported; use bearer_token or a header",
            "proxy": "an HTTP proxy is not supported by this output",
            "body_key": "one request per record is not supported; requests carry whole batches",
            "headers_key": "headers per record are not supported; use header (fixed) or header_tag",
        }
        for key, why in refused.items():
            if config.get(key):
                raise ConfigError(f"{key}: {why}", key=key)
        if config.get("http.response_timeout") is not None:
            config = {**config, "net.io_timeout": config["http.response_timeout"]}
        super().__init__(ctx, config)
        self.format: str = config["format"]
        self.date_key = date_key_option(config["json_date_key"])
        self.date_format: str = config["json_date_format"]
        self.method: str = config["http_method"].upper()
        self.header_tag: str | None = config["header_tag"] or None
        self.content_type = CONTENT_TYPES[self.format]
        spec = block_framing(self.format, None, self.date_format)
        assert spec is not None  # without a date key every JSON format has a framing
        self.join = spec[2]  # how the format joins records: a line each, one array, back to back

    def body(self, batch: Batch) -> Body:
        """The request body: a block framed natively where it can be (see the module
        docstring), else ``encode_batch``'s bytes (records; a block of ``json_lines`` without
        a date key is its own bytes already)."""
        if FramedBody is not None and (self.format != "json_lines" or self.date_key is not None):
            args = block_frame_args(batch, self.format, self.date_key, self.date_format)
            if args is not None:
                framed: Body | None = FramedBody.build(*args)
                if framed is not None:
                    return framed
        return encode_batch(batch, self.format, self.date_key, self.date_format)

    async def write(self, batch: Batch) -> None:
        await self.write_group([batch])

    def group_key(self, batch: Batch) -> object | None:
        """Batches queued one behind the other go out in one request (see the module
        docstring) where their bodies are framed natively (joined without copying a line);
        with ``header_tag`` only batches of one tag, since the header names one."""
        if FramedBody is None or (self.format == "json_lines" and self.date_key is None):
            return None  # the body is the block itself: joining would copy every byte
        return batch.tag if self.header_tag else ""

    async def write_group(self, batches: list[Batch]) -> None:
        """One request for ``batches`` (all delivered by its 2xx, or none: the runner then
        sends each again on its own)."""
        body = self.joined_body([self.body(batch) for batch in batches])
        headers = {self.header_tag: batches[0].tag} if self.header_tag else None
        await self.http.send(self.method, None, body, content_type=self.content_type, headers=headers)

    def joined_body(self, bodies: list[Body]) -> Body:
        """The bodies of several batches as the body of one batch holding all their records:
        natively without copying a line, else as bytes (``json``: one array)."""
        if len(bodies) == 1:
            return bodies[0]
        join = self.join
        if FramedBody is not None and not any(isinstance(body, bytes) for body in bodies):
            joined: Body | None = FramedBody.join(bodies, join)
            if joined is not None:
                return joined
        data = [body if isinstance(body, bytes) else body.tobytes() for body in bodies]
        if join != 1:
            return b"".join(data)
        inner = [body[1:-2] for body in data if body != b"[]\n"]  # each is "[...]\n"
        return b"[" + b",".join(inner) + b"]\n"
