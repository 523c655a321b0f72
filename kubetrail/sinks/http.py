"""The ``http`` output: one POST (or PUT) per batch, with Fluent Bit's options.

Formats are Fluent Bit's JSON family (``json``, ``json_lines``, ``json_stream``) encoded by
:mod:`kubetrail.sinks.json_format`, the same code as ``stdout``; an unmodified batch in
``json_lines`` without a date key is sent as the source's own bytes. Fluent Bit's default format
is ``msgpack``, which kubetrail does not write: the default here is ``json``, and ``msgpack`` or
``gelf`` are configuration errors rather than a silent change of wire format.

A batch is acknowledged after a 2xx; everything else follows
:func:`~kubetrail.sinks.http_base.check_status` (retry 408/429/5xx/network errors, dead-letter
other 4xx with the server's reason).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetrail.core.component import ComponentContext
from kubetrail.core.options import Option
from kubetrail.core.record import Batch
from kubetrail.sinks.http_base import HttpSink, client_options
from kubetrail.sinks.json_format import JSON_DATE_OPTIONS, JSON_FORMATS, date_key_option, encode_batch

CONTENT_TYPES = {
    "json": "application/json",
    "json_lines": "application/x-ndjson",
    "json_stream": "application/json",
}


class HttpOutputSink(HttpSink):
    plugin_name = "http"
    description = "POSTs each batch as JSON to an HTTP endpoint"
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
    )

    def __init__(self, ctx: ComponentContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.format: str = config["format"]
        self.date_key = date_key_option(config["json_date_key"])
        self.date_format: str = config["json_date_format"]
        self.method: str = config["http_method"].upper()
        self.header_tag: str | None = config["header_tag"] or None
        self.content_type = CONTENT_TYPES[self.format]

    async def write(self, batch: Batch) -> None:
        body = encode_batch(batch, self.format, self.date_key, self.date_format)
        headers = {self.header_tag: batch.tag} if self.header_tag else None
        await self.http.send(self.method, None, body, content_type=self.content_type, headers=headers)
