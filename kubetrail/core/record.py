"""Records and batches: the unit of work that flows from sources to sinks.

Per-record Python overhead is the whole performance budget of a Python collector, so:

* work moves in :class:`Batch` objects of hundreds to thousands of records, never one by one;
* a :class:`Record` may carry only the original bytes (``raw``) of a JSON document and parse
  them lazily, the first time a filter or sink asks for ``body``. A record nobody modifies is
  written out by reusing those bytes, which is most of the speed of the tail -> file path.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import orjson

from kubetrail.core.acks import AckToken


class Record(msgspec.Struct, gc=False):
    """One log record: tag, timestamp in nanoseconds, a body, and optional metadata.

    ``raw`` holds the exact JSON bytes of the body while the body is unmodified. Reading
    ``body`` parses them on first use; calling :meth:`mutable_body` marks the record modified
    so that sinks re-serialise it instead of reusing stale bytes.

    A msgspec Struct rather than a plain class: it is created once per line on the hot path,
    and a Struct is built in C about three times faster. ``gc=False`` keeps millions of
    short-lived records out of the cycle collector (a record never refers back to itself).
    """

    tag: str
    time_ns: int
    body_: dict[str, Any] | None = None
    raw: bytes | None = None
    identity: tuple[Any, ...] | None = None
    meta: dict[str, Any] | None = None

    @property
    def body(self) -> dict[str, Any]:
        """The record as a dict (parsed from ``raw`` on first access). Treat as read-only."""
        body = self.body_
        if body is None:
            body = orjson.loads(self.raw) if self.raw is not None else {}
            self.body_ = body
        return body

    def mutable_body(self) -> dict[str, Any]:
        """The body for in-place changes; drops the cached original bytes."""
        body = self.body
        self.raw = None
        return body

    def replace_body(self, body: dict[str, Any]) -> None:
        self.body_ = body
        self.raw = None

    def json_bytes(self) -> bytes:
        """The body as compact JSON, reusing the original bytes when nothing changed it."""
        raw = self.raw
        if raw is not None:
            return raw
        return orjson.dumps(self.body_ if self.body_ is not None else {})

    @property
    def time_seconds(self) -> float:
        return self.time_ns / 1e9


class Batch:
    """Records that travel together, with the acknowledgement token of the source that made them.

    ``size_bytes`` is the input size as the source measured it (for metrics and buffer limits);
    ``created`` is a monotonic timestamp for the batch-latency histogram.

    The records may be *lazy*: a source that has validated a block of JSON lines can hand over
    ``raw_block`` plus a ``materialize`` function instead of a list. Routing needs only the tag,
    and a sink writing JSON lines needs only the block, so on that path no per-record object is
    ever built. Anything that reads ``records`` builds them on first access.

    A lazy batch may also be *unchecked* (``check`` given): its block is whole lines, not yet
    validated, because the first filter on its route decodes every line anyway and validates
    it then (``Transform.checks_json_lines``). Anything else calls :meth:`check` first (the
    router does, and ``records`` does); a block that fails is replaced by the records its
    source builds line by line.
    """

    __slots__ = ("_check", "_materialize", "_records", "ack", "count", "created", "raw_block", "size_bytes", "tag")

    def __init__(
        self,
        tag: str,
        records: list[Record] | None,
        ack: AckToken | None = None,
        size_bytes: int = 0,
        created: float | None = None,
        raw_block: bytes | None = None,
        materialize: Callable[[], list[Record]] | None = None,
        count: int | None = None,
        check: Callable[[], Batch | None] | None = None,
    ) -> None:
        if records is None and (materialize is None or count is None):
            raise ValueError("a lazy batch needs materialize and count")
        self.tag = tag
        self._check = check if records is None else None
        self._records = records
        self._materialize = materialize
        self.count = len(records) if records is not None else count
        self.ack = ack
        self.size_bytes = size_bytes
        self.created = time.monotonic() if created is None else created
        # The exact input bytes, one newline-terminated JSON document per record, in order.
        # Set by a source only while every record is unmodified; the router clears it as soon
        # as a transform touches the batch. Sinks that write JSON lines write it as it is.
        self.raw_block = raw_block

    @property
    def unchecked(self) -> bool:
        """True while the lazy block waits for its validation (see :meth:`check`)."""
        return self._check is not None

    def check(self) -> None:
        """Validate an unchecked block. It stays as it is when it passes; when it does not, this
        batch takes the records (and block, if any) its source built line by line instead."""
        check = self._check
        if check is None:
            return
        self._check = None
        replacement = check()
        if replacement is not None:
            self._records = replacement.records
            self._materialize = None
            self.count = len(replacement)
            self.raw_block = replacement.raw_block

    @property
    def records(self) -> list[Record]:
        records = self._records
        if records is None:
            self.check()
            if self._records is not None:
                return self._records
            assert self._materialize is not None
            records = self._records = self._materialize()
            self._materialize = None
        return records

    @property
    def is_materialized(self) -> bool:
        """True once the records exist (given, or built from the block)."""
        return self._records is not None

    def __len__(self) -> int:
        return self.count  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def derive(self, records: list[Record]) -> Batch:
        """A batch with other records but the same tag, token and age (for filters)."""
        return Batch(self.tag, records, self.ack, self.size_bytes, self.created, None)


def now_ns() -> int:
    return time.time_ns()


def identity_key(record: Record) -> str | None:
    """A stable text key for the record's identity, or None when the source gave it none.

    The same occurrence (an Event's ``(uid, resourceVersion)``, an audit ``(auditID, stage)``)
    always gives the same key, in this process and after a restart, so idempotent sinks can
    use it as a document id (es ``_id``) and a replay is recognised, not duplicated. A
    BLAKE2b digest keeps it short and free of characters a destination might refuse.
    """
    identity = record.identity
    if identity is None:
        return None
    text = "\x1f".join("" if part is None else str(part) for part in identity)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
