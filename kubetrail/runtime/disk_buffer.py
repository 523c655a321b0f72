"""Filesystem buffering (``storage.type filesystem``): one append-only, checksummed queue per output.

Where it sits, and why there
----------------------------
Between the router and an output's :class:`~kubetrail.runtime.sink_runner.SinkRunner`, one queue
per output under ``<storage.path>/out.<output id>/``. A batch from an input with
``storage.type filesystem`` is appended to the queue of every output it is routed to; the
source's acknowledgement token is released (so its checkpoint may move, the audit webhook may
answer 200) as soon as the frame is in the file. Each output then reads its own queue at its own
pace. Per-output queues (rather than Fluent Bit's one chunk per input with a list of outputs)
cost a second write when two outputs take the same data, and buy simple rules: an output that
is down holds back only its own segments, a segment is deleted as soon as *its* output has
delivered every frame in it (so "every output that receives it has delivered it" holds
trivially), and there is no shared reference count to get wrong after a crash.

Batches from ``memory`` inputs never touch the disk: they take the runner's in-memory queue
exactly as before, so the memory path costs nothing extra. When ``storage.path`` is set, every
output opens its queue at start, so a backlog left by a previous run is replayed even if the
configuration now has only memory inputs.

On disk
-------
``NNNNNNNNNNNN.seg`` segment files, numbered in order, each starting with an 8-byte magic and
then frames::

    magic b"\\xf0KTF" | payload length (u32 LE) | crc32(payload) (u32 LE) | payload

A payload is one batch encoded with msgspec's msgpack (tag, input size, record times as an int64
array, and either the batch's raw JSON-lines block when it is unmodified, or one JSON document
per record, plus identities and plain metadata). A batch that came with its original bytes comes
back with them, so the raw fast path of sinks survives the disk round trip. Appends happen in a
writer task that takes every frame waiting and writes them in one thread call (``os.writev``), then
one ``fdatasync`` for ``storage.sync full``: group commit, so concurrent inputs share fsyncs.

``cursor`` holds the position (segment, offset) up to which every frame has been delivered, with
its own crc32. It is rewritten in place after deliveries. A segment is unlinked once the cursor
is past it.

``storage.sync``
----------------
* ``normal`` (default, as in Fluent Bit): a frame counts as durable once ``write(2)`` returned:
  it is in the kernel's page cache and survives the process being killed (``kill -9``, OOM
  kill, a crash), but not a power loss or kernel crash before the kernel flushes it (about 30 s).
* ``full``: ``fdatasync`` before the source is acknowledged; survives power loss too. Slower by
  the disk's sync latency, shared by the frames of one group.

The cursor is never fsynced: losing it in a power loss makes the last deliveries repeat
(at-least-once, records carry identities), never lose data.

Recovery (every start)
----------------------
The segments before the cursor are deleted; the newest segment, the only one a crash can tear,
is checked frame by frame: a torn or corrupt tail is cut off (``ftruncate``), counted in
``kubetrail_buffer_corruption_total{kind="torn_tail"}`` and logged; starting never fails because
of what is in the buffer. New frames always go to a new segment. Frames before the tail are
checked when they are read: a frame whose checksum does not match is skipped, and reading
resumes at the next valid frame found by scanning for the frame magic with a matching checksum
(``kind="corrupt_frame"``); a segment with a bad file header is renamed ``*.corrupt``
(``kind="bad_segment"``) and skipped. A second process on the same ``storage.path`` is refused
(an ``flock`` on ``lock``).

Memory and backpressure
-----------------------
Frames just written are also kept in memory and handed to the workers without a read, as long
as the output keeps up and they fit in ``storage.backlog.mem_limit``; otherwise the output reads
them back from disk later, never holding more than that budget in memory (``backlog``). Appends
wait (the input pauses) while the queue holds ``storage.total_limit_size`` bytes or while the
disk refuses writes (full disk: logged once, retried with backoff, a partly written frame is cut
off so the file stays valid). Fluent Bit discards the oldest chunk at ``total_limit_size``;
kubetrail pauses the inputs instead, which is what "nothing lost" needs.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import struct
import zlib
from array import array
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from kubetrail.core.acks import AckToken
from kubetrail.core.metrics import ComponentMetrics
from kubetrail.core.record import Batch, Record

FILE_MAGIC = b"KTSEG\x00\x01\n"
FRAME_MAGIC = b"\xf0KTF"
FRAME_HEADER = struct.Struct("<4sII")  # magic, payload length, crc32 of the payload
CURSOR = struct.Struct("<QQI")  # segment, offset, crc32 of the first 16 bytes
HEADER_LEN = len(FILE_MAGIC)
MAX_FRAME = 512 * 1024 * 1024  # a length above this is garbage, not a frame
SEGMENT_SIZE = 8 * 1024 * 1024
MAX_PENDING = 8 * 1024 * 1024  # bytes accepted but not yet written: the write-ahead window
_SCAN_CHUNK = 1024 * 1024

Position = tuple[int, int]  # (segment number, byte offset in it)


class StorageError(Exception):
    """The buffer directory cannot be used (locked by another process, not writable)."""


# -- frame payloads -----------------------------------------------------------------------------


class _Payload(msgspec.Struct, array_like=True):
    version: int
    tag: str
    size: int
    times: bytes  # int64 little-endian, one per record
    block: bytes | None = None  # the batch's raw_block: one unchanged JSON document per line
    lines: list[bytes] | None = None  # otherwise one JSON document per record
    tags: list[str] | None = None  # per-record tags, only when one differs from the batch tag
    ids: list[Any] | None = None  # identities (tuples become lists)
    metas: list[Any] | None = None  # plain metadata; keys starting with "_" are in-process hooks
    # When every identity is (the same text, an int), as a tailed file's (uid, line offset): the
    # text once and the ints as an int64 array, instead of ``ids``: ~23 bytes less per record on
    # disk and no text object per record to decode on replay (~0.3 us each).
    id_prefix: str | None = None
    id_offsets: bytes | None = None


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(_Payload)


def encode_batch(batch: Batch) -> bytes:
    records = batch.records
    times = array("q", [r.time_ns for r in records])
    if times.itemsize != 8:  # pragma: no cover - every platform we run on has 8-byte long long
        raise RuntimeError("int64 array expected")
    tag = batch.tag
    payload = _Payload(1, tag, batch.size_bytes, times.tobytes())
    if batch.raw_block is not None:
        payload.block = batch.raw_block
    else:
        payload.lines = [r.json_bytes() for r in records]
    if any(r.tag != tag for r in records):
        payload.tags = [r.tag for r in records]
    ids = [r.identity for r in records]
    if any(identity is not None for identity in ids):
        shared = _shared_prefix(ids)
        if shared is None:
            payload.ids = ids
        else:
            payload.id_prefix = shared
            payload.id_offsets = array("q", [identity[1] for identity in ids]).tobytes()  # type: ignore[index]
    metas = [_plain_meta(r.meta) for r in records]
    if any(m is not None for m in metas):
        payload.metas = metas
    try:
        return _ENCODER.encode(payload)
    except (TypeError, msgspec.EncodeError):
        payload.metas = None  # metadata that is not plain data stays behind, the records do not
        return _ENCODER.encode(payload)


def _shared_prefix(ids: list[Any]) -> str | None:
    """The text every identity starts with when all are ``(text, int)``, else None."""
    first = ids[0]
    if type(first) is not tuple or len(first) != 2 or type(first[0]) is not str:
        return None
    prefix = first[0]
    for identity in ids:
        # type() checks, not isinstance: a bool is an int that would come back as 0/1.
        if (
            type(identity) is not tuple
            or len(identity) != 2
            or identity[0] != prefix
            or type(identity[1]) is not int
            or not -(2**63) <= identity[1] < 2**63
        ):
            return None
    return prefix


def _identities(payload: _Payload) -> list[tuple[Any, ...] | None] | None:
    if payload.id_offsets is not None:
        offsets = array("q")
        offsets.frombytes(payload.id_offsets)
        prefix = payload.id_prefix
        return [(prefix, offset) for offset in offsets]
    if payload.ids is not None:
        return [tuple(identity) if identity is not None else None for identity in payload.ids]
    return None


def _plain_meta(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    if not meta:
        return None
    plain = {k: v for k, v in meta.items() if not k.startswith("_")}
    return plain or None


def decode_batch(data: bytes, ack: AckToken | None = None) -> Batch:
    payload = _DECODER.decode(data)
    times = array("q")
    times.frombytes(payload.times)
    tag = payload.tag
    tags = payload.tags
    metas = payload.metas
    block = payload.block
    if block is not None:
        count = len(times)

        def materialize() -> list[Record]:
            lines = block.split(b"\n")
            ids = _identities(payload)
            return [
                Record(
                    tags[i] if tags else tag,
                    times[i],
                    None,
                    lines[i],
                    ids[i] if ids else None,
                    metas[i] if metas else None,
                )
                for i in range(count)
            ]

        return Batch(tag, None, ack, payload.size, raw_block=block, materialize=materialize, count=count)
    lines = payload.lines or []
    ids = _identities(payload)
    records = [
        Record(
            tags[i] if tags else tag,
            times[i],
            None,
            line,
            ids[i] if ids else None,
            metas[i] if metas else None,
        )
        for i, line in enumerate(lines)
    ]
    return Batch(tag, records, ack, payload.size)


def frame_bytes(payload: bytes) -> bytes:
    """A whole frame (header + payload); the writer itself uses writev instead of this copy."""
    return FRAME_HEADER.pack(FRAME_MAGIC, len(payload), zlib.crc32(payload)) + payload


# -- scanning a segment -------------------------------------------------------------------------


def _frame_at(handle: Any, offset: int, limit: int) -> bytes | None:
    """The payload of a valid frame at ``offset`` (ending at or before ``limit``), else None."""
    if offset + FRAME_HEADER.size > limit:
        return None
    handle.seek(offset)
    header = handle.read(FRAME_HEADER.size)
    if len(header) < FRAME_HEADER.size:
        return None
    magic, length, crc = FRAME_HEADER.unpack(header)
    if magic != FRAME_MAGIC or length > MAX_FRAME or offset + FRAME_HEADER.size + length > limit:
        return None
    payload: bytes = handle.read(length)
    if len(payload) != length or zlib.crc32(payload) != crc:
        return None
    return payload


def _resync(handle: Any, offset: int, limit: int) -> int | None:
    """The offset of the next valid frame after a bad one at ``offset``, or None."""
    position = offset + 1
    while position < limit:
        handle.seek(position)
        chunk = handle.read(min(_SCAN_CHUNK, limit - position) + len(FRAME_MAGIC) - 1)
        if not chunk:
            return None
        start = 0
        while True:
            found: int = chunk.find(FRAME_MAGIC, start)
            if found < 0:
                break
            candidate = position + found
            if _frame_at(handle, candidate, limit) is not None:
                return candidate
            start = found + 1
        position += _SCAN_CHUNK
    return None


@dataclass
class ReadResult:
    payload: bytes | None  # None: nothing valid at the position
    end: Position  # where reading continues
    skipped: int = 0  # bytes of corrupt data passed over
    bad_segment: bool = False


# -- the queue ----------------------------------------------------------------------------------


@dataclass
class _Pending:
    payload: bytes
    batch: Batch
    token: AckToken | None


@dataclass
class _Written:
    start: Position
    end: Position
    batch: Batch
    size: int


@dataclass
class _InFlight:
    end: Position
    size: int
    done: bool = False


@dataclass
class _Segment:
    seq: int
    size: int
    closed: bool = True


@dataclass
class _Active:
    seq: int
    fd: int
    size: int
    synced_dir: bool = field(default=False)


def _name(seq: int) -> str:
    return f"{seq:012d}.seg"


class DiskQueue:
    """One output's filesystem buffer. See the module docstring for the format and the rules."""

    def __init__(
        self,
        directory: Path,
        metrics: ComponentMetrics,
        logger: logging.Logger,
        *,
        sync: str = "normal",
        total_limit: int | None = None,
        mem_limit: int = 5 * 1024 * 1024,
        segment_size: int | None = None,
    ) -> None:
        self.directory = directory
        self.metrics = metrics
        self.log = logger
        self.full_sync = sync == "full"
        self.total_limit = total_limit
        self.mem_limit = max(1, mem_limit)
        if segment_size is None:
            segment_size = SEGMENT_SIZE
            if total_limit:  # space comes back a segment at a time: keep segments small against the limit
                segment_size = max(64 * 1024, min(SEGMENT_SIZE, total_limit // 8))
        self.segment_size = segment_size
        self.max_pending = MAX_PENDING
        self._lock_fd: int | None = None
        self._cursor_fd: int | None = None
        self._segments: dict[int, _Segment] = {}
        self._active: _Active | None = None
        self._end: Position = (0, HEADER_LEN)  # the end of what is written (loop's view)
        self._read: Position = (0, HEADER_LEN)  # the next frame to hand to the workers
        self._acked: Position = (0, HEADER_LEN)  # everything before it is delivered
        self._pending: list[_Pending] = []
        self._pending_bytes = 0
        self._writing_bytes = 0
        self._cache: deque[_Written] = deque()
        self._cache_bytes = 0
        self._in_flight: deque[_InFlight] = deque()
        self._up_bytes = 0
        self._disk_bytes = 0
        self._wake_writer = asyncio.Event()
        self._wake_reader = asyncio.Event()
        self._space = asyncio.Event()
        self._progress = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._reader_handle: Any = None
        self._reader_seq = -1
        self._write_failing = False
        self._closed = False
        self.m_corruption = metrics.counter(
            "kubetrail_buffer_corruption", "Damaged buffer data cut off or skipped, by kind", "kind"
        )
        self.m_corrupt_bytes = metrics.counter(
            "kubetrail_buffer_corrupt_bytes", "Bytes of damaged buffer data cut off or skipped, by kind", "kind"
        )
        self.m_disk_bytes = metrics.gauge("kubetrail_buffer_disk_bytes", "Bytes in an output's filesystem buffer")
        self.m_write_errors = metrics.counter(
            "kubetrail_buffer_write_errors", "Failed writes to the filesystem buffer, by errno", "errno"
        )

    # -- opening and recovery ------------------------------------------------------------------

    def open(self) -> None:
        """Lock the directory, recover what a previous run left, start a new segment."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot use buffer directory {self.directory}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StorageError(
                f"buffer directory {self.directory} is in use by another kubetrail process "
                "(two processes must not share storage.path)"
            ) from None
        try:
            self._recover()
        except OSError as exc:
            self.close()
            raise StorageError(f"cannot use buffer directory {self.directory}: {exc.strerror or exc}") from None

    def _recover(self) -> None:
        seqs = sorted(int(p.name[:-4]) for p in self.directory.glob("*.seg") if p.name[:-4].isdigit())
        cursor = self._read_cursor()
        for seq in seqs:
            path = self.directory / _name(seq)
            size = path.stat().st_size
            if cursor is not None and seq < cursor[0]:
                path.unlink()  # delivered before the crash; only the unlink was missing
                continue
            with path.open("rb") as handle:
                magic = handle.read(HEADER_LEN)
            if magic != FILE_MAGIC:
                if size == 0 or (len(magic) < HEADER_LEN and FILE_MAGIC.startswith(magic)):
                    path.unlink()  # created, header not yet written: nothing was ever acknowledged in it
                    continue
                self._bad_segment(path, size)
                continue
            self._segments[seq] = _Segment(seq, size)
        if self._segments:
            last = max(self._segments)
            self._segments[last].size = self._cut_torn_tail(last, self._segments[last].size)
        first = min(self._segments) if self._segments else None
        if cursor is not None and cursor[0] in self._segments and cursor[1] <= self._segments[cursor[0]].size:
            start = cursor
        elif first is not None:
            if cursor is not None and cursor[0] > first:
                self.log.warning("buffer cursor points past the segments; replaying from the oldest segment")
            start = (first, HEADER_LEN)
        else:
            start = (0, HEADER_LEN)
        seq = (max(self._segments) + 1) if self._segments else max(1, (cursor or (0, 0))[0] + 1)
        self._active = self._new_segment(seq)
        self._segments[seq] = _Segment(seq, HEADER_LEN, closed=False)
        self._end = (seq, HEADER_LEN)
        self._read = self._acked = self._normalize(start)
        self._cursor_fd = os.open(self.directory / "cursor", os.O_RDWR | os.O_CREAT, 0o644)
        self._write_cursor()
        self._disk_bytes = sum(s.size for s in self._segments.values())
        self.m_disk_bytes.set(self._disk_bytes)
        backlog = self._disk_bytes - HEADER_LEN
        if backlog > 0:
            self.log.info(
                "filesystem buffer has a backlog from a previous run; replaying",
                extra={"directory": str(self.directory), "bytes": backlog, "segments": len(self._segments) - 1},
            )

    def _read_cursor(self) -> Position | None:
        try:
            data = (self.directory / "cursor").read_bytes()
        except FileNotFoundError:
            return None
        if len(data) >= CURSOR.size:
            seq, offset, crc = CURSOR.unpack(data[: CURSOR.size])
            if zlib.crc32(data[:16]) == crc:
                return seq, offset
        self.log.warning(
            "buffer cursor is damaged; replaying every segment (some records may be delivered twice)",
            extra={"directory": str(self.directory)},
        )
        self.m_corruption.labels("bad_cursor").inc()
        return None

    def _bad_segment(self, path: Path, size: int) -> None:
        self.m_corruption.labels("bad_segment").inc()
        self.m_corrupt_bytes.labels("bad_segment").inc(size)
        self.log.error(
            "buffer segment has no valid header; set aside as .corrupt", extra={"path": str(path), "bytes": size}
        )
        path.rename(path.with_name(path.name + ".corrupt"))

    def _cut_torn_tail(self, seq: int, size: int) -> int:
        """Walk the newest segment; cut off anything after its last valid frame."""
        path = self.directory / _name(seq)
        with path.open("rb") as handle:
            offset = HEADER_LEN
            while offset < size:
                payload = _frame_at(handle, offset, size)
                if payload is not None:
                    offset += FRAME_HEADER.size + len(payload)
                    continue
                following = _resync(handle, offset, size)
                if following is None:
                    break  # nothing valid after it: a torn tail
                offset = following  # damage in the middle: the reader skips it and counts it
        if offset < size:
            with path.open("r+b") as handle:
                handle.truncate(offset)
                os.fsync(handle.fileno())
            self.m_corruption.labels("torn_tail").inc()
            self.m_corrupt_bytes.labels("torn_tail").inc(size - offset)
            self.log.warning(
                "filesystem buffer had a torn or corrupt tail (a crash during a write); cut off",
                extra={"path": str(path), "kept": offset, "cut": size - offset},
            )
        return offset

    def _new_segment(self, seq: int) -> _Active:
        path = self.directory / _name(seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, FILE_MAGIC)
            if self.full_sync:
                os.fdatasync(fd)
                dir_fd = os.open(self.directory, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)  # the new name must survive a power loss too
                finally:
                    os.close(dir_fd)
        except OSError:
            os.close(fd)
            try:
                path.unlink()
            except OSError:
                pass
            raise
        return _Active(seq, fd, HEADER_LEN)

    # -- positions -------------------------------------------------------------------------------

    def _normalize(self, position: Position) -> Position:
        """A position at the end of a closed segment is the start of the next one."""
        seq, offset = position
        while True:
            segment = self._segments.get(seq)
            if segment is None:
                later = [s for s in self._segments if s > seq]
                if not later:
                    return seq, offset
                seq, offset = min(later), HEADER_LEN
                continue
            if segment.closed and offset >= segment.size:
                later = [s for s in self._segments if s > seq]
                if not later:
                    return seq, offset
                seq, offset = min(later), HEADER_LEN
                continue
            return seq, offset

    @property
    def disk_bytes(self) -> int:
        """Bytes of segment files on disk (what storage.total_limit_size limits)."""
        return self._disk_bytes

    @property
    def empty(self) -> bool:
        """Nothing waiting to be written, handed out, or delivered."""
        return not self._pending and not self._writing_bytes and self._acked >= self._end

    # -- running -----------------------------------------------------------------------------------

    def start(self, deliver: Callable[[Batch], Awaitable[None]]) -> None:
        """Start the writer and the reader; ``deliver`` puts a batch into the output's queue."""
        self._tasks.append(asyncio.create_task(self._writer(), name=f"{self.directory.name}.writer"))
        self._tasks.append(asyncio.create_task(self._reader(deliver), name=f"{self.directory.name}.reader"))
        self._wake_reader.set()

    async def append(self, batch: Batch) -> None:
        """Queue ``batch`` for writing; its token (this output's reference) is released once the
        frame is durable. Waits while the buffer is at ``storage.total_limit_size`` or the disk
        refuses writes: that wait is the backpressure the input feels."""
        while self._must_wait():
            self._space.clear()
            await self._space.wait()
        payload = encode_batch(batch)
        self._pending.append(_Pending(payload, batch, batch.ack))
        self._pending_bytes += len(payload)
        self._wake_writer.set()

    def _must_wait(self) -> bool:
        if self._closed:
            return False
        queued = self._pending_bytes + self._writing_bytes
        if queued and (queued >= self.max_pending or self._write_failing):
            return True
        if self.total_limit is not None:
            # Undelivered bytes: segments before the cursor are gone, and the delivered head of
            # the segment the cursor is in goes at the next rotation.
            used = self._disk_bytes - self._acked[1] + queued
            # An empty buffer always takes one frame, however large.
            return used >= self.total_limit and (queued > 0 or self._acked < self._end)
        return False

    async def _writer(self) -> None:
        delay = 0.5
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            if not self._pending:
                continue
            group, self._pending = self._pending, []
            size = sum(len(p.payload) for p in group)
            self._pending_bytes -= size
            self._writing_bytes += size
            while True:
                try:
                    rotated, start_offset, ends = await asyncio.to_thread(self._write_group, [p.payload for p in group])
                except OSError as exc:
                    code = errno.errorcode.get(exc.errno or 0, "EIO")
                    self.m_write_errors.labels(code).inc()
                    if not self._write_failing:
                        self.log.error(
                            "cannot write to the filesystem buffer; inputs are paused until it works again",
                            extra={"directory": str(self.directory), "error": f"{code}: {exc.strerror or exc}"},
                        )
                        self._write_failing = True
                    await asyncio.sleep(delay)
                    delay = min(5.0, delay * 2)
                    continue
                break
            if self._write_failing:
                self.log.info("filesystem buffer writable again", extra={"directory": str(self.directory)})
                self._write_failing = False
                delay = 0.5
            self._writing_bytes -= size
            self._written(group, rotated, start_offset, ends)
            self._space.set()

    def _write_group(self, payloads: list[bytes]) -> tuple[_Segment | None, int, list[int]]:
        """In a thread: append the frames to the active segment (rotating first if it is full)."""
        active = self._active
        assert active is not None
        rotated: _Segment | None = None
        if active.size >= self.segment_size:
            fresh = self._new_segment(active.seq + 1)
            if self.full_sync:
                os.fdatasync(active.fd)
            os.close(active.fd)
            rotated = _Segment(active.seq, active.size)
            self._active = active = fresh
        start = active.size
        buffers: list[bytes] = []
        for payload in payloads:
            buffers.append(FRAME_HEADER.pack(FRAME_MAGIC, len(payload), zlib.crc32(payload)))
            buffers.append(payload)
        total = sum(len(b) for b in buffers)
        try:
            written = 0
            while written < total:
                written += _writev_from(active.fd, buffers, written)
            if self.full_sync:
                os.fdatasync(active.fd)
        except OSError:
            try:
                os.ftruncate(active.fd, start)  # the file must end at a frame boundary
            except OSError:
                pass
            raise
        ends: list[int] = []
        offset = start
        for payload in payloads:
            offset += FRAME_HEADER.size + len(payload)
            ends.append(offset)
        active.size = offset
        return rotated, start, ends

    def _written(self, group: list[_Pending], rotated: _Segment | None, start: int, ends: list[int]) -> None:
        active = self._active
        assert active is not None
        if rotated is not None:
            self._segments[rotated.seq] = rotated
            self._segments[active.seq] = _Segment(active.seq, HEADER_LEN, closed=False)
            self._disk_bytes += HEADER_LEN
            self._end = self._normalize(self._end)
            self._read = self._normalize(self._read)
            self._acked = self._normalize(self._acked)
            self._delete_delivered()
        segment = self._segments[active.seq]
        seq = active.seq
        offset = start
        for pending, end in zip(group, ends, strict=True):
            size = end - offset
            written = _Written((seq, offset), (seq, end), pending.batch, size)
            cache = self._cache
            # Kept in memory only if contiguous with what is cached (or the reader is exactly
            # here) and within the budget: the reader then never reads it back from disk.
            contiguous = cache[-1].end == written.start if cache else self._read == written.start
            if contiguous and (not cache or self._cache_bytes + size <= self.mem_limit):
                self._cache.append(written)
                self._cache_bytes += size
            offset = end
            if pending.token is not None:
                pending.token.release(True)
        segment.size = offset
        self._disk_bytes += offset - start
        self.m_disk_bytes.set(self._disk_bytes)
        self._end = (seq, offset)
        self._wake_reader.set()

    async def _reader(self, deliver: Callable[[Batch], Awaitable[None]]) -> None:
        while True:
            while self._read >= self._end or (self._up_bytes >= self.mem_limit and self._up_bytes > 0):
                self._wake_reader.clear()
                await self._wake_reader.wait()
            start = self._read
            cache = self._cache
            while cache and cache[0].start < start:  # passed over already (cannot happen, but never stale)
                self._cache_bytes -= cache.popleft().size
            if cache and cache[0].start == start:
                entry = cache.popleft()
                self._cache_bytes -= entry.size
                batch, end, size = entry.batch, entry.end, entry.size
            else:
                limit = self._segments[start[0]].size
                result = await asyncio.to_thread(self._read_at, start, limit)
                if result.payload is None:
                    self._skip(start, result)
                    continue
                end, size = result.end, result.end[1] - start[1]
                try:
                    batch = decode_batch(result.payload)
                except (msgspec.DecodeError, msgspec.ValidationError, ValueError, IndexError) as exc:
                    # A checksum-valid frame that does not decode: written by an incompatible version.
                    self.m_corruption.labels("undecodable").inc()
                    self.log.error("buffer frame cannot be decoded; skipped", extra={"error": str(exc)})
                    self._skip(start, ReadResult(None, end))
                    continue
                if result.skipped:
                    self._count_skip(start, result.skipped)
            entry_in_flight = _InFlight(end, size)
            self._in_flight.append(entry_in_flight)
            self._up_bytes += size
            self._read = self._normalize(end)
            # A token of its own: the one reference it starts with is the worker's delivery.
            token = AckToken(lambda _ok, e=entry_in_flight: self._delivered(e))  # type: ignore[misc]
            await deliver(_with_token(batch, token))

    def _read_at(self, start: Position, limit: int) -> ReadResult:
        """In a thread: the frame at ``start`` or, if it is damaged, the next valid one."""
        seq, offset = start
        if self._reader_seq != seq:
            if self._reader_handle is not None:
                self._reader_handle.close()
            self._reader_handle = open(self.directory / _name(seq), "rb")  # noqa: SIM115 - kept across reads
            self._reader_seq = seq
        handle = self._reader_handle
        payload = _frame_at(handle, offset, limit)
        if payload is not None:
            return ReadResult(payload, (seq, offset + FRAME_HEADER.size + len(payload)))
        following = _resync(handle, offset, limit)
        if following is None:
            return ReadResult(None, (seq, limit), limit - offset)
        payload = _frame_at(handle, following, limit)
        assert payload is not None
        return ReadResult(payload, (seq, following + FRAME_HEADER.size + len(payload)), following - offset)

    def _count_skip(self, start: Position, skipped: int) -> None:
        self.m_corruption.labels("corrupt_frame").inc()
        self.m_corrupt_bytes.labels("corrupt_frame").inc(skipped)
        self.log.error(
            "corrupt data in the filesystem buffer skipped (checksum mismatch)",
            extra={"segment": _name(start[0]), "offset": start[1], "bytes": skipped},
        )

    def _skip(self, start: Position, result: ReadResult) -> None:
        """Nothing deliverable from ``start`` to ``result.end``: count it and let the cursor pass."""
        if result.skipped:
            self._count_skip(start, result.skipped)
        entry = _InFlight(result.end, 0, done=True)
        self._in_flight.append(entry)
        self._read = self._normalize(result.end)
        self._advance()

    def _delivered(self, entry: _InFlight) -> None:
        entry.done = True
        self._up_bytes -= entry.size
        self._advance()
        self._wake_reader.set()

    def _advance(self) -> None:
        moved = False
        in_flight = self._in_flight
        while in_flight and in_flight[0].done:
            self._acked = in_flight.popleft().end
            moved = True
        if not moved:
            return
        self._acked = self._normalize(self._acked)
        self._write_cursor()
        self._delete_delivered()
        self._space.set()
        self._progress.set()

    def _write_cursor(self) -> None:
        if self._cursor_fd is None:
            return
        seq, offset = self._acked
        head = struct.pack("<QQ", seq, offset)
        try:
            os.pwrite(self._cursor_fd, head + struct.pack("<I", zlib.crc32(head)), 0)
        except OSError as exc:  # the worst case is replaying delivered frames
            self.log.warning("cannot write the buffer cursor", extra={"error": str(exc)})

    def _delete_delivered(self) -> None:
        acked_seq = self._acked[0]
        freed = 0
        for seq in sorted(self._segments):
            segment = self._segments[seq]
            if seq >= acked_seq or not segment.closed:
                break
            try:
                (self.directory / _name(seq)).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.log.warning("cannot delete a delivered buffer segment", extra={"seq": seq, "error": str(exc)})
                break
            if self._reader_seq == seq and self._reader_handle is not None:
                self._reader_handle.close()
                self._reader_handle = None
                self._reader_seq = -1
            freed += segment.size
            del self._segments[seq]
        if freed:
            self._disk_bytes -= freed
            self.m_disk_bytes.set(self._disk_bytes)
            self._space.set()

    async def drain(self) -> None:
        """Wait until every frame is written, handed out and delivered."""
        while not self.empty:
            self._progress.clear()
            self._wake_writer.set()
            try:
                await asyncio.wait_for(self._progress.wait(), 0.05)
            except TimeoutError:
                pass

    def close(self) -> None:
        """Stop the tasks and release the files; what is not delivered stays for the next start."""
        self._closed = True
        self._space.set()
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self._active is not None:
            os.close(self._active.fd)
            if self._acked >= self._end and not self._pending and not self._writing_bytes:
                try:  # everything in it is delivered: it is only clutter
                    (self.directory / _name(self._active.seq)).unlink()
                except OSError:
                    pass
            self._active = None
        for attr in ("_cursor_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                os.close(fd)
                setattr(self, attr, None)
        if self._reader_handle is not None:
            self._reader_handle.close()
            self._reader_handle = None


def _with_token(batch: Batch, token: AckToken) -> Batch:
    """The same records under another token (a cached batch may also be in other outputs' queues)."""
    if batch.raw_block is not None:
        return Batch(
            batch.tag,
            None,
            token,
            batch.size_bytes,
            batch.created,
            batch.raw_block,
            materialize=lambda: batch.records,
            count=len(batch),
        )
    return Batch(batch.tag, batch.records, token, batch.size_bytes, batch.created)


def _writev_from(fd: int, buffers: list[bytes], skip: int) -> int:
    """``os.writev`` of ``buffers`` starting ``skip`` bytes in (after a short write)."""
    if skip:
        views: list[bytes | memoryview] = []
        for buffer in buffers:
            if skip >= len(buffer):
                skip -= len(buffer)
                continue
            views.append(memoryview(buffer)[skip:] if skip else buffer)
            skip = 0
        return os.writev(fd, views[:1024])
    return os.writev(fd, buffers[:1024])
