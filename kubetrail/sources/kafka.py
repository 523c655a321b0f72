"""The ``kafka`` input: a consumer group member that commits only what every sink has delivered.

Fluent Bit's options (``brokers``, ``topics``, ``group_id``, ``client_id``, ``poll_ms``,
``format`` none/json, ``buffer_max_size``, ``enable_auto_commit``, ``rdkafka.<property>``) and
Fluent Bit's record: ``{"topic", "partition", "offset", "error", "key", "payload"}``, the payload
parsed when ``format json``. The client is confluent-kafka (librdkafka, as Fluent Bit; why, by
measurement: :mod:`kubetrail.sinks.kafka`).

Delivery:

* **Commit after delivery.** Auto-commit is off (``enable_auto_commit on`` is refused: it would
  commit what no sink has yet). Each poll makes one batch per partition whose token comes
  from that partition's :class:`~kubetrail.core.acks.OrderedAcks`; when every sink acknowledged
  a batch and every batch before it, the partition's next offset is committed (at most every
  ``COMMIT_INTERVAL`` seconds, and at once when partitions are revoked and at shutdown). A
  committed offset therefore only ever covers delivered records.
* **Rebalances.** When partitions are revoked (a member joined or left), the member waits up to
  ``REVOKE_WAIT`` seconds for their batches in flight, commits what was delivered and lets
  them go; the new owner starts from that commit. A member killed with SIGKILL commits nothing
  more: its partitions go to the others after ``session.timeout.ms`` and the records after its
  last commit are read again. Those re-reads (and a producer's replays) carry the same
  identity: the ``kubetrail-identity`` header the ``kafka`` output writes, otherwise
  ``(topic, partition, offset)``; an idempotent sink (es/opensearch ``_id``) stores them once,
  any other sink gets them at least once.
* **Bad messages** (``format json`` and a payload that is not a JSON object): counted
  (``kubetrail_kafka_bad_messages_total``) and written to the dead-letter file (service
  ``storage.path``/``storage.rejected.path``, ``<input id>.jsonl``) with topic, partition,
  offset and the reason; their offset is committed like any other, so they never block
  their partition. Without ``storage.path`` they are logged with the same details and counted.
* **Backpressure**: while the pipeline's buffers are full ``send`` waits and nothing more is
  consumed (librdkafka prefetches a little). A wait longer than ``max.poll.interval.ms``
  (librdkafka's default 300 s) makes the member leave the group; it rejoins when polling again.

The consumer is used from one thread of its own (librdkafka calls the rebalance callbacks from
inside ``consume``); acknowledgements run on the event loop and only touch plain dicts.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from kubetrail.core.acks import OrderedAcks
from kubetrail.core.component import ComponentContext, Emitter, Source
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.sinks.kafka import (
    IDENTITY_HEADER,
    TIME_HEADER,
    ClientErrors,
    ClientLog,
    SaslCredentials,
    reason,
    revealed,
)

COMMIT_INTERVAL = 0.5  # seconds between commits of delivered offsets
REVOKE_WAIT = 10.0  # seconds a revoked partition's batches in flight get to be delivered
MAX_MESSAGES = 5000  # messages per poll at most


class _Partition:
    """One assigned partition: its in-order acknowledgements and the offset to commit next."""

    __slots__ = ("_source", "acks", "commit", "committed", "partition", "revoked", "topic")

    def __init__(self, source: KafkaSource, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.commit: int | None = None  # next offset to read, once delivered up to it
        self.committed: int | None = None
        self.revoked = False
        self.acks: OrderedAcks[int] = OrderedAcks(self._advance)
        self._source = source

    def _advance(self, offset: int) -> None:
        if not self.revoked:
            self.commit = offset + 1
            self._source.commit_due.set()


class KafkaSource(Source):
    plugin_name = "kafka"
    description = "Consumes Kafka topics as a consumer group member; commits offsets once every sink delivered"
    options = (
        Option("brokers", required=True, help="Bootstrap brokers, host:port, comma-separated"),
        Option("topics", "list", required=True, help="Topics to subscribe to, comma-separated"),
        Option("group_id", "str", "fluent-bit", help="Consumer group"),
        Option("client_id", help="Client id passed to librdkafka"),
        Option("poll_ms", "int", 500, help="Longest wait for messages per poll, milliseconds"),
        Option("format", "choice", "none", choices=("none", "json"), help="json: the payload is parsed as JSON"),
        Option("buffer_max_size", "size", 4 * 1024 * 1024, help="Most payload bytes taken per poll"),
        Option("enable_auto_commit", "bool", False, help="Must stay off: offsets are committed once delivered"),
        Option(
            "rdkafka.*",
            prefix=True,
            help="Any librdkafka consumer property (security, sasl.*, ssl.*, ...)",
            secret=True,  # ${file:...} in sasl.username / sasl.password only (SaslCredentials)
        ),
    )

    def __init__(self, ctx: ComponentContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.tag: str = config["tag"]
        self.topics: list[str] = config["topics"]
        if not self.topics:
            raise ConfigError("needs at least one topic", key="topics")
        if config["enable_auto_commit"]:
            raise ConfigError(
                "must stay off: kubetrail commits a partition's offset only once every sink delivered the "
                "records before it (auto-commit would commit records not yet delivered)",
                key="enable_auto_commit",
            )
        self.poll_seconds = max(0.001, config["poll_ms"] / 1000)
        self.max_bytes: int = config["buffer_max_size"]
        self.format: str = config["format"]
        self.brokers: str = config["brokers"]
        self.group_id: str = config["group_id"]
        settings: dict[str, Any] = {
            "bootstrap.servers": self.brokers,
            "group.id": self.group_id,
            "auto.offset.reset": "earliest",  # a new group reads what is there, as Fluent Bit's
            "logger": ClientLog(self.log),
        }
        if config["client_id"]:
            settings["client.id"] = config["client_id"]
        self.sasl = SaslCredentials(config["rdkafka.*"], self.log)
        settings.update(revealed(config["rdkafka.*"]))
        for key in ("enable.auto.commit", "enable.auto.offset.store"):
            if str(settings.get(key, "false")).strip().lower() in ("true", "1", "on", "yes"):
                raise ConfigError("must stay off: offsets are committed once delivered", key=f"rdkafka.{key}")
        settings["enable.auto.commit"] = False
        settings["enable.auto.offset.store"] = False
        self._errors = ClientErrors(self.log, self.brokers)
        settings["error_cb"] = self._errors
        try:
            self.consumer = Consumer(settings)  # librdkafka validates every property here
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConfigError(f"librdkafka refused the configuration: {reason(exc)}", key="rdkafka.*") from None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kafka-{ctx.component_id}")
        self._partitions: dict[tuple[str, int], _Partition] = {}
        self._lock = threading.Lock()
        self._stop = asyncio.Event()
        self.commit_due = threading.Event()
        self.m_bad = self.metrics.counter("kubetrail_kafka_bad_messages", "Messages not valid for the input's format")
        self.m_commits = self.metrics.counter("kubetrail_kafka_commits", "Offset commits of delivered records")
        self.m_revoked = self.metrics.counter("kubetrail_kafka_partitions_revoked", "Partitions handed to others")

    # -- librdkafka callbacks (consumer thread) ------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._lock:
            for tp in partitions:
                self._partitions[(tp.topic, tp.partition)] = _Partition(self, tp.topic, tp.partition)
        self.log.info("partitions assigned", extra={"partitions": [f"{tp.topic}[{tp.partition}]" for tp in partitions]})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Give the batches in flight a moment, commit what was delivered, let the rest go."""
        with self._lock:
            states = [self._partitions.get((tp.topic, tp.partition)) for tp in partitions]
        owned = [s for s in states if s is not None]
        deadline = time.monotonic() + REVOKE_WAIT
        while any(len(s.acks) for s in owned) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._commit_sync(owned)
        with self._lock:
            for state in owned:
                state.revoked = True
                self._partitions.pop((state.topic, state.partition), None)
        self.m_revoked.inc(len(owned))
        self.log.info(
            "partitions revoked",
            extra={
                "partitions": [f"{s.topic}[{s.partition}]" for s in owned],
                "undelivered_batches": sum(len(s.acks) for s in owned),
            },
        )

    # -- offsets -----------------------------------------------------------------------------

    def _commit_sync(self, states: list[_Partition] | None = None) -> None:
        with self._lock:
            chosen = list(self._partitions.values()) if states is None else states
            due = [s for s in chosen if s.commit is not None and s.commit != s.committed and not s.revoked]
            offsets = [TopicPartition(s.topic, s.partition, s.commit or 0) for s in due]
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # Not fatal: a later commit covers these offsets; a lost one means a replay, no loss.
            self.log.warning("offset commit failed", extra={"group": self.group_id, "error": reason(exc)})
            return
        for state, tp in zip(due, offsets, strict=True):
            state.committed = tp.offset
        self.m_commits.inc()

    # -- running -----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(self, emitter: Emitter) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._thread,
            lambda: self.consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke),
        )
        self.log.info("subscribed", extra={"topics": self.topics, "group": self.group_id, "brokers": self.brokers})
        last_commit = time.monotonic()
        while not self._stop.is_set():
            messages = await loop.run_in_executor(self._thread, self._consume)
            if messages:
                await self._emit(emitter, messages)
            if self.commit_due.is_set() and time.monotonic() - last_commit >= COMMIT_INTERVAL:
                self.commit_due.clear()
                last_commit = time.monotonic()
                await loop.run_in_executor(self._thread, self._commit_sync)

    def _consume(self) -> list[Message]:
        """Up to MAX_MESSAGES or ``buffer_max_size`` bytes, waiting at most ``poll_ms``."""
        out: list[Message] = []
        size = 0
        timeout = self.poll_seconds
        self.sasl.apply(self.consumer)  # rotated credential files (at most a stat per second)
        while len(out) < MAX_MESSAGES and size < self.max_bytes:
            got = self.consumer.consume(MAX_MESSAGES - len(out), timeout)
            if not got:
                break
            for message in got:
                value = message.value()
                size += len(value) if value else 0
            out.extend(got)
            timeout = 0  # take what is already fetched, do not wait again
        return out

    async def _emit(self, emitter: Emitter, messages: list[Message]) -> None:
        groups: dict[tuple[str, int], list[Message]] = {}
        for message in messages:
            err = message.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    self._errors(err)
                continue
            groups.setdefault((message.topic(), message.partition()), []).append(message)  # type: ignore[arg-type]
        for key, group in groups.items():
            state = self._partitions.get(key)
            if state is None:  # revoked while this poll's messages were on their way
                continue
            records: list[Record] = []
            bad: list[tuple[Message, str]] = []
            size = 0
            for message in group:
                record, problem = self._record(message)
                if record is None:
                    bad.append((message, problem))
                else:
                    records.append(record)
                    size += len(message.value() or b"")
            if bad:
                await self._reject(bad)
            token = state.acks.token(group[-1].offset())
            if records:
                await emitter.send(Batch(self.tag, records, token, size))
            else:
                token.seal()  # only bad messages: handled, their offsets may be committed

    def _record(self, message: Message) -> tuple[Record | None, str]:
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        value = message.value() or b""
        payload: Any
        if self.format == "json":
            try:
                payload = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                return None, f"payload is not valid JSON ({exc})"
            if not isinstance(payload, dict):
                return None, f"payload is JSON but not an object ({type(payload).__name__})"
        else:
            payload = value.decode("utf-8", "replace")
        raw_key = message.key()
        key = raw_key.decode("utf-8", "replace") if isinstance(raw_key, bytes) else raw_key
        identity: tuple[Any, ...] = ("kafka", topic, partition, offset)
        time_ns = 0
        headers: list[tuple[str, bytes]] = message.headers() or []  # type: ignore[assignment]
        for name, header in headers:
            if name == IDENTITY_HEADER and header:
                try:
                    identity = tuple(orjson.loads(header))
                except (orjson.JSONDecodeError, TypeError):
                    pass  # not ours: keep the offset identity
            elif name == TIME_HEADER and header:
                try:
                    time_ns = int(header)
                except ValueError:
                    pass
        if not time_ns:
            kind, stamp = message.timestamp()
            time_ns = stamp * 1_000_000 if kind and stamp > 0 else time.time_ns()
        body = {"topic": topic, "partition": partition, "offset": offset, "error": None, "key": key, "payload": payload}
        return Record(self.tag, time_ns, body, None, identity), ""

    async def _reject(self, bad: list[tuple[Message, str]]) -> None:
        self.m_bad.inc(len(bad))
        pairs = []
        for message, why in bad:
            where = f"topic {message.topic()} partition {message.partition()} offset {message.offset()}"
            body = {
                "topic": message.topic(),
                "partition": message.partition(),
                "offset": message.offset(),
                "payload": (message.value() or b"").decode("utf-8", "replace"),
            }
            pairs.append((Record(self.tag, time.time_ns(), body), f"{where}: {why}"))
        writer = self.ctx.dead_letters  # the runtime's policy: None with storage.keep.rejected off
        if writer is not None and await writer.write(pairs, "bad_message"):
            self.log.warning(
                "bad messages dead-lettered",
                extra={"messages": len(pairs), "first": pairs[0][1], "path": str(writer.path)},
            )
            return
        for _, why in pairs:
            self.log.error("bad message skipped", extra={"reason": why})

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._commit_sync)
        # close() leaves the group at once, so the others take the partitions without waiting
        # for the session timeout (it calls the revoke callback, which commits again).
        await loop.run_in_executor(self._thread, self.consumer.close)
        self._thread.shutdown(wait=False)
