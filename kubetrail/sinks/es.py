"""The ``es`` output: Elasticsearch ``_bulk`` with Fluent Bit's options, idempotent and per item.

Design decisions:

* **Ids and replays.** A record's ``_id`` is, in order: the value of ``id_key`` in the record;
  the record's identity (:func:`~kubetrail.core.record.identity_key`: an Event's ``(uid,
  resourceVersion)``, an audit ``(auditID, stage)``); with ``generate_id on`` a hash of the
  record (Fluent Bit's behaviour); otherwise none (the server makes one). With an id, the
  default ``write_operation create`` makes a replay harmless: the server answers 409
  ``version_conflict_engine_exception`` for a document that is already there, and that answer
  counts as *delivered*. ``create`` rather than ``index`` with ``_id``: both store one document,
  but ``index`` rewrites it on every replay (a new ``_version``, a new segment entry, work for
  merges) while ``create`` leaves the stored document untouched and is Fluent Bit's default.
* **Per-item results.** ``_bulk`` answers 200 with one result per action. Items that failed
  retryably (429, 5xx, ``cluster_block_exception``, ``es_rejected_execution_exception``) are
  remembered with their batch and only *they* are sent on the next attempt (the sink runner
  retries the same batch object with backoff); items already stored are never resent. Items
  refused for good (400 mapping errors, ...) are collected with their reason and, once nothing
  retryable is left, reported in one :class:`PermanentError` whose ``rejected`` lists each
  record with the server's reason, so the runner can dead-letter exactly those.
* **Whole-request failures** follow :func:`~kubetrail.sinks.http_base.check_status`; a 413
  (request too large) splits the remaining items in halves instead of failing them.
* **Differences from Fluent Bit**: ``type`` has no default, so no ``_type`` is sent (Elasticsearch
  8 and OpenSearch 2 refuse the request when it is; set ``type`` for Elasticsearch 6);
  ``buffer_size`` is accepted but the whole answer is always read, since per-item handling needs
  every item; the time key is not added when the record already has one (Fluent Bit adds a
  second one and the server rejects the document).
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from kubetrail.core.accessor import RecordAccessor, value_as_text
from kubetrail.core.component import ComponentContext
from kubetrail.core.config.compat import no_effect
from kubetrail.core.errors import ConfigError, PermanentError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record, identity_key
from kubetrail.core.secrets import Text, derive, reveal
from kubetrail.core.values import parse_size
from kubetrail.sinks.http_base import (
    BadResponseError,
    HttpResponse,
    HttpRetryableError,
    HttpSink,
    check_status,
    client_options,
)

WRITE_OPERATIONS = ("create", "index", "update", "upsert")
RETRYABLE_ITEM_TYPES = frozenset({"cluster_block_exception", "es_rejected_execution_exception"})
MAX_PENDING_BATCHES = 256  # per-item retry state kept for this many batches at most
TRACE_CHARS = 2000


def es_options(default_index: str) -> tuple[Option, ...]:
    """Options of ``es`` and ``opensearch`` (Fluent Bit's, same names and defaults)."""
    return (
        *client_options(9200),
        Option("path", "str", "", help="Path prefix in front of /_bulk (a reverse proxy's sub-path)"),
        Option("pipeline", help="Ingest pipeline to run on the server"),
        Option("index", "str", default_index, help="Index name (without logstash_format)"),
        Option("type", help="Mapping type sent as _type (Elasticsearch < 7 only; none by default)"),
        Option("suppress_type_name", "bool", False, help="Never send _type, even with 'type' set"),
        Option("logstash_format", "bool", False, help="Index per day: <logstash_prefix>-<date>"),
        Option("logstash_prefix", "str", "logstash", help="Index prefix with logstash_format"),
        Option("logstash_prefix_key", help="Record key whose value replaces logstash_prefix"),
        Option("logstash_prefix_separator", "str", "-", help="Between the prefix and the date"),
        Option("logstash_dateformat", "str", "%Y.%m.%d", help="strftime format of the index date (UTC)"),
        Option("current_time_index", "bool", False, help="Date the index by the current time, not the record's"),
        Option("time_key", "str", "@timestamp", help="Key for the record time added to each document"),
        Option("time_key_format", "str", "%Y-%m-%dT%H:%M:%S", help="strftime format of time_key (UTC)"),
        Option("time_key_nanos", "bool", False, help="Nanoseconds instead of milliseconds in time_key"),
        Option("include_tag_key", "bool", False, help="Add the tag to each document"),
        Option("tag_key", "str", "_flb-key", help="Key for the tag with include_tag_key"),
        Option("id_key", help="Record key whose value is the document _id"),
        Option("generate_id", "bool", False, help="_id from a hash of the record when it has no identity"),
        Option("write_operation", "choice", "create", choices=WRITE_OPERATIONS),
        Option("replace_dots", "bool", False, help="Replace '.' in keys with '_'"),
        Option("buffer_size", "str", "512k", help="Accepted for Fluent Bit compatibility; answers are read whole"),
        Option("trace_output", "bool", False, help="Log every bulk request (debugging)"),
        Option("trace_error", "bool", False, help="Log the server's error and the record for each failed item"),
        Option("target_index", help="Index per record from record accessors ($ns); index when one is missing"),
        Option("cloud_id", help="Elastic Cloud deployment id: sets host, port 443 and TLS"),
        Option("cloud_auth", help="Elastic Cloud USER:PASSWORD (basic authentication)", secret=True),
        # Amazon OpenSearch Service's SigV4 signing is not implemented: aws_auth on is refused.
        Option("aws_auth", "bool", False, help="Not supported (SigV4 signing); on is refused"),
        *(
            no_effect(name, why="aws_auth (SigV4 signing) is not supported")
            for name in (
                "aws_region",
                "aws_sts_endpoint",
                "aws_role_arn",
                "aws_external_id",
                "aws_service_name",
                "aws_profile",
            )
        ),
    )


def cloud_settings(cloud_id: str, cloud_auth: Text | None) -> dict[str, Any]:
    """Fluent Bit's Elastic Cloud options: ``cloud_id`` is ``NAME:BASE64`` where BASE64 decodes
    to ``REGION_HOST[:PORT]$ES_ID$KIBANA_ID``; the Elasticsearch host is ``ES_ID.REGION_HOST``,
    over TLS, port 443 unless the id names one. ``cloud_auth`` is ``USER:PASSWORD``."""
    _, _, encoded = cloud_id.strip().rpartition(":")
    try:
        decoded = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=False).decode()
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"cloud_id {cloud_id!r} is not NAME:BASE64", key="cloud_id") from None
    parts = decoded.split("$")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ConfigError(f"cloud_id {cloud_id!r} does not decode to REGION$ES_ID$...", key="cloud_id")
    region, _, port = parts[0].partition(":")
    settings: dict[str, Any] = {"host": f"{parts[1]}.{region}", "port": int(port) if port.isdigit() else 443}
    settings["tls"] = True
    if cloud_auth:
        if ":" not in (reveal(cloud_auth) or ""):
            raise ConfigError("cloud_auth is USER:PASSWORD", key="cloud_auth")
        # From a file, both halves follow it (derive): the user may rotate with the password.
        settings["http_user"] = derive(lambda text: text.partition(":")[0], cloud_auth)
        settings["http_passwd"] = derive(lambda text: text.partition(":")[2], cloud_auth)
    return settings


_TARGET_PART = re.compile(r"\$[A-Za-z_][A-Za-z0-9_.\-]*(?:\[\s*(?:'[^']*'|\"[^\"]*\"|\d+)\s*\])*")


def target_index(template: str) -> Callable[[dict[str, Any]], str | None]:
    """``target_index``: the template with each ``$accessor`` replaced by the record's value;
    None when a value is missing (the caller then uses ``index``, as Fluent Bit does)."""
    parts: list[str | RecordAccessor] = []
    position = 0
    for found in _TARGET_PART.finditer(template):
        parts.append(template[position : found.start()])
        parts.append(RecordAccessor(found.group(0)))
        position = found.end()
    parts.append(template[position:])

    def render(body: dict[str, Any]) -> str | None:
        out = []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = value_as_text(part.get(body))
            if not value:
                return None
            out.append(value)
        return "".join(out)

    return render


def _replace_dots(value: Any) -> Any:
    if isinstance(value, dict):
        return {key.replace(".", "_"): _replace_dots(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_replace_dots(item) for item in value]
    return value


def item_reason(error: Any) -> str:
    """``type: reason (caused by type: reason)`` from a bulk item's ``error`` object."""
    if not isinstance(error, dict):
        return str(error)
    text = f"{error.get('type', 'error')}: {error.get('reason', '')}".rstrip(": ")
    cause = error.get("caused_by")
    if isinstance(cause, dict):
        text += f" (caused by {item_reason(cause)})"
    return text


@dataclass
class _Pending:
    """What is left of one batch between attempts."""

    batch: Batch  # kept referenced so that id(batch) cannot be reused while this entry lives
    remaining: list[int]
    rejected: list[tuple[Record, str]] = field(default_factory=list)


class EsSink(HttpSink):
    plugin_name = "es"
    description = "Elasticsearch _bulk API, one document per record, idempotent with record ids"
    options = (
        *es_options("fluent-bit"),
        Option("http_api_key", help="Sent as 'Authorization: ApiKey <key>'", secret=True),
    )

    def __init__(self, ctx: ComponentContext, config: Mapping[str, Any]) -> None:
        if config.get("aws_auth"):
            raise ConfigError(
                "aws_auth on (AWS SigV4 signing for Amazon OpenSearch Service) is not supported; use the domain's "
                "fine-grained access control with http_user/http_passwd, or a SigV4 signing proxy",
                key="aws_auth",
            )
        if config.get("cloud_id"):
            config = {**config, **cloud_settings(config["cloud_id"], config.get("cloud_auth"))}
        elif config.get("cloud_auth"):
            raise ConfigError("cloud_auth needs cloud_id", key="cloud_auth")
        super().__init__(ctx, config)
        c = config
        self.index: str = c["index"]
        self.target_index = target_index(c["target_index"]) if c.get("target_index") else None
        self.type_name: str | None = None if c["suppress_type_name"] else (c["type"] or None)
        self.logstash_format: bool = c["logstash_format"]
        self.logstash_prefix: str = c["logstash_prefix"]
        self.prefix_key = RecordAccessor(c["logstash_prefix_key"]) if c["logstash_prefix_key"] else None
        self.separator: str = c["logstash_prefix_separator"]
        self.dateformat: str = c["logstash_dateformat"]
        self.current_time_index: bool = c["current_time_index"]
        self.time_key: str = c["time_key"]
        self.time_key_bytes = orjson.dumps(self.time_key)
        self.time_key_format: str = c["time_key_format"]
        self.time_key_nanos: bool = c["time_key_nanos"]
        self.tag_key: str | None = c["tag_key"] if c["include_tag_key"] else None
        self.id_key = RecordAccessor(c["id_key"]) if c["id_key"] else None
        self.generate_id: bool = c["generate_id"]
        self.operation: str = c["write_operation"]
        self.replace_dots: bool = c["replace_dots"]
        self.trace_output: bool = c["trace_output"]
        self.trace_error: bool = c["trace_error"]
        self.bulk_path = "/" + "/".join(p for p in (c["path"].strip("/"), "_bulk") if p)
        self.params = {"pipeline": c["pipeline"]} if c["pipeline"] else None
        buffer_size = c["buffer_size"].strip().lower()
        if buffer_size not in ("false", "off"):
            try:
                parse_size(buffer_size)
            except ValueError as exc:
                raise ConfigError(f"{exc}, or false for no limit", key="buffer_size") from None
        if self.operation in ("update", "upsert") and self.id_key is None and not self.generate_id:
            raise ConfigError(
                f"write_operation {self.operation} needs document ids: set id_key or generate_id on",
                key="write_operation",
            )
        for name in ("logstash_dateformat", "time_key_format"):
            try:
                time.strftime(c[name], time.gmtime(0))
            except ValueError as exc:
                raise ConfigError(f"bad strftime format: {exc}", key=name) from None
        api_key = c.get("http_api_key")
        if api_key:
            if c.get("http_user"):
                raise ConfigError("use either http_api_key or http_user, not both", key="http_api_key")
            self.http.settings.headers.insert(0, ("Authorization", derive("ApiKey {}".format, api_key)))
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self.m_replayed = self.metrics.counter(
            "kubetrail_es_replayed_documents",
            "Documents the server already held (409 to create): replays absorbed by the _id",
        )
        self._date_cache: tuple[int, str] = (-1, "")
        self._time_cache: tuple[int, str] = (-1, "")

    # -- building the request -------------------------------------------------------------

    def _index_for(self, record: Record) -> str:
        if not self.logstash_format:
            if self.target_index is not None:  # in place of index, which stays the fallback
                return self.target_index(record.body) or self.index
            return self.index
        prefix = self.logstash_prefix
        if self.prefix_key is not None:
            value = self.prefix_key.get(record.body)
            if isinstance(value, str) and value:
                prefix = value
        seconds = int(time.time()) if self.current_time_index else record.time_ns // 1_000_000_000
        cached_second, date = self._date_cache
        if cached_second != seconds:
            date = time.strftime(self.dateformat, time.gmtime(seconds))
            self._date_cache = (seconds, date)
        return f"{prefix}{self.separator}{date}"

    def _time_text(self, time_ns: int) -> str:
        seconds, nanos = divmod(time_ns, 1_000_000_000)
        cached_second, base = self._time_cache
        if cached_second != seconds:
            base = time.strftime(self.time_key_format, time.gmtime(seconds))
            self._time_cache = (seconds, base)
        fraction = f"{nanos:09d}" if self.time_key_nanos else f"{nanos // 1_000_000:03d}"
        return f"{base}.{fraction}Z"

    def _document(self, record: Record) -> bytes:
        """The document: the record plus the time key (and tag), reusing its bytes when possible."""
        if self.replace_dots or self.tag_key is not None:
            body = dict(record.body)
            if self.replace_dots:
                body = _replace_dots(body)
            if self.tag_key is not None:
                body[self.tag_key] = record.tag
            if self.time_key not in body:
                body = {self.time_key: self._time_text(record.time_ns), **body}
            return orjson.dumps(body)
        raw = record.json_bytes()
        # Cheap test first: only a record whose bytes mention the key can have it.
        if self.time_key_bytes in raw and self.time_key in record.body:
            return raw
        prefix = self.time_key_bytes + b":" + orjson.dumps(self._time_text(record.time_ns))
        return b"{" + prefix + (b"}" if raw == b"{}" else b"," + raw[1:])

    def _doc_id(self, record: Record, document: bytes) -> str | None:
        if self.id_key is not None:
            value = self.id_key.get(record.body)
            if value is not None and value != "":
                return value if isinstance(value, str) else orjson.dumps(value).decode()
        key = identity_key(record)
        if key is not None:
            return key
        if self.generate_id:
            return hashlib.blake2b(record.tag.encode() + b"\0" + document, digest_size=16).hexdigest()
        return None

    def _action(self, record: Record, document: bytes) -> bytes:
        meta: dict[str, str] = {"_index": self._index_for(record)}
        if self.type_name:
            meta["_type"] = self.type_name
        doc_id = self._doc_id(record, document)
        if doc_id is not None:
            meta["_id"] = doc_id
        if self.operation == "update":
            return orjson.dumps({"update": meta}) + b"\n" + b'{"doc":' + document + b"}\n"
        if self.operation == "upsert":
            return orjson.dumps({"update": meta}) + b"\n" + b'{"doc":' + document + b',"doc_as_upsert":true}\n'
        return orjson.dumps({self.operation: meta}) + b"\n" + document + b"\n"

    # -- delivery -------------------------------------------------------------------------

    async def write(self, batch: Batch) -> None:
        key = id(batch)
        pending = self._pending.get(key)
        if pending is None or pending.batch is not batch:
            pending = _Pending(batch, list(range(len(batch))))
            self._pending[key] = pending
            while len(self._pending) > MAX_PENDING_BATCHES:
                self._pending.popitem(last=False)  # a stale entry only means resending, with ids
        records = batch.records
        retry_errors: list[str] = []
        still: list[int] = []
        for chunk in await self._send_split(records, pending.remaining):
            indices, results = chunk
            for index, result in zip(indices, results, strict=True):
                outcome, reason = result
                if outcome == "retry":
                    still.append(index)
                    retry_errors.append(reason)
                elif outcome == "reject":
                    pending.rejected.append((records[index], reason))
        pending.remaining = sorted(still)
        if still:
            raise HttpRetryableError(
                f"{len(still)} of {len(batch)} documents failed and will be retried alone: {retry_errors[0]}"
            )
        self._pending.pop(key, None)
        if pending.rejected:
            reasons = sorted({reason for _, reason in pending.rejected})
            raise PermanentError(
                f"{len(pending.rejected)} of {len(batch)} documents rejected by the server "
                f"(the others were stored): {'; '.join(reasons[:3])}",
                rejected=pending.rejected,
            )

    async def _send_split(
        self, records: list[Record], indices: list[int]
    ) -> list[tuple[list[int], list[tuple[str, str]]]]:
        """Send ``indices``; on 413 send each half on its own. Returns per-item outcomes."""
        response = await self._send(records, indices)
        if response.status == 413 and len(indices) > 1:
            half = len(indices) // 2
            return [*await self._send_split(records, indices[:half]), *await self._send_split(records, indices[half:])]
        check_status(response)
        return [(indices, self._outcomes(response, records, indices))]

    async def _send(self, records: list[Record], indices: list[int]) -> HttpResponse:
        body = b"".join([self._action(records[i], self._document(records[i])) for i in indices])
        if self.trace_output:
            self.log.info(
                "bulk request", extra={"actions": len(indices), "body": body[:TRACE_CHARS].decode("utf-8", "replace")}
            )
        return await self.http.request(
            "POST", self.bulk_path, body, content_type="application/x-ndjson", params=self.params
        )

    def _outcomes(self, response: HttpResponse, records: list[Record], indices: list[int]) -> list[tuple[str, str]]:
        """("ok" | "retry" | "reject", reason) per item of a 2xx bulk answer."""
        answer = response.json()
        items = answer.get("items") if isinstance(answer, dict) else None
        if not isinstance(items, list) or len(items) != len(indices):
            got = f"{len(items)} items" if isinstance(items, list) else "no 'items' list"
            raise BadResponseError(
                f"{response.describe()}: bulk answer has {got} for {len(indices)} actions: {response.excerpt()!r}",
                response.status,
            )
        if answer.get("errors") is False:
            return [("ok", "")] * len(indices)
        outcomes: list[tuple[str, str]] = []
        for index, item in zip(indices, items, strict=True):
            result = next(iter(item.values()), None) if isinstance(item, dict) and item else None
            if not isinstance(result, dict) or not isinstance(result.get("status"), int):
                outcomes.append(("retry", f"malformed bulk item {item!r}"))
                continue
            status: int = result["status"]
            error = result.get("error")
            if 200 <= status < 300:
                outcomes.append(("ok", ""))
                continue
            reason = f"HTTP {status} {item_reason(error)}"
            if status == 409 and self.operation == "create":
                outcomes.append(("ok", ""))  # already stored by an earlier attempt: the replay case
                self.m_replayed.inc()
                continue
            error_type = error.get("type") if isinstance(error, dict) else None
            retry = status == 429 or status >= 500 or error_type in RETRYABLE_ITEM_TYPES
            if self.trace_error:
                self.log.error(
                    "document failed",
                    extra={
                        "reason": reason,
                        "retry": retry,
                        "record": records[index].json_bytes()[:TRACE_CHARS].decode("utf-8", "replace"),
                    },
                )
            outcomes.append(("retry" if retry else "reject", reason))
        return outcomes


class ElasticsearchSink(EsSink):
    """``elasticsearch``: Fluent Bit 5.1's alias of ``es`` (same options, same output)."""

    plugin_name = "elasticsearch"
