"""The ``cloudwatch_logs`` output (and ``cloudwatch``, the old Go plugin's name): CloudWatch Logs'
``PutLogEvents`` with Fluent Bit's options.

The AWS client, credential chain and error classes are in :mod:`kubetrail.sinks.aws_base`
(aiobotocore; why is said there).

**Where a record goes.** Log group: ``log_group_template`` (record accessors, ``$TAG``,
``$TAG[n]``) when it renders, else ``log_group_name``. Log stream: ``log_stream_template``,
else ``log_stream_name``, else ``log_stream_prefix`` + tag. A stream is created before its
first write (``CreateLogStream``; "already exists" is fine); a missing group is created with
``auto_create_group`` (with ``log_retention_days``, ``log_group_class`` and, for ``cloudwatch``,
``new_log_group_tags``), otherwise the batch waits and retries with a message saying so.

**The message** is the record as JSON, or with ``log_key`` only that key's value (a string as
it is). ``log_format json/emf`` sends the ``x-amzn-logs-format`` header, and with
``metric_namespace`` each record gets an ``_aws`` Embedded Metric Format block naming its
numeric top-level fields as metrics with ``metric_dimensions`` (``a,b;c`` -> ``[[a,b],[c]]``),
which is what Fluent Bit does for its metric inputs; a metric record (the ``fluentbit_metrics``
input's ``{"name", "type", "labels", "value"}``) becomes one EMF metric named after the sample,
its labels the dimensions unless ``metric_dimensions`` says otherwise. A message longer than an event may be
(256 KiB minus the 26 bytes of overhead) is truncated on a character boundary, as Fluent Bit
does, and counted.

**PutLogEvents rules**, applied before sending so AWS never has to refuse a call: events of one
call are in one stream, sorted by time (stable), at most 10,000 of them and 1,048,576 bytes
(UTF-8 message bytes + 26 per event), spanning at most 24 hours. Events older than 14 days or
more than 2 hours in the future are not sent: they are dead-lettered with the reason (AWS would
drop them silently). If AWS still reports some in ``rejectedLogEventsInfo`` (clock skew), those
are dead-lettered the same way; the rest of the call was stored.

**Sequence tokens**: not sent, since PutLogEvents ignores them (2023). If an endpoint still
answers ``InvalidSequenceTokenException``, the call is repeated with the token it expects;
``DataAlreadyAcceptedException`` means the call was stored before: delivered.

**No duplicates on retry**: a batch may need several calls. When one fails after others were
stored, the sink remembers which records of that batch are done (by position) and the retry
sends only the rest. CloudWatch has no idempotent write, so this is what keeps a retried batch
from being stored twice in one process. (After a crash, the unacknowledged batch is replayed
whole: at least once.)
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from botocore.exceptions import ClientError

from kubetrail.core.component import ComponentContext, Sink
from kubetrail.core.config.compat import no_effect
from kubetrail.core.errors import ConfigError, PermanentError, RetryableError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.core.values import split_list
from kubetrail.sinks.aws_base import AWS_OPTIONS, AwsClient, Template, classify, error_code

MAX_EVENTS_PER_CALL = 10_000
MAX_BYTES_PER_CALL = 1_048_576
EVENT_OVERHEAD = 26
MAX_EVENT_BYTES = 262_144 - EVENT_OVERHEAD  # Fluent Bit's MAX_EVENT_LEN
MAX_SPAN_MS = 24 * 3600 * 1000
MAX_AGE_MS = 14 * 24 * 3600 * 1000
MAX_FUTURE_MS = 2 * 3600 * 1000
RETENTION_DAYS = (
    1,
    3,
    5,
    7,
    14,
    30,
    60,
    90,
    120,
    150,
    180,
    365,
    400,
    545,
    731,
    1096,
    1827,
    2192,
    2557,
    2922,
    3288,
    3653,
)
MAX_TOKEN_RETRIES = 3
MAX_TRACKED_BATCHES = 256


@dataclass
class _Progress:
    """What earlier attempts at one batch already settled (kept while the batch is retried)."""

    batch: Batch  # a strong reference: its id() cannot be reused while this entry exists
    done: set[int] = field(default_factory=set)
    rejected: dict[int, str] = field(default_factory=dict)


@dataclass
class _Event:
    index: int  # position in the batch
    timestamp: int  # ms
    message: str
    size: int  # UTF-8 bytes + overhead


class CloudWatchLogsSink(Sink):
    plugin_name = "cloudwatch_logs"
    description = "Amazon CloudWatch Logs (PutLogEvents), Fluent Bit's options"
    options = (
        *AWS_OPTIONS,
        Option("log_group_name", help="Log group (required; the fallback of log_group_template)"),
        Option("log_group_template", help="Log group from record accessors, $TAG, $TAG[n]"),
        Option("log_stream_name", help="Log stream (or log_stream_prefix)"),
        Option("log_stream_prefix", help="Log stream = this prefix + the tag"),
        Option("log_stream_template", help="Log stream from record accessors, $TAG, $TAG[n]"),
        Option("log_key", help="Send only this key's value instead of the whole record"),
        Option("log_format", help="json/emf: CloudWatch extracts Embedded Metric Format metrics"),
        Option("log_retention_days", "int", 0, help="Retention set on log groups this output creates"),
        Option("log_group_class", "choice", "STANDARD", choices=("STANDARD", "INFREQUENT_ACCESS")),
        Option("auto_create_group", "bool", False, help="Create the log group when it does not exist"),
        Option("metric_namespace", help="EMF namespace for the records' numeric fields (with log_format json/emf)"),
        Option("metric_dimensions", help="EMF dimensions: 'a,b;c' is [[a,b],[c]]"),
        no_effect("add_entity", "bool", False, why="the EKS entity of PutLogEvents is not sent"),
    )

    def __init__(self, ctx: ComponentContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.aws = AwsClient("logs", config)
        group = config.get("log_group_name")
        if not group:
            raise ConfigError("the log group is required", key="log_group_name")
        self.group_name: str = group
        self.group_template = self._template(config.get("log_group_template"), "log_group_template")
        self.stream_name: str | None = config.get("log_stream_name") or None
        self.stream_prefix: str | None = config.get("log_stream_prefix") or None
        if self.stream_name and self.stream_prefix:
            raise ConfigError("log_stream_name and log_stream_prefix exclude each other", key="log_stream_prefix")
        self.stream_template = self._template(config.get("log_stream_template"), "log_stream_template")
        if not (self.stream_name or self.stream_prefix):
            raise ConfigError("log_stream_name or log_stream_prefix is required", key="log_stream_name")
        self.log_key: str | None = config.get("log_key") or None
        log_format = (config.get("log_format") or "").strip()
        if log_format and log_format.lower() not in ("json/emf", "json", "emf"):
            raise ConfigError(f"unknown log_format {log_format!r}; allowed: json/emf", key="log_format")
        self.emf_header = log_format.lower() in ("json/emf", "emf")
        retention = int(config.get("log_retention_days") or 0)
        if retention and retention not in RETENTION_DAYS:
            allowed = ", ".join(map(str, RETENTION_DAYS))
            raise ConfigError(
                f"{retention} is not a CloudWatch retention; allowed: {allowed}", key="log_retention_days"
            )
        self.retention_days = retention
        self.group_class: str = config.get("log_group_class") or "STANDARD"
        self.auto_create_group: bool = bool(config.get("auto_create_group"))
        self.group_tags: dict[str, str] = {}
        self.metric_namespace: str | None = config.get("metric_namespace") or None
        self.metric_dimensions = [
            [d.strip() for d in part.split(",") if d.strip()]
            for part in (config.get("metric_dimensions") or "").split(";")
            if part.strip()
        ]
        self._streams: set[tuple[str, str]] = set()  # created (or known to exist)
        self._progress: OrderedDict[int, _Progress] = OrderedDict()
        self._fallbacks = ctx.metrics.counter(
            "kubetrail_cloudwatch_template_fallbacks", "Records whose group/stream template found no value", "option"
        )
        self._fallback_logged: set[str] = set()
        self._truncated = ctx.metrics.counter(
            "kubetrail_cloudwatch_truncated_events", "Events cut to CloudWatch's largest event size"
        )

    @staticmethod
    def _template(text: str | None, key: str) -> Template | None:
        return Template(text, key) if text else None

    async def start(self) -> None:
        if self.emf_header and not self.aws.on_client:
            # On every client: a rotated tls.ca_file gives a new one (AwsClient.refresh).
            self.aws.on_client.append(
                lambda client: client.meta.events.register("before-sign.cloudwatch-logs.PutLogEvents", _emf_header)
            )
        self.aws.bind(self.log, self.ctx.metrics)
        await self.aws.start()

    async def close(self) -> None:
        await self.aws.close()

    # -- records -> events ----------------------------------------------------------------

    def _destination(self, record: Record) -> tuple[str, str]:
        body = record.body if (self.group_template or self.stream_template) else {}
        group = self.group_name
        if self.group_template is not None:
            rendered = self.group_template.render(record.tag, body)
            if rendered is None:
                self._fallback("log_group_template", record)
            else:
                group = rendered
        stream = None
        if self.stream_template is not None:
            stream = self.stream_template.render(record.tag, body)
            if stream is None:
                self._fallback("log_stream_template", record)
        if stream is None:
            stream = self.stream_name or f"{self.stream_prefix}{record.tag}"
        return group, stream

    def _fallback(self, option: str, record: Record) -> None:
        """A template found nothing in a record: counted, logged once per option (Fluent Bit logs
        an error per record), and the plain name is used."""
        self._fallbacks.labels(option).inc()
        if option not in self._fallback_logged:
            self._fallback_logged.add(option)
            template = self.group_template if option == "log_group_template" else self.stream_template
            self.log.warning(
                f"{option} found no value in a record; the plain name is used (logged once)",
                extra={"tag": record.tag, "template": template.text if template is not None else None},
            )

    def _message(self, record: Record) -> str | None:
        """The event's text, or None when the record has no ``log_key``."""
        if self.log_key is not None:
            value = record.body.get(self.log_key)
            if value is None:
                return None
            return value if isinstance(value, str) else orjson.dumps(value).decode()
        if self.metric_namespace is not None and self.emf_header:
            return orjson.dumps(self._with_emf(record)).decode()
        return record.json_bytes().decode()

    def _with_emf(self, record: Record) -> dict[str, Any]:
        body = record.body
        value = body.get("value")
        if (
            isinstance(body.get("name"), str)
            and isinstance(body.get("labels"), dict)
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        ):
            # A metric record (the fluentbit_metrics input's shape): the sample becomes one EMF
            # metric with its labels as dimensions, as Fluent Bit converts its metrics chunks.
            labels = {str(k): str(v) for k, v in body["labels"].items()}
            doc: dict[str, Any] = {**labels, body["name"]: value}
            metrics = [{"Name": body["name"]}]
            dimensions = self.metric_dimensions or [sorted(labels)]
        else:
            doc = dict(body)
            metrics = [
                {"Name": key}
                for key, item in doc.items()
                if isinstance(item, (int, float)) and not isinstance(item, bool) and key != "_aws"
            ]
            dimensions = self.metric_dimensions
        doc["_aws"] = {
            "Timestamp": record.time_ns // 1_000_000,
            "CloudWatchMetrics": [{"Namespace": self.metric_namespace, "Dimensions": dimensions, "Metrics": metrics}],
        }
        return doc

    def _events(self, batch: Batch, progress: _Progress) -> tuple[dict[tuple[str, str], list[_Event]], dict[int, str]]:
        """The batch's unsettled records as events per stream, and the ones refused here."""
        now_ms = int(time.time() * 1000)
        oldest, newest = now_ms - MAX_AGE_MS, now_ms + MAX_FUTURE_MS
        streams: dict[tuple[str, str], list[_Event]] = {}
        refused: dict[int, str] = {}
        for index, record in enumerate(batch.records):
            if index in progress.done:
                continue
            timestamp = record.time_ns // 1_000_000
            if timestamp < oldest:
                refused[index] = "CloudWatch Logs takes no events older than 14 days"
                continue
            if timestamp > newest:
                refused[index] = "CloudWatch Logs takes no events more than 2 hours in the future"
                continue
            message = self._message(record)
            if message is None:
                refused[index] = f"log_key {self.log_key!r} is not in the record"
                continue
            if not message:
                refused[index] = "empty message (CloudWatch Logs needs at least one character)"
                continue
            data = message.encode()
            if len(data) > MAX_EVENT_BYTES:
                message = data[:MAX_EVENT_BYTES].decode("utf-8", "ignore")  # whole characters only
                data = message.encode()
                self._truncated.inc()
            streams.setdefault(self._destination(record), []).append(
                _Event(index, timestamp, message, len(data) + EVENT_OVERHEAD)
            )
        return streams, refused

    @staticmethod
    def _calls(events: list[_Event]) -> list[list[_Event]]:
        """One stream's events, sorted by time, cut into calls within PutLogEvents' limits."""
        events.sort(key=lambda e: (e.timestamp, e.index))
        calls: list[list[_Event]] = []
        current: list[_Event] = []
        size = 0
        for event in events:
            if current and (
                len(current) >= MAX_EVENTS_PER_CALL
                or size + event.size > MAX_BYTES_PER_CALL
                or event.timestamp - current[0].timestamp > MAX_SPAN_MS
            ):
                calls.append(current)
                current, size = [], 0
            current.append(event)
            size += event.size
        if current:
            calls.append(current)
        return calls

    # -- delivery -------------------------------------------------------------------------

    async def write(self, batch: Batch) -> None:
        try:
            await self.aws.refresh()  # a rotated tls.ca_file: a new client first
        except Exception as exc:
            raise classify(exc, "a new client for the rotated tls.ca_file") from None
        key = id(batch)
        progress = self._progress.get(key)
        if progress is None or progress.batch is not batch:
            progress = _Progress(batch)
            self._progress[key] = progress
            while len(self._progress) > MAX_TRACKED_BATCHES:  # forgetting one only risks a resend
                self._progress.popitem(last=False)
        streams, refused = self._events(batch, progress)
        for index, reason in refused.items():
            progress.rejected[index] = reason
            progress.done.add(index)
        for (group, stream), events in streams.items():
            for call in self._calls(events):
                try:
                    rejected = await self._put(group, stream, call)
                except PermanentError as exc:
                    # AWS refuses this call for good (a stream name it does not allow, a malformed
                    # event): only its events are rejected, the other streams' go on.
                    rejected = {event.index: str(exc) for event in call}
                for event in call:
                    progress.done.add(event.index)
                for index, reason in rejected.items():
                    progress.rejected[index] = reason
        self._progress.pop(key, None)
        if progress.rejected:
            records = batch.records
            pairs = [(records[i], reason) for i, reason in sorted(progress.rejected.items())]
            reasons = sorted({reason for _, reason in pairs})
            raise PermanentError(
                f"CloudWatch Logs: {len(pairs)} of {len(batch)} events not stored (the others were): "
                + "; ".join(reasons[:3]),
                rejected=pairs,
            )

    async def _put(self, group: str, stream: str, call: list[_Event]) -> dict[int, str]:
        """Store one call's events; returns the ones AWS refused (index -> reason)."""
        await self._ensure_stream(group, stream)
        params: dict[str, Any] = {
            "logGroupName": group,
            "logStreamName": stream,
            "logEvents": [{"timestamp": e.timestamp, "message": e.message} for e in call],
        }
        recreated = False
        for _ in range(MAX_TOKEN_RETRIES + 1):
            try:
                response = await self.aws.client.put_log_events(**params)
            except ClientError as exc:
                code = error_code(exc)
                if code == "InvalidSequenceTokenException":
                    expected = exc.response.get("expectedSequenceToken") or _expected_token(exc)
                    if expected:
                        params["sequenceToken"] = expected
                        continue
                elif code == "DataAlreadyAcceptedException":
                    return {}  # this very call was stored before
                elif code == "ResourceNotFoundException" and not recreated:
                    # The stream (or group) went away since we created it: create it again.
                    self._streams.discard((group, stream))
                    await self._ensure_stream(group, stream)
                    recreated = True
                    continue
                raise classify(exc, f"PutLogEvents to {group}/{stream}") from None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise classify(exc, f"PutLogEvents to {group}/{stream}") from None
            return _rejected_events(call, response.get("rejectedLogEventsInfo") or {})
        raise RetryableError(f"PutLogEvents to {group}/{stream}: the sequence token kept changing")

    async def _ensure_stream(self, group: str, stream: str) -> None:
        if (group, stream) in self._streams:
            return
        client = self.aws.client
        try:
            await client.create_log_stream(logGroupName=group, logStreamName=stream)
        except ClientError as exc:
            code = error_code(exc)
            if code == "ResourceNotFoundException":
                if not self.auto_create_group:
                    raise RetryableError(
                        f"log group {group!r} does not exist and auto_create_group is off; create it or turn that on"
                    ) from None
                await self._create_group(group)
                try:
                    await client.create_log_stream(logGroupName=group, logStreamName=stream)
                except ClientError as again:
                    if error_code(again) != "ResourceAlreadyExistsException":
                        raise classify(again, f"CreateLogStream {group}/{stream}") from None
            elif code != "ResourceAlreadyExistsException":
                raise classify(exc, f"CreateLogStream {group}/{stream}") from None
        except asyncio.CancelledError:
            raise
        except (RetryableError, PermanentError):
            raise
        except Exception as exc:
            raise classify(exc, f"CreateLogStream {group}/{stream}") from None
        self._streams.add((group, stream))

    async def _create_group(self, group: str) -> None:
        client = self.aws.client
        params: dict[str, Any] = {"logGroupName": group}
        if self.group_class != "STANDARD":
            params["logGroupClass"] = self.group_class
        if self.group_tags:
            params["tags"] = self.group_tags
        try:
            await client.create_log_group(**params)
        except ClientError as exc:
            if error_code(exc) != "ResourceAlreadyExistsException":
                raise classify(exc, f"CreateLogGroup {group}") from None
            return  # someone else created it: leave its settings alone
        self.log.info("created log group", extra={"log_group": group})
        if self.retention_days:
            try:
                await client.put_retention_policy(logGroupName=group, retentionInDays=self.retention_days)
            except ClientError as exc:
                raise classify(exc, f"PutRetentionPolicy {group}") from None


def _emf_header(request: Any, **_: Any) -> None:
    request.headers["x-amzn-logs-format"] = "json/emf"


_EXPECTED_TOKEN = re.compile(r"sequenceToken(?: is)?:\s*(\S+)")


def _expected_token(exc: ClientError) -> str | None:
    """The token quoted in the message of an old-style InvalidSequenceTokenException."""
    match = _EXPECTED_TOKEN.search(str(exc.response.get("Error", {}).get("Message", "")))
    return match.group(1) if match and match.group(1) != "null" else None


def _rejected_events(call: list[_Event], info: Mapping[str, Any]) -> dict[int, str]:
    """``rejectedLogEventsInfo`` (indexes into the call) -> batch index -> reason."""
    rejected: dict[int, str] = {}
    too_new = info.get("tooNewLogEventStartIndex")
    if too_new is not None:
        for event in call[int(too_new) :]:
            rejected[event.index] = "CloudWatch Logs refused it: more than 2 hours in the future"
    too_old = info.get("tooOldLogEventEndIndex")
    if too_old is not None:
        for event in call[: int(too_old) + 1]:
            rejected[event.index] = "CloudWatch Logs refused it: older than 14 days"
    expired = info.get("expiredLogEventEndIndex")
    if expired is not None:
        for event in call[: int(expired) + 1]:
            rejected.setdefault(event.index, "CloudWatch Logs refused it: older than the log group's retention")
    return rejected


_GO_TEMPLATE = re.compile(r"[$#]\(\s*(tag(?:\[\d+\])?|[A-Za-z0-9_\-@]+(?:\[[^\]]*\])*)\s*\)")


def _go_template(text: str) -> str:
    """The Go plugin's ``$(kubernetes['pod_name'])``/``$(tag[1])`` -> Fluent Bit's template syntax."""

    def convert(match: re.Match[str]) -> str:
        inner = match.group(1)
        if inner.startswith("tag"):
            return "$TAG" + inner[3:]
        return "$" + inner

    return _GO_TEMPLATE.sub(convert, text)


class CloudWatchSink(CloudWatchLogsSink):
    """``cloudwatch``: the options of the retired Go plugin, mapped onto ``cloudwatch_logs``.

    ``log_group_name``/``log_stream_name`` may hold ``$(key['sub'])``, ``$(tag)``, ``$(tag[n])``
    (and the older ``#(...)``); when those do not resolve, ``default_log_group_name`` /
    ``default_log_stream_name`` are used, as the Go plugin does. ``new_log_group_tags`` tags
    the groups it creates. ``credentials_endpoint`` is accepted and logged as having no effect:
    the standard chain reads container credentials from ``AWS_CONTAINER_CREDENTIALS_FULL_URI``.
    """

    plugin_name = "cloudwatch"
    description = "cloudwatch_logs under the name of the old Go plugin, with its options"
    options = (
        *AWS_OPTIONS,
        Option("log_group_name", help="Log group; may hold $(key) / $(tag[n]) templates"),
        Option("log_stream_name", help="Log stream; may hold $(key) / $(tag[n]) templates"),
        Option("log_stream_prefix", help="Log stream = this prefix + the tag"),
        Option("default_log_group_name", "str", "fluentbit-default", help="When the group template fails"),
        Option("default_log_stream_name", "str", "/fluentbit-default", help="When the stream template fails"),
        Option("log_key", help="Send only this key's value instead of the whole record"),
        Option("log_format", help="json/emf: CloudWatch extracts Embedded Metric Format metrics"),
        Option("log_retention_days", "int", 0, help="Retention set on log groups this output creates"),
        Option("auto_create_group", "bool", False, help="Create the log group when it does not exist"),
        no_effect("auto_create_stream", "bool", True, why="streams are always created, as cloudwatch_logs does"),
        Option("new_log_group_tags", help="Tags of created log groups: 'k=v,k2=v2'"),
        Option("metric_namespace", help="EMF namespace (with log_format json/emf)"),
        Option("metric_dimensions", help="EMF dimensions: 'a,b;c' is [[a,b],[c]]"),
        no_effect(
            "credentials_endpoint", why="set AWS_CONTAINER_CREDENTIALS_FULL_URI, which the credential chain reads"
        ),
        no_effect("experimental_concurrency", "int", 0, why="use workers"),
        no_effect("experimental_concurrency_retries", "int", 0, why="retries are the sink runner's"),
    )

    def __init__(self, ctx: ComponentContext, config: Mapping[str, Any]) -> None:
        mapped = dict(config)
        group = config.get("log_group_name") or ""
        stream = config.get("log_stream_name") or ""
        if _GO_TEMPLATE.search(group):
            mapped["log_group_template"] = _go_template(group)
            mapped["log_group_name"] = config.get("default_log_group_name")
        if _GO_TEMPLATE.search(stream):
            mapped["log_stream_template"] = _go_template(stream)
            mapped["log_stream_name"] = config.get("default_log_stream_name")
        super().__init__(ctx, mapped)
        tags = {}
        for item in split_list(config.get("new_log_group_tags") or ""):
            name, eq, value = item.partition("=")
            if not eq or not name.strip():
                raise ConfigError(f"bad tag {item!r}; expected name=value", key="new_log_group_tags")
            tags[name.strip()] = value.strip()
        self.group_tags = tags
