"""The ``kafka`` output: Fluent Bit's options, acknowledged only once the brokers have every message.

**Client: confluent-kafka** (librdkafka, the library Fluent Bit's own kafka plugins use), chosen
by measurement (``bench/bench_kafka_clients.py``, 200,000 audit records of 866 bytes into a
6-partition topic of the 3-broker test cluster, ``acks=all``, idempotent, every delivery awaited,
on this shared 2-core machine): confluent-kafka 13,753 records/s and 1.61 CPU-s per 100k
records, aiokafka 0.14 2,351 records/s and 3.83 CPU-s per 100k, so 5.8x the throughput for 42%
of the CPU. It also takes ``rdkafka.<property>`` exactly as Fluent Bit passes them (the same
library reads them), and refuses an unknown one with librdkafka's own message. It has manylinux
wheels for CPython 3.11 (the image installs binary wheels only).

Delivery, what a batch being "delivered" means here:

* the producer runs with ``acks=all`` and ``enable.idempotence=true`` (a configuration that
  turns either off is refused): a message is acknowledged once every in-sync replica has it,
  and librdkafka's own retries never write a message twice nor out of order;
* ``write`` hands every record of the batch to librdkafka and returns only once a delivery
  report came back for each. A message refused for good (larger than the topic's
  ``max.message.bytes``, a ``raw`` record without its ``raw_log_key``) is dead-lettered with
  the reason while the rest of the batch counts as delivered; any other failure (brokers
  down, a missing topic, refused credentials, a timeout) is retried, naming the brokers, the
  topic and librdkafka's reason;
* a retried batch does not resend the messages already acknowledged by an earlier attempt
  (they are remembered per batch while it is retried), so a backend outage does not duplicate;
* the record's identity (Events ``(uid, resourceVersion)``, audit ``(auditID, stage)``, tailed
  lines ``(file uid, offset)``) goes in the ``kubetrail-identity`` header (JSON) and its time in
  ``kubetrail-time`` (nanoseconds): the one window left, ``kill -9`` after the brokers stored a
  batch but before the source's checkpoint (or the filesystem buffer's cursor) moved, re-sends
  those records with the same identity, at most the group in flight (up to 16 batches, the
  sink runner's group size); the ``kafka`` input hands the identity on, so an idempotent sink
  (es/opensearch ``_id``) stores them once. Measured: 200,000 lines, two SIGKILLs, 0 lost,
  5,184 re-sent (``tests/unit/test_kafka.py``).

Polling: librdkafka calls back from ``poll()``; a thread of this sink polls, and the callback
counts down per batch and wakes the waiting coroutine with ``call_soon_threadsafe``, so the
event loop never blocks on the network and no Python object is made per message but a partial.
Batches queued behind each other are produced together (``write_group``) so the brokers' round
trip is paid once per group, not once per batch.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import msgpack
import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer

from kubetrail.core.accessor import RecordAccessor
from kubetrail.core.component import ComponentContext, Sink
from kubetrail.core.errors import ConfigError, PermanentError, RetryableError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.core.secrets import CHECK_INTERVAL, Secret, Text, file_stamp, reveal

IDENTITY_HEADER = "kubetrail-identity"
TIME_HEADER = "kubetrail-time"
# librdkafka's answers that retrying the same message can never fix: dead-lettered.
PERMANENT_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_REQUIRED_ACKS,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.POLICY_VIOLATION,
    }
)
REMEMBERED_BATCHES = 256  # batches being retried whose acknowledged messages are remembered


def message_kind(text: str) -> str:
    """librdkafka's message with its digits ignored: the same complaint about another broker,
    port or number of milliseconds is the same kind (:class:`ClientLog`, :class:`ClientErrors`)."""
    return re.sub(r"\d+", "#", text)


class ClientLog:
    """librdkafka's log lines into ours, each kind at most once per ``every`` seconds.

    librdkafka logs every reconnect attempt ("Connect to ... failed: Connection refused" several
    times a second while brokers are down); the state is what matters, and the error callback
    and the delivery errors say it too. Digits are ignored when comparing, so the same complaint
    about another broker or port counts as the same kind. Nothing is above a warning: an
    unreachable broker is retried, not an error of kubetrail's.
    """

    def __init__(self, logger: logging.Logger, every: float = 30.0) -> None:
        self._log = logger
        self._every = every
        self._seen: dict[str, float] = {}

    def log(self, level: int, fmt: str, *args: object) -> None:
        text = fmt % args if args else fmt
        kind = message_kind(text)
        now = time.monotonic()
        if now - self._seen.get(kind, -self._every) < self._every:
            return
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[kind] = now
        self._log.log(min(level, logging.WARNING), text)


class ClientErrors:
    """librdkafka's error callback (its poll thread) into our log, with the latest text kept in
    ``last`` for the messages that quote it.

    An error is logged when its kind (digits ignored, as :class:`ClientLog` compares) differs
    from the last one's: while brokers are down librdkafka reports the same refusal several
    times a second, each with another ``(after Nms in state CONNECT)``, and the state is what
    matters.
    """

    def __init__(self, logger: logging.Logger, brokers: str) -> None:
        self._log = logger
        self._brokers = brokers
        self._kind = ""
        self.last = ""

    def __call__(self, err: KafkaError) -> None:
        self.last = f"{err.name()}: {err.str()}"
        kind = message_kind(self.last)
        if kind != self._kind:
            self._kind = kind
            self._log.warning("kafka client error", extra={"brokers": self._brokers, "error": self.last})


def _timestamp(time_ns: int, fmt: str) -> float | str:
    """Fluent Bit's ``timestamp_format``: double, iso8601 (seconds), iso8601_ns."""
    if fmt == "double":
        return time_ns / 1e9
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{base}.{nanos:09d}Z" if fmt == "iso8601_ns" else f"{base}Z"


class SslLocations:
    """librdkafka's ``ssl.*.location`` files: watched only to say that a rotation is *not* used.

    librdkafka (2.16, the one confluent-kafka 2.16 bundles) reads ``ssl.certificate.location``,
    ``ssl.key.location``, ``ssl.ca.location`` (and the ``ssl.*.pem`` strings) once, when the
    client is created, into one ``SSL_CTX`` all broker connections share; it has no call to load
    them again (a polling reload, ``ssl.certificate.refresh.interval.ms``, is an open pull request,
    confluentinc/librdkafka#5483, refused as unknown by this version). A new client would read the
    new files, but not for free: a new producer is a new idempotent producer id (safe only once the
    old one is flushed), a new consumer leaves and rejoins its group (a rebalance for every
    member). kubetrail does not do that behind the user's back; it notices the rotation (a stat
    per second, as for the other credential files) and warns once per change, naming the option
    and the file, so that a restart (``kubectl rollout restart``: offsets are committed only once
    delivered, nothing is lost) happens before the old certificate expires.
    """

    KEYS = ("ssl.certificate.location", "ssl.key.location", "ssl.ca.location", "ssl.keystore.location")

    def __init__(self, rdkafka: Mapping[str, Text], logger: logging.Logger) -> None:
        self.log = logger
        self.paths = {f"rdkafka.{k}": str(rdkafka[k]) for k in self.KEYS if isinstance(rdkafka.get(k), str)}
        self._stamps = {option: file_stamp(path) for option, path in self.paths.items()}
        self._checked = time.monotonic()

    def check(self) -> list[str]:
        """The options whose file changed since the last check (each warned about once)."""
        now = time.monotonic()
        if not self.paths or now - self._checked < CHECK_INTERVAL:
            return []
        self._checked = now
        changed = []
        for option, path in self.paths.items():
            stamp = file_stamp(path)
            if stamp != self._stamps[option]:
                self._stamps[option] = stamp
                changed.append(option)
                self.log.warning(
                    f"{option} changed on disk, but librdkafka loaded it when the client was created and cannot "
                    "load it again: restart kubetrail to use the new file (before the old certificate expires)",
                    extra={"option": option, "path": path},
                )
        return changed


class SaslCredentials:
    """``rdkafka.sasl.username`` / ``rdkafka.sasl.password`` read from files that rotate.

    librdkafka changes a running client's SASL PLAIN/SCRAM credentials in place
    (``set_sasl_credentials``, used from the next authentication: every new connection, and
    the periodic re-authentication a broker asks for with ``connections.max.reauth.ms``), so the
    producer and the consumer are not rebuilt: no rebalance of the consumer group, no new
    idempotent producer id, no batch in flight lost. Established connections keep the session
    they authenticated; a broker without ``connections.max.reauth.ms`` lets them live until they
    reconnect. Any other librdkafka property cannot change on a running client, so a
    ``${file:...}`` there is refused at start rather than read once and silently kept.
    """

    KEYS = ("sasl.username", "sasl.password")

    def __init__(self, rdkafka: Mapping[str, Text], logger: logging.Logger) -> None:
        for key, value in rdkafka.items():
            if isinstance(value, Secret) and key not in self.KEYS:
                raise ConfigError(
                    "${file:...} is read only in rdkafka.sasl.username and rdkafka.sasl.password (librdkafka "
                    "changes no other property of a running client); give TLS keys as files with ssl.*.location",
                    key=f"rdkafka.{key}",
                )
        self.log = logger
        self.ssl_files = SslLocations(rdkafka, logger)  # checked from apply(): the same poll loops
        self.username, self.password = rdkafka.get("sasl.username"), rdkafka.get("sasl.password")
        self.rotating = isinstance(self.username, Secret) or isinstance(self.password, Secret)
        self._applied = self.current()

    def current(self) -> tuple[str, str]:
        return (reveal(self.username) or "", reveal(self.password) or "")

    def apply(self, client: Producer | Consumer) -> None:
        """Hand rotated credentials to the client (from its librdkafka thread; a stat per second)."""
        self.ssl_files.check()
        if not self.rotating:
            return
        current = self.current()
        if current == self._applied:
            return
        client.set_sasl_credentials(*current)
        changed = [k for k, old, new in zip(self.KEYS, self._applied, current, strict=True) if old != new]
        self._applied = current
        self.log.info(
            "SASL credentials changed: librdkafka uses them from its next authentication", extra={"changed": changed}
        )


def revealed(rdkafka: Mapping[str, Text]) -> dict[str, str]:
    """``rdkafka.*`` with the current content of any credential file."""
    return {key: reveal(value) or "" for key, value in rdkafka.items()}


def producer_config(brokers: str, rdkafka: Mapping[str, Text], logger: Any) -> dict[str, Any]:
    """The librdkafka configuration: ``rdkafka.*`` as given, the guarantees on top."""
    config: dict[str, Any] = {"bootstrap.servers": brokers, "logger": ClientLog(logger)}
    for key, value in revealed(rdkafka).items():
        config[key] = value
    acks = str(config.get("acks", config.get("request.required.acks", "all"))).strip().lower()
    if acks not in ("all", "-1"):
        key = "rdkafka.acks" if "acks" in config else "rdkafka.request.required.acks"
        raise ConfigError(
            f"must be all (-1): a batch counts as delivered only once every in-sync replica has it; got {acks!r}",
            key=key,
        )
    if str(config.get("enable.idempotence", "true")).strip().lower() in ("false", "0", "off", "no"):
        raise ConfigError(
            "must stay on: without it a retry inside the client can write a message twice",
            key="rdkafka.enable.idempotence",
        )
    config.pop("request.required.acks", None)
    config["acks"] = "all"
    config["enable.idempotence"] = True
    return config


class _Wait:
    """Delivery reports of one produce call: counted down in the poll thread."""

    __slots__ = ("acknowledged", "errors", "future", "loop", "remaining")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int, acknowledged: list[set[int]]) -> None:
        self.loop = loop
        self.remaining = count
        self.acknowledged = acknowledged  # per batch: indexes of the records the brokers have
        self.errors: list[tuple[int, int, KafkaError]] = []  # (batch no., record index, error)
        self.future: asyncio.Future[None] = loop.create_future()
        if count == 0:
            self.future.set_result(None)

    def report(self, batch_no: int, index: int, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self.errors.append((batch_no, index, err))
        else:
            self.acknowledged[batch_no].add(index)
        self.remaining -= 1
        if self.remaining == 0:
            self.loop.call_soon_threadsafe(self._finish)

    def skip(self) -> None:
        """A record that was never handed to librdkafka (refused before): no report will come."""
        self.remaining -= 1
        if self.remaining == 0:
            self._finish()

    def _finish(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class KafkaSink(Sink):
    plugin_name = "kafka"
    description = "Produces records to Kafka topics (acks=all, idempotent), acknowledged once the brokers have them"
    options = (
        Option("brokers", required=True, help="Bootstrap brokers, host:port, comma-separated"),
        Option("topics", "list", ["fluent-bit"], help="Topics; the first is the default"),
        Option("topic_key", help="Record key (or $accessor) naming the topic: one of topics, any with dynamic_topic"),
        Option("dynamic_topic", "bool", False, help="Use a topic_key value even when it is not in topics"),
        Option("message_key", help="Message key of every record (when message_key_field gives none)"),
        Option("message_key_field", help="Record key (or $accessor) whose value is the message key (keeps order)"),
        Option("format", "choice", "json", choices=("json", "msgpack", "raw"), help="Message encoding of a record"),
        Option("raw_log_key", help="format raw: the record key whose value is the message"),
        Option("timestamp_key", "str", "@timestamp", help="Key of the record time in json/msgpack"),
        Option(
            "timestamp_format",
            "choice",
            "double",
            choices=("double", "iso8601", "iso8601_ns"),
            help="double: seconds; iso8601: seconds precision; iso8601_ns: nanoseconds",
        ),
        Option("queue_full_retries", "int", 10, help="Waits of 1 s for room in librdkafka's queue (0: no limit)"),
        Option("identity_header", "bool", True, help="Put the record identity and time in message headers"),
        Option(
            "rdkafka.*",
            prefix=True,
            help="Any librdkafka property (security.protocol, sasl.*, ssl.*, ...)",
            secret=True,  # ${file:...} in sasl.username / sasl.password only (SaslCredentials)
        ),
    )

    def __init__(self, ctx: ComponentContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.brokers: str = config["brokers"]
        self.topics: list[str] = config["topics"] or ["fluent-bit"]
        # A plain key as in Fluent Bit, or a record accessor ($kubernetes['pod_id']) for a
        # nested one: the kubernetes filter nests the pod's identity.
        self.topic_key = _accessor(config["topic_key"], "topic_key")
        self.dynamic_topic: bool = config["dynamic_topic"]
        self.message_key: bytes | None = config["message_key"].encode() if config["message_key"] else None
        self.message_key_field = _accessor(config["message_key_field"], "message_key_field")
        self.format: str = config["format"]
        self.raw_log_key: str | None = config["raw_log_key"]
        if self.format == "raw" and not self.raw_log_key:
            raise ConfigError("format raw needs raw_log_key (the record key whose value is the message)", key="format")
        self.timestamp_key: str = config["timestamp_key"]
        self.timestamp_format: str = config["timestamp_format"]
        self.queue_full_retries: int = config["queue_full_retries"]
        self.headers: bool = config["identity_header"]
        self.rdkafka: dict[str, Text] = dict(config["rdkafka.*"])
        self.sasl = SaslCredentials(self.rdkafka, self.log)
        self._config = producer_config(self.brokers, self.rdkafka, self.log)
        self._errors = ClientErrors(self.log, self.brokers)
        self._config["error_cb"] = self._errors
        try:
            # librdkafka validates every property here: an unknown or bad one is refused with
            # its own message before anything starts.
            self.producer = Producer(self._config)
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConfigError(f"librdkafka refused the configuration: {reason(exc)}", key="rdkafka.*") from None
        self._poller: threading.Thread | None = None
        self._stopping = threading.Event()
        # id(batch) -> (batch, {record index acknowledged}) for batches being retried.
        self._acknowledged: OrderedDict[int, tuple[Batch, set[int]]] = OrderedDict()
        self._m_messages = self.metrics.counter("kubetrail_kafka_messages", "Messages acknowledged by the brokers")

    # -- librdkafka callbacks (poll thread) ---------------------------------------------------

    def _poll(self) -> None:
        while not self._stopping.is_set():
            self.sasl.apply(self.producer)
            self.producer.poll(0.1)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll, name=f"kafka-{self.ctx.component_id}", daemon=True)
            self._poller.start()
        await asyncio.to_thread(self._check_topics)

    def _check_topics(self) -> None:
        """The brokers answer (address, credentials, TLS) and the fixed topics exist."""
        try:
            metadata = self.producer.list_topics(timeout=5)
        except KafkaException as exc:
            raise RetryableError(
                f"cannot reach the Kafka brokers {self.brokers}: {reason(exc)}{self._last_error_text()}"
            ) from None
        static = self.topics[:1] if self.dynamic_topic else self.topics
        for topic in static:
            found = metadata.topics.get(topic)
            if found is None or found.error is not None:
                why = found.error.str() if found is not None and found.error is not None else "it does not exist"
                raise RetryableError(
                    f"topic {topic!r} is not available on the brokers {self.brokers}: {why} "
                    "(create it, or enable the brokers' auto.create.topics.enable)"
                )

    def _last_error_text(self) -> str:
        return f" (last client error: {self._errors.last})" if self._errors.last else ""

    async def close(self) -> None:
        remaining = await asyncio.to_thread(self.producer.flush, 10)
        self._stopping.set()
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join, 5)
        if remaining:
            self.log.warning("messages not acknowledged at shutdown", extra={"messages": remaining})

    # -- writing -------------------------------------------------------------------------------

    def group_key(self, batch: Batch) -> object | None:
        return "kafka"  # any queued batches: one round trip to the brokers for all of them

    async def write(self, batch: Batch) -> None:
        await self.write_group([batch])

    async def write_group(self, batches: list[Batch]) -> None:
        loop = asyncio.get_running_loop()
        jobs: list[tuple[Batch, set[int], list[tuple[int, Record]]]] = []
        rejected: list[list[tuple[Record, str]]] = []
        for batch in batches:
            _, done = self._acknowledged.setdefault(id(batch), (batch, set()))
            self._acknowledged.move_to_end(id(batch))
            records = batch.records
            jobs.append((batch, done, [(i, r) for i, r in enumerate(records) if i not in done]))
            rejected.append([])
        while len(self._acknowledged) > REMEMBERED_BATCHES:
            self._acknowledged.popitem(last=False)
        wait = _Wait(loop, sum(len(todo) for _, _, todo in jobs), [done for _, done, _ in jobs])
        for batch_no, (_, _, todo) in enumerate(jobs):
            for index, record in todo:
                problem = await self._produce(record, partial(wait.report, batch_no, index))
                if problem is not None:
                    rejected[batch_no].append((record, problem))
                    wait.skip()
        await wait.future
        errors = wait.errors
        too_large = [e for e in errors if e[2].code() == KafkaError.MSG_SIZE_TOO_LARGE]
        if len(too_large) > 1:
            # The brokers check a topic's max.message.bytes per record batch, and librdkafka
            # puts several messages in one: small ones sharing a batch with a large one are
            # refused with it. Each is sent again alone; what fails alone is really too large.
            errors = [e for e in errors if e[2].code() != KafkaError.MSG_SIZE_TOO_LARGE]
            for batch_no, index, _ in too_large:
                alone = _Wait(loop, 1, [done for _, done, _ in jobs])
                await self._produce(jobs[batch_no][0].records[index], partial(alone.report, batch_no, index))
                await alone.future
                errors.extend(alone.errors)
        retry: list[str] = []
        for batch_no, index, err in errors:
            record = jobs[batch_no][0].records[index]
            reason = f"{err.name()}: {err.str()}"
            if err.code() in PERMANENT_ERRORS:
                rejected[batch_no].append((record, f"the brokers refused the message: {reason}"))
            else:
                retry.append(reason)
        self._m_messages.inc(sum(len(done) for _, done, _ in jobs))
        if retry:
            raise RetryableError(
                f"{len(retry)} message(s) not acknowledged by the brokers {self.brokers}: {retry[0]}"
                f"{self._last_error_text()}"
            )
        refused = [pair for pairs in rejected for pair in pairs]
        if not refused or len(jobs) == 1:
            # A group that fails (refusals too) is written again batch by batch by the runner
            # (the per-batch policy): each must then resend only what was not acknowledged, so
            # the acknowledged records stay remembered until that second write.
            for batch, _, _ in jobs:
                self._acknowledged.pop(id(batch), None)
        if refused:
            raise PermanentError(f"{len(refused)} record(s) refused: {refused[0][1]}", rejected=refused)

    async def _produce(self, record: Record, callback: Callable[[KafkaError | None, Message], None]) -> str | None:
        """Hands one record to librdkafka; a reason when it can never be sent."""
        body = record.body
        topic = self.topics[0]
        if self.topic_key is not None:
            wanted = self.topic_key.get(body)
            if isinstance(wanted, str) and wanted and (self.dynamic_topic or wanted in self.topics):
                topic = wanted
        key = self.message_key
        if self.message_key_field is not None:
            value = self.message_key_field.get(body)
            if value is not None:
                key = value.encode() if isinstance(value, str) else orjson.dumps(value)
        if self.format == "raw":
            raw = body.get(self.raw_log_key)  # type: ignore[arg-type]
            if raw is None:
                return f"format raw: the record has no {self.raw_log_key!r} key"
            payload = raw.encode() if isinstance(raw, str) else raw if isinstance(raw, bytes) else orjson.dumps(raw)
        elif self.format == "json":
            payload = self._json(record)
        else:
            document = dict(body)
            document[self.timestamp_key] = _timestamp(record.time_ns, self.timestamp_format)
            payload = msgpack.packb(document, use_bin_type=True, default=str)
        headers: list[tuple[str, str | bytes | None]] | None = None
        if self.headers:
            headers = [(TIME_HEADER, str(record.time_ns).encode())]
            if record.identity is not None:
                headers.append((IDENTITY_HEADER, orjson.dumps(list(record.identity), default=str)))
        attempts = 0
        while True:
            try:
                self.producer.produce(
                    topic,
                    payload,
                    key,
                    on_delivery=callback,
                    timestamp=record.time_ns // 1_000_000,
                    headers=headers,
                )
                return None
            except BufferError:
                # librdkafka's queue is full (queue.buffering.max.*): Fluent Bit waits 1 s and
                # tries again, queue_full_retries times (0: for ever).
                attempts += 1
                if self.queue_full_retries and attempts > self.queue_full_retries:
                    raise RetryableError(
                        f"librdkafka's queue stayed full after {self.queue_full_retries} waits of 1 s "
                        f"(brokers {self.brokers}){self._last_error_text()}"
                    ) from None
                await asyncio.sleep(1.0)
            except KafkaException as exc:
                err = exc.args[0]
                if isinstance(err, KafkaError) and err.code() in PERMANENT_ERRORS:
                    return f"librdkafka refused the message for topic {topic!r}: {err.name()}: {err.str()}"
                raise RetryableError(f"cannot produce to topic {topic!r} on {self.brokers}: {reason(exc)}") from None

    def _json(self, record: Record) -> bytes:
        # Fluent Bit puts the time first; the record's own bytes are reused after it.
        stamp = orjson.dumps({self.timestamp_key: _timestamp(record.time_ns, self.timestamp_format)})[:-1]
        raw = record.json_bytes()
        if raw == b"{}":
            return stamp + b"}"
        return stamp + b"," + raw[1:]


def _accessor(text: str | None, key: str) -> RecordAccessor | None:
    if not text:
        return None
    try:
        return RecordAccessor(text)
    except ValueError as exc:
        raise ConfigError(str(exc), key=key) from None


def reason(exc: BaseException) -> str:
    """librdkafka's error name and text (``_TRANSPORT: ...``), or the exception's message."""
    err = exc.args[0] if exc.args else None
    if isinstance(err, KafkaError):
        return f"{err.name()}: {err.str()}"
    return str(exc)
