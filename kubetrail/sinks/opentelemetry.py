"""The ``opentelemetry`` output: OTLP/HTTP logs, protobuf (default) or JSON.

Options are Fluent Bit's (``host``, ``port``, ``logs_uri``, ``header``, ``http_user``,
``http_passwd``, ``compress gzip``, ``tls``/``tls.*``, ``logs_body_key``,
``logs_severity_text_message_key``, ``logs_severity_number_message_key``,
``logs_trace_id_message_key``, ``logs_span_id_message_key``, ``add_label``,
``log_response_payload``) through the shared HTTP client (:mod:`.http_base`); ``encoding``
(``protobuf``/``json``) is kubetrail's: Fluent Bit sends protobuf only.

Mapping, following OpenTelemetry's semantic conventions:

* **Resource** (one ``ResourceLogs`` per distinct resource in a batch): from the ``kubernetes``
  filter's metadata ``k8s.namespace.name``, ``k8s.pod.name``, ``k8s.pod.uid``,
  ``k8s.container.name``, ``k8s.node.name``, ``container.id``, ``container.image.name``,
  ``container.image.tag``, ``k8s.pod.label.<key>``, ``k8s.pod.annotation.<key>``; plus every
  ``add_label``. For a Kubernetes Event, the object it is about: ``k8s.namespace.name`` and,
  by kind, ``k8s.pod.name``/``.uid``, ``k8s.node.name``/``.uid``, ``k8s.deployment.*``,
  ``k8s.replicaset.*``, ``k8s.statefulset.*``, ``k8s.daemonset.*``, ``k8s.job.*``,
  ``k8s.cronjob.*``; and ``k8s.object.kind``/``.name``/``.uid``/``.fieldpath``/
  ``.api_version``/``.resource_version`` as the collector's k8sevents receiver names them
  (semconv has no attribute for an arbitrary object).
* **Events** get ``event_name`` ``k8s.event`` and the attributes of the (experimental) semconv
  event of that name: ``k8s.event.uid``, ``.name``, ``.reason``, ``.action``, ``.count``,
  ``.start_time``; severity WARN (13) for ``type: Warning``, INFO (9) for ``Normal``; the
  body is the Event's ``message``/``note`` and the rest of the object stays in attributes
  (``k8s.event.*`` keys only; the full object is large and its identity is kept, below).
* **Other records**: the body is the first present key of ``logs_body_key`` (default
  ``message``, ``log``, ``msg``), else the whole record as a map; the other keys become
  attributes (nested maps as kvlist values); severity from ``logs_severity_number_message_key``
  / ``logs_severity_text_message_key`` or, failing those, a ``level``/``severity`` key
  (``info``, ``W``, ``error`` ...), mapped onto the data model's severity numbers.
* **Time**: ``time_unix_nano`` is the record's time in nanoseconds; ``observed_time_unix_nano``
  when kubetrail sent it. A record's identity becomes ``log.record.uid`` (semconv), so a
  backend can drop the duplicates an at-least-once replay can cause.

Partial success: OTLP answers 200 with ``partial_success.rejected_log_records`` and a message
but does not say *which* records it refused. Resending would duplicate the accepted ones, so
the batch is not retried: it is reported as a :class:`PermanentError` with every record of the
batch and a reason saying "N of M were rejected (OTLP does not say which): <message>", so the
dead-letter file holds all candidates and none is lost silently.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import orjson
from google.protobuf.message import DecodeError, EncodeError
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

from kubetrail import __version__
from kubetrail.core.component import ComponentContext
from kubetrail.core.errors import ConfigError, PermanentError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record, identity_key
from kubetrail.sinks.http_base import BadResponseError, HttpResponse, HttpSink, client_options, parse_headers

# The log data model's severity numbers (first of each range).
SEVERITY_NUMBERS = {
    "trace": 1, "debug": 5, "info": 9, "notice": 10, "warn": 13, "warning": 13, "error": 17, "err": 17,
    "crit": 21, "critical": 21, "fatal": 21, "alert": 22, "emerg": 23, "panic": 23,
    "t": 1, "d": 5, "i": 9, "w": 13, "e": 17, "f": 21, "information": 9, "informational": 9,
}  # fmt: skip
SEVERITY_TEXT = {1: "TRACE", 5: "DEBUG", 9: "INFO", 10: "INFO2", 13: "WARN", 17: "ERROR", 21: "FATAL"}
_KIND_PREFIX = {
    "Pod": "k8s.pod", "Node": "k8s.node", "Deployment": "k8s.deployment", "ReplicaSet": "k8s.replicaset",
    "StatefulSet": "k8s.statefulset", "DaemonSet": "k8s.daemonset", "Job": "k8s.job", "CronJob": "k8s.cronjob",
}  # fmt: skip
_METADATA_RESOURCE = {
    "namespace_name": "k8s.namespace.name",
    "pod_name": "k8s.pod.name",
    "pod_id": "k8s.pod.uid",
    "container_name": "k8s.container.name",
    "host": "k8s.node.name",
    "docker_id": "container.id",
}


def _severity_from(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 1 <= value <= 24 else None
    if isinstance(value, str):
        word = value.strip().lower()
        if word.isdigit():
            return _severity_from(int(word))
        return SEVERITY_NUMBERS.get(word)
    return None


def _image(image: str) -> tuple[str, str | None]:
    """``repo/name:tag`` -> (name, tag); a digest reference has no tag."""
    if "@" in image:
        return image.split("@", 1)[0], None
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon + 1 :]
    return image, None


class _Log:
    """One log record, encoding-neutral."""

    __slots__ = ("attributes", "body", "event_name", "severity", "severity_text", "span_id", "time_ns", "trace_id")

    def __init__(self, time_ns: int) -> None:
        self.time_ns = time_ns
        self.severity = 0
        self.severity_text = ""
        self.body: Any = None
        self.attributes: dict[str, Any] = {}
        self.trace_id = b""
        self.span_id = b""
        self.event_name = ""


def _hex_id(value: Any, size: int) -> bytes:
    if isinstance(value, str) and len(value) == size * 2:
        try:
            return bytes.fromhex(value)
        except ValueError:
            return b""
    return b""


# -- protobuf ---------------------------------------------------------------------------------


def _pb_value(target: common_pb2.AnyValue, value: Any) -> None:
    if isinstance(value, str):
        target.string_value = value
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        if -(2**63) <= value < 2**63:
            target.int_value = value
        else:
            target.string_value = str(value)
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, dict):
        kvlist = target.kvlist_value
        kvlist.SetInParent()
        for key, item in value.items():
            kv = kvlist.values.add()
            kv.key = str(key)
            _pb_value(kv.value, item)
    elif isinstance(value, list | tuple):
        array = target.array_value
        array.SetInParent()
        for item in value:
            _pb_value(array.values.add(), item)
    elif isinstance(value, bytes):
        target.bytes_value = value
    elif value is None:
        pass  # an empty AnyValue is OTLP's null
    else:
        target.string_value = str(value)


def _pb_attributes(target: Any, attributes: dict[str, Any]) -> None:
    for key, value in attributes.items():
        kv = target.add()
        kv.key = key
        _pb_value(kv.value, value)


# -- JSON (OTLP/JSON: lowerCamelCase, hex ids, 64-bit integers as strings) -------------------


def _json_value(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)} if -(2**63) <= value < 2**63 else {"stringValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, dict):
        return {"kvlistValue": {"values": _json_attributes(value)}}
    if isinstance(value, list | tuple):
        return {"arrayValue": {"values": [_json_value(v) for v in value]}}
    if value is None:
        return {}
    return {"stringValue": str(value)}


def _json_attributes(attributes: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": str(key), "value": _json_value(value)} for key, value in attributes.items()]


class OpenTelemetrySink(HttpSink):
    plugin_name = "opentelemetry"
    description = "Sends logs to an OpenTelemetry endpoint over OTLP/HTTP (protobuf or JSON)"
    options = (
        *client_options(80),
        Option("logs_uri", "str", "/v1/logs", help="Path of the OTLP logs endpoint"),
        Option("encoding", "choice", "protobuf", choices=("protobuf", "json"), help="OTLP/HTTP body encoding"),
        Option("logs_body_key", multiple=True, help="Record key(s) for the body, first present wins"),
        Option("logs_severity_text_message_key", "str", "severityText", help="Record key with the severity text"),
        Option("logs_severity_number_message_key", "str", "severityNumber", help="Record key with the severity"),
        Option("logs_trace_id_message_key", "str", "traceId", help="Record key with a hex trace id"),
        Option("logs_span_id_message_key", "str", "spanId", help="Record key with a hex span id"),
        Option("add_label", multiple=True, help="Resource attribute 'name value' added to every record"),
        Option("log_response_payload", "bool", False, help="Log the answer of every request"),
        Option("batch_size", "int", 1000, help="Most log records per request"),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        uri: str = config["logs_uri"]
        if not uri.startswith("/"):
            raise ConfigError(f"must be a path starting with '/', got {uri!r}", key="logs_uri")
        self.uri = uri
        self.json = config["encoding"] == "json"
        self.body_keys: list[str] = config["logs_body_key"] or ["message", "log", "msg"]
        self.severity_text_key: str = config["logs_severity_text_message_key"]
        self.severity_number_key: str = config["logs_severity_number_message_key"]
        self.trace_id_key: str = config["logs_trace_id_message_key"]
        self.span_id_key: str = config["logs_span_id_message_key"]
        self.labels = dict(parse_headers(config["add_label"], key="add_label"))
        self.log_response: bool = config["log_response_payload"]
        self.batch_size: int = config["batch_size"]
        if self.batch_size < 1:
            raise ConfigError("must be at least 1", key="batch_size")

    # -- mapping ----------------------------------------------------------------------------

    def map_record(self, record: Record) -> tuple[tuple[tuple[str, Any], ...], _Log]:
        """(resource attributes, log record) following the module docstring."""
        body = record.body
        log = _Log(record.time_ns)
        resource: dict[str, Any] = dict(self.labels)
        if body.get("kind") == "Event" and isinstance(body.get("metadata"), dict):
            self._map_event(body, resource, log)
        else:
            self._map_log(body, resource, log)
        key = identity_key(record)
        if key is not None:
            log.attributes["log.record.uid"] = key
        return tuple(sorted(resource.items(), key=lambda item: item[0])), log

    def _map_event(self, event: dict[str, Any], resource: dict[str, Any], log: _Log) -> None:
        meta = event["metadata"]
        obj = event.get("involvedObject") or event.get("regarding") or {}
        namespace = obj.get("namespace") or meta.get("namespace")
        if namespace:
            resource["k8s.namespace.name"] = namespace
        kind = obj.get("kind")
        prefix = _KIND_PREFIX.get(kind or "")
        if prefix and obj.get("name"):
            resource[f"{prefix}.name"] = obj["name"]
            if obj.get("uid"):
                resource[f"{prefix}.uid"] = obj["uid"]
        for field, attribute in (
            ("kind", "k8s.object.kind"),
            ("name", "k8s.object.name"),
            ("uid", "k8s.object.uid"),
            ("fieldPath", "k8s.object.fieldpath"),
            ("apiVersion", "k8s.object.api_version"),
            ("resourceVersion", "k8s.object.resource_version"),
        ):
            if obj.get(field):
                resource[attribute] = obj[field]
        log.event_name = "k8s.event"
        attributes = log.attributes
        for value, attribute in (
            (meta.get("uid"), "k8s.event.uid"),
            (meta.get("name"), "k8s.event.name"),
            (event.get("reason"), "k8s.event.reason"),
            (event.get("action"), "k8s.event.action"),
            (event.get("count") or (event.get("series") or {}).get("count") or event.get("deprecatedCount"),
             "k8s.event.count"),
            (event.get("firstTimestamp") or event.get("eventTime") or meta.get("creationTimestamp"),
             "k8s.event.start_time"),
            (event.get("reportingComponent") or event.get("reportingController")
             or (event.get("source") or {}).get("component"), "k8s.event.reporting_component"),
        ):  # fmt: skip
            if value not in (None, ""):
                attributes[attribute] = value
        kind_of_event = event.get("type")
        log.severity = 13 if kind_of_event == "Warning" else 9
        log.severity_text = kind_of_event or "Normal"
        log.body = event.get("message") or event.get("note") or ""

    def _map_log(self, body: dict[str, Any], resource: dict[str, Any], log: _Log) -> None:
        kube = body.get("kubernetes")
        if isinstance(kube, dict):
            for field, attribute in _METADATA_RESOURCE.items():
                if kube.get(field):
                    resource[attribute] = kube[field]
            if isinstance(kube.get("container_image"), str):
                name, tag = _image(kube["container_image"])
                resource["container.image.name"] = name
                if tag:
                    resource["container.image.tag"] = tag
            for field, prefix in (("labels", "k8s.pod.label."), ("annotations", "k8s.pod.annotation.")):
                if isinstance(kube.get(field), dict):
                    for key, value in kube[field].items():
                        resource[prefix + key] = value if isinstance(value, str) else orjson.dumps(value).decode()
        body_key = next((key for key in self.body_keys if key in body), None)
        used = {"kubernetes", body_key}
        severity = _severity_from(body.get(self.severity_number_key))
        text = body.get(self.severity_text_key)
        if severity is not None:
            used.add(self.severity_number_key)
        if isinstance(text, str):
            used.add(self.severity_text_key)
        else:
            text = None
            for key in ("level", "severity", "lvl"):
                if isinstance(body.get(key), str | int) and _severity_from(body[key]) is not None:
                    text = body[key]
                    used.add(key)
                    break
        if severity is None:
            severity = _severity_from(text)
        if severity is not None:
            log.severity = severity
            log.severity_text = str(text) if text is not None else SEVERITY_TEXT.get(severity, "")
        for key, size, slot in ((self.trace_id_key, 16, "trace_id"), (self.span_id_key, 8, "span_id")):
            value = _hex_id(body.get(key), size)
            if value:
                setattr(log, slot, value)
                used.add(key)
        rest = {k: v for k, v in body.items() if k not in used}
        if body_key is not None:
            log.body = body[body_key]
            log.attributes.update(rest)
        else:
            log.body = rest  # no message key: the record (minus what went elsewhere) is the body

    def _grouped(self, records: Iterable[Record]) -> dict[tuple[tuple[str, Any], ...], list[_Log]]:
        groups: dict[tuple[tuple[str, Any], ...], list[_Log]] = {}
        for record in records:
            resource, log = self.map_record(record)
            groups.setdefault(resource, []).append(log)
        return groups

    # -- encoding ---------------------------------------------------------------------------

    def encode_protobuf(self, records: list[Record]) -> bytes:
        observed = time.time_ns()
        request = logs_service_pb2.ExportLogsServiceRequest()
        for resource, logs in self._grouped(records).items():
            resource_logs = request.resource_logs.add()
            _pb_attributes(resource_logs.resource.attributes, dict(resource))
            scope_logs = resource_logs.scope_logs.add()
            scope_logs.scope.name = "kubetrail"
            scope_logs.scope.version = __version__
            for log in logs:
                out = scope_logs.log_records.add()
                out.time_unix_nano = log.time_ns
                out.observed_time_unix_nano = observed
                out.severity_number = log.severity
                out.severity_text = log.severity_text
                _pb_value(out.body, log.body)
                _pb_attributes(out.attributes, log.attributes)
                if log.trace_id:
                    out.trace_id = log.trace_id
                if log.span_id:
                    out.span_id = log.span_id
                if log.event_name:
                    out.event_name = log.event_name
        return request.SerializeToString()  # type: ignore[no-any-return]

    def encode_json(self, records: list[Record]) -> bytes:
        observed = str(time.time_ns())
        resource_logs = []
        for resource, logs in self._grouped(records).items():
            out_logs = []
            for log in logs:
                item: dict[str, Any] = {
                    "timeUnixNano": str(log.time_ns),
                    "observedTimeUnixNano": observed,
                    "severityNumber": log.severity,
                    "severityText": log.severity_text,
                    "body": _json_value(log.body),
                    "attributes": _json_attributes(log.attributes),
                }
                if log.trace_id:
                    item["traceId"] = log.trace_id.hex()
                if log.span_id:
                    item["spanId"] = log.span_id.hex()
                if log.event_name:
                    item["eventName"] = log.event_name
                out_logs.append(item)
            resource_logs.append(
                {
                    "resource": {"attributes": _json_attributes(dict(resource))},
                    "scopeLogs": [{"scope": {"name": "kubetrail", "version": __version__}, "logRecords": out_logs}],
                }
            )
        return orjson.dumps({"resourceLogs": resource_logs})

    def _encode_checked(self, records: list[Record]) -> tuple[bytes | None, list[tuple[Record, str]]]:
        """The body; a record that cannot be encoded (e.g. a lone surrogate) is rejected alone."""
        encode = self.encode_json if self.json else self.encode_protobuf
        try:
            return encode(records), []
        except (EncodeError, ValueError, TypeError, UnicodeError):
            pass
        good: list[Record] = []
        rejected: list[tuple[Record, str]] = []
        for record in records:
            try:
                encode([record])
                good.append(record)
            except (EncodeError, ValueError, TypeError, UnicodeError) as exc:
                rejected.append((record, f"cannot encode as OTLP: {type(exc).__name__}: {exc}"))
        return (encode(good) if good else None), rejected

    # -- delivery ---------------------------------------------------------------------------

    async def write(self, batch: Batch) -> None:
        records = batch.records
        rejected: list[tuple[Record, str]] = []
        for start in range(0, len(records), self.batch_size):
            part = records[start : start + self.batch_size]
            body, bad = self._encode_checked(part)
            rejected += bad
            if body is None:
                continue
            response = await self.http.send(
                "POST",
                self.uri,
                body,
                content_type="application/json" if self.json else "application/x-protobuf",
            )
            if self.log_response:
                self.log.info("OTLP response", extra={"status": response.status, "body": response.excerpt()})
            refused, message = self._partial_success(response)
            if refused:
                good = [r for r in part if all(r is not b for b, _ in bad)]
                reason = (
                    f"the server rejected {refused} of {len(good)} log records of this request "
                    f"(OTLP does not say which): {message or 'no message'}"
                )
                rejected += [(record, reason) for record in good]
        # Parts already delivered are not resent: only what failed here is reported.
        if rejected:
            raise PermanentError(f"{len(rejected)} of {len(records)} records rejected: {rejected[-1][1]}", rejected)

    def _partial_success(self, response: HttpResponse) -> tuple[int, str]:
        """(rejected_log_records, error_message) of an ExportLogsServiceResponse."""
        if not response.body:
            return 0, ""
        content_type = response.headers.get("Content-Type", "")
        if "json" in content_type:
            answer = response.json()
            partial = answer.get("partialSuccess") or answer.get("partial_success") or {}
            count = partial.get("rejectedLogRecords") or partial.get("rejected_log_records") or 0
            message = partial.get("errorMessage") or partial.get("error_message") or ""
            try:
                return int(count), str(message)
            except (TypeError, ValueError):
                raise BadResponseError(f"{response.describe()}: bad partialSuccess {partial!r:.200}") from None
        parsed = logs_service_pb2.ExportLogsServiceResponse()
        try:
            parsed.ParseFromString(response.body)
        except DecodeError:
            raise BadResponseError(
                f"{response.describe()}: expected an ExportLogsServiceResponse, got "
                f"{content_type or 'no content type'}: {response.excerpt()!r}"
            ) from None
        return int(parsed.partial_success.rejected_log_records), parsed.partial_success.error_message
