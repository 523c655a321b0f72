"""Records and batches: the unit of work that flows from sources to sinks.

Per-record Python overhead is the whole performance budget of a Python collector, so:

* work moves in :class:`Batch` objects of hundreds to thousands of records, never one by one;
* a :class:`Record` may carry only the original bytes (``raw``) of a JSON document and parse
  them lazily, the first time a filter or sink asks for ``body``. A record nobody modifies is
  written out by reusing those bytes, which is most of the speed of the tail -> file path.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgspec
import orjson

from kubetrail.core.acks import AckToken
from kubetrail.core.block import LineBlock, ReadyBlock


def _float_or_text(text: str) -> float | str:
    value = float(text)
    return value if math.isfinite(value) else text


def _int_or_text(text: str) -> int | float | str:
    value = int(text)
    if -(2**63) <= value < 2**64:
        return value
    return _float_or_text(text)  # as orjson reads it: a double, when one holds it


def _not_json(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def decode_json(raw: bytes) -> Any:
    """``raw`` decoded as orjson decodes it, except that a number beyond a double (``1e999``, an
    integer of 400 digits), which orjson refuses, is kept as its text (a string). Lines reach
    filters and sinks validated by msgspec, which reads numbers of any size, so a filter that
    needs the whole document (the audit filter's redaction, a detection rule's fields) decodes
    it here: such a number must not make it fail, pass its batch on unredacted, or blind a rule.
    Raises ``ValueError`` on what is not JSON at all."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass  # the slow way, for the rare line that needs it
    try:
        value = json.loads(raw, parse_float=_float_or_text, parse_int=_int_or_text, parse_constant=_not_json)
    except RecursionError:
        raise ValueError("nested too deeply") from None  # as orjson refuses it (1,024 levels)
    try:
        orjson.dumps(value)  # what orjson would refuse to write (a lone surrogate) is not taken either
    except orjson.JSONEncodeError as exc:
        raise ValueError(str(exc)) from None
    return value


def decode_body(raw: bytes) -> dict[str, Any]:
    """A record's body from its JSON line (``raw``), by :func:`decode_json`; a line that is not
    a JSON object after all is kept as text under ``log``, as a parser keeps a line that is not
    JSON, so that a filter or a sink that needs the fields never fails on it (a failing sink
    retried the batch forever)."""
    try:
        body = decode_json(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError too
        body = None
    if not isinstance(body, dict):
        return {"log": raw.decode("utf-8", "replace")}
    return body


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
            body = decode_body(self.raw) if self.raw is not None else {}
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

    The records may be *lazy*: a :class:`~kubetrail.core.block.LineBlock` (see that module for
    the whole mechanism), given as ``block``, or as ``raw_block`` + ``materialize`` + ``count``
    for a block already known to be valid. Routing needs only the tag and the count; a sink
    writing JSON lines needs only :attr:`raw_block`; anything that reads :attr:`records` builds
    them on first access.
    """

    __slots__ = ("_block", "_raw", "_records", "ack", "count", "created", "size_bytes", "tag")

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
        block: LineBlock | None = None,
    ) -> None:
        if records is None and block is None:
            if raw_block is None or materialize is None or count is None:
                raise ValueError("a lazy batch needs a block (or raw_block, materialize and count)")
            block = ReadyBlock(raw_block, count, materialize)
        self.tag = tag
        self._records = records
        self._block = block if records is None else None
        self.count = len(records) if records is not None else block.count  # type: ignore[union-attr]
        self.ack = ack
        self.size_bytes = size_bytes
        self.created = time.monotonic() if created is None else created
        # With records: their exact bytes, one newline-terminated JSON document per record, in
        # order, set by a source only while every record is unmodified; the router clears it as
        # soon as a transform touches the batch. Sinks that write JSON lines write it as it is.
        self._raw = raw_block if records is not None else None

    @property
    def raw_block(self) -> bytes | None:
        """The records as validated JSON lines, or None when they are not (any more) a block."""
        block = self._block
        if block is None:
            return self._raw
        data = block.data()
        if data is None:
            self._fall_back()
            return self._raw
        return data

    @raw_block.setter
    def raw_block(self, value: bytes | None) -> None:
        self.records  # noqa: B018 - a lazy batch becomes its records first
        self._raw = value

    def pending_block(self) -> bytes | None:
        """The lines as read, before anyone validated or built them, for a filter that decodes
        every line itself (and turns to :attr:`raw_block` / :attr:`records` when a line is not
        what it takes). None when there is no such block, or validation may change its bytes."""
        block = self._block
        if block is None or block.rewrites or block._data is not False:
            return None
        return block.source

    @property
    def line_block(self) -> LineBlock | None:
        """The block this batch still is (None once it is records): for a filter that made the
        block and reads what its own scan left in it (the audit filter's detection classes)."""
        return self._block if self._records is None else None

    def block_times(self) -> Sequence[int]:
        """Each record's time, in order, without building records where the block knows them."""
        block = self._block
        if block is not None and block.data() is not None:
            times = block.line_times()
            if times is not None:
                return times
        return [record.time_ns for record in self.records]

    def _fall_back(self) -> None:
        """Validation failed: take the source's line-by-line records instead of the block."""
        block = self._block
        assert block is not None
        self._block = None
        if block.fallback is None:
            raise ValueError("a block that failed its validation has no line-by-line fallback")
        replacement = block.fallback()
        self._records = replacement.records
        self._raw = replacement.raw_block
        self.count = len(self._records)

    @property
    def records(self) -> list[Record]:
        records = self._records
        if records is None:
            block = self._block
            assert block is not None
            built = block.records()
            if built is None:
                self._fall_back()
                assert self._records is not None
                return self._records
            self._raw = block.data()
            self._block = None
            records = self._records = built
        return records

    @property
    def is_materialized(self) -> bool:
        """True once the records exist (given, or built from the block)."""
        return self._records is not None

    def __len__(self) -> int:
        return self.count

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
