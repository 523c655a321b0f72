"""Container runtime log lines (``multiline.parser cri, docker``): parse and join partial lines.

Both formats cut a long message into pieces and mark all but the last one:

* **CRI** (containerd, CRI-O): ``<RFC3339Nano time> <stdout|stderr> <P|F> <message>``; ``P``
  pieces are joined with the following ones up to the next ``F``;
* **docker** json-file: ``{"log": "...", "stream": "stdout", "time": "..."}``; a ``log`` not ending
  in ``\\n`` (a 16 KiB piece) is joined with the following ones until one does.

Pieces of stdout and stderr interleave in one file, so there is one pending message per stream.
Pieces are joined as bytes and decoded once, so a multibyte character the runtime cut in two
(it cuts at a byte count) comes out whole. The record is Fluent Bit's:
``{"time", "stream", "_p", "log"}`` for CRI, the docker document with the joined ``log`` for docker.

**Checkpoints with pending pieces.** A file offset alone cannot describe "everything up to here
is delivered, except the pieces of an unfinished stdout message that started earlier". The
joiner therefore reports, per stream, where its pending message started
(:meth:`ContainerLogJoiner.pending_starts`); the tail stores the smallest of those as the resume
offset and the end of the delivered lines as ``emitted``. After a restart, lines before
``emitted`` are read again only to rebuild the pending messages: a line there is kept only if its
stream had a pending message that started at or before it (:meth:`ContainerLogJoiner.replay`).
Nothing delivered is sent twice, and no piece is lost.

The hot loop is written for speed (one ``split`` per line, a one-entry cache for the whole-second
part of the time); it is most of what tail + cri costs per line.

**CRI as a block.** Where the native module has ``cri_join`` (``native/src/crilines.rs``),
:meth:`ContainerLogJoiner.process_block` does what :meth:`~ContainerLogJoiner.process` does for
a block of ``cri`` lines in one call: the fixed shape sliced, pieces joined per stream, and the
finished records written as the JSON lines orjson would write for them, with each one's time and
first piece's offset. The tail hands on a :class:`~kubetrail.core.block.ReadyBlock`, so a
``plain`` output writes those bytes and no ``Record`` exists unless a filter asks for records
(then each is built from its line, body decoded on first use). The state stays here: the pending
messages go into the call and come back out (at most one per stream), so checkpoints, the flush
timeout and :meth:`~ContainerLogJoiner.flush` are the same whichever path a block took. The
record path stays for what the block path does not take: a block mixing docker and CRI lines
(with ``docker, cri``, Fluent Bit's Helm chart default, a block of either format alone goes its
block way), the replay window after
a restart (rare, and exact by construction there), a ``key`` that is one of the record's own
fields, and an installation without the native module.

**docker as a block** (``docker_join``, ``native/src/dockerlines.rs``): the same for docker's
json-file lines of exactly docker's shape (``log``, ``stream``, ``time``; any other line sends
its block the record way), the pending messages carried across as for CRI, their document
rebuilt as ``{"stream", "time"}``: 500,000 messages 3.1 s -> 1.0 s.
"""

from __future__ import annotations

import calendar
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import orjson

from kubetrail.core.block import ReadyBlock
from kubetrail.core.record import Record
from kubetrail.parsers.timefmt import TimeParser

try:  # optional (built from native/): a block of CRI lines joined and written in one call
    from kubetrail_native import cri_join
except ImportError:  # pragma: no cover - depends on the installation (or an older build)
    cri_join = None
try:  # the same for docker json-file lines
    from kubetrail_native import docker_join
except ImportError:  # pragma: no cover - depends on the installation (or an older build)
    docker_join = None

FORMATS = ("cri", "docker")
_STREAMS = {b"stdout": "stdout", b"stderr": "stderr"}
_STREAM_NAMES = ("stdout", "stderr")  # cri_join's stream numbers
_CRI_FIELDS = ("time", "stream", "_p")  # a key among these changes the record's layout
_DOCKER_FIELDS = ("time", "stream")  # the same for docker's records
_DOCKER_DOC = ["stream", "time"]  # a pending docker message's document, as docker_join makes it
_SLOW_TIMES = TimeParser()


@dataclass
class JoinStats:
    """Counted per batch by the caller (metrics are per batch, never per line)."""

    bad_lines: int = 0  # neither CRI nor docker: passed on under ``log``
    bad_times: int = 0  # time unparsable: the record gets the read time
    bad_utf8: int = 0  # invalid UTF-8: decoded with U+FFFD replacements
    long_skipped: int = 0  # joined message over the limit, dropped (skip_long_lines)
    long_truncated: int = 0  # joined message over the limit, cut (truncate_long_lines)

    def any(self) -> bool:
        return bool(self.bad_lines or self.bad_times or self.bad_utf8 or self.long_skipped or self.long_truncated)


@dataclass
class _Pending:
    start: int  # file offset of the first piece's line
    time_text: str
    time_ns: int
    since: float  # monotonic time of the first piece, for the flush timeout
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    over: bool = False  # grew past the limit
    docker: dict[str, Any] | None = None  # the first piece's document (docker)


class ContainerLogJoiner:
    """Per-file state: the pending message of each stream, and the replay window after a restart."""

    def __init__(
        self, formats: tuple[str, ...], max_size: int, truncate: bool, key: str = "log", uid: str = ""
    ) -> None:
        self.cri = "cri" in formats
        self.uid = uid  # a record's identity is (uid, offset of its first piece): see sources/tail.py
        self.docker = "docker" in formats
        self.max_size = max_size
        self.truncate = truncate
        self.key = key
        self.pending: dict[str, _Pending] = {}
        self.replay_until = -1  # lines before this offset were delivered before a restart...
        self.replay_streams: dict[str, int] = {}  # ...except these streams' pieces from these offsets
        self._second_key = b""
        self._second_ns: int | None = None
        # cri_join's part of each record after "_p": `"key":"` as orjson writes the key.
        self._key_prefix = orjson.dumps({key: ""})[1:-2]
        # With both formats (Fluent Bit's Helm chart default, `docker, cri`) a block takes the
        # path of the format all its lines have: see process_block.
        self.cri_blocks = cri_join is not None and self.cri and key not in _CRI_FIELDS
        self.docker_blocks = docker_join is not None and self.docker and key not in _DOCKER_FIELDS
        self.blocks = self.cri_blocks or self.docker_blocks

    # -- checkpoint support ------------------------------------------------------------------

    def pending_starts(self) -> dict[str, int]:
        return {stream: p.start for stream, p in self.pending.items()}

    def replay(self, emitted: int, streams: dict[str, int]) -> None:
        self.replay_until = emitted
        self.replay_streams = dict(streams)

    def reset(self) -> None:
        """The file was truncated: nothing pending belongs to what comes next."""
        self.pending.clear()
        self.replay_until = -1
        self.replay_streams = {}

    # -- time --------------------------------------------------------------------------------

    def time_ns(self, text: bytes) -> int | None:
        """RFC 3339 (nanoseconds, ``Z`` or an offset) to epoch ns; ``None`` if it is not one."""
        head = text[:19]
        if head != self._second_key:
            try:
                parsed = time.strptime(head.decode("ascii"), "%Y-%m-%dT%H:%M:%S")
                self._second_ns = calendar.timegm(parsed) * 1_000_000_000
            except (ValueError, UnicodeDecodeError):
                self._second_ns = None
            self._second_key = head
        seconds = self._second_ns
        if seconds is None:
            return None
        rest = text[19:]
        if rest == b"Z":
            return seconds
        if rest[:1] == b"." and rest[-1:] == b"Z":
            digits = rest[1:-1]
            if digits.isdigit():
                return seconds + int((digits + b"000000000")[:9])
            return None
        try:  # an offset instead of Z: rare, take the slow exact path
            return _SLOW_TIMES.parse_ns(text.decode("ascii"))
        except (ValueError, UnicodeDecodeError, TypeError):
            return None

    # -- joining -----------------------------------------------------------------------------

    def process(self, lines: list[bytes], start: int, tag: str, stats: JoinStats) -> list[Record]:
        """Lines (without newlines) that begin at file offset ``start`` -> finished records."""
        records: list[Record] = []
        append = records.append
        pending = self.pending
        replaying = self.replay_until > start
        now = 0
        position = start
        time_ns = self.time_ns
        key = self.key
        uid = self.uid
        for line in lines:
            line_start = position
            position += len(line) + 1
            if not line:
                continue
            if line[0] == 123 and self.docker:  # '{'
                self._docker_line(line, line_start, tag, stats, records, replaying)
                continue
            parts = line.split(b" ", 3)
            if len(parts) == 4:
                stamp, stream_b, flag, message = parts
            elif len(parts) == 3:  # an empty message: "<time> stdout F"
                stamp, stream_b, flag = parts
                message = b""
            else:
                stamp = stream_b = flag = message = b""
            stream = _STREAMS.get(stream_b)
            if stream is None or not self.cri or (flag != b"F" and flag != b"P"):
                if replaying and line_start < self.replay_until:
                    continue
                stats.bad_lines += 1
                now = now or time.time_ns()
                append(Record(tag, now, {key: _text(line, stats)}, None, (uid, line_start)))
                continue
            if replaying and line_start < self.replay_until:
                since = self.replay_streams.get(stream)
                if since is None or line_start < since:
                    continue  # delivered before the restart
            if flag == b"F" and stream not in pending:
                ns = time_ns(stamp)
                if ns is None:
                    stats.bad_times += 1
                    ns = now = now or time.time_ns()
                if len(message) > self.max_size:
                    if not self.truncate:
                        stats.long_skipped += 1
                        continue
                    stats.long_truncated += 1
                    message = _cut(message, self.max_size)
                try:
                    text = message.decode()
                except UnicodeDecodeError:
                    stats.bad_utf8 += 1
                    text = message.decode("utf-8", "replace")
                body = {"time": stamp.decode("ascii", "replace"), "stream": stream, "_p": "F", key: text}
                append(Record(tag, ns, body, None, (uid, line_start)))
                continue
            entry = pending.get(stream)
            if entry is None:
                ns = time_ns(stamp)
                if ns is None:
                    stats.bad_times += 1
                    ns = now = now or time.time_ns()
                entry = pending[stream] = _Pending(line_start, stamp.decode("ascii", "replace"), ns, time.monotonic())
            self._add(entry, message)
            if flag == b"F":
                del pending[stream]
                record = self._finish(entry, stream, tag, stats)
                if record is not None:
                    append(record)
        if replaying and position >= self.replay_until:
            self.replay_until = -1
        return records

    def process_block(self, block: bytes, start: int, tag: str, stats: JoinStats) -> ReadyBlock | None:
        """:meth:`process` of a block of whole lines (newline-terminated) that begins at file
        offset ``start``, as a block of the finished records' JSON lines; None where only the
        record path applies (see the module docstring)."""
        if not self.blocks or self.replay_until > start:
            return None
        pending = self.pending
        if self.docker and block[:1] == b"{":
            # docker documents (a CRI line starts with its time): docker_join takes the block if
            # every line is one, else the record path decides line by line
            if not self.docker_blocks or any(
                stream not in _STREAM_NAMES
                or p.docker != {"stream": stream, "time": p.time_text}
                or list(p.docker) != _DOCKER_DOC
                for stream, p in pending.items()
            ):
                return None
            assert docker_join is not None
            join: Any = docker_join
            fixed: tuple[Any, ...] = (self._key_prefix, self.key == "log")
            declines: tuple[bool, ...] = ()
        else:  # with docker too, cri_join declines a block with a docker document in it
            if not self.cri_blocks or any(p.docker is not None for p in pending.values()):
                return None
            assert cri_join is not None
            join, fixed, declines = cri_join, (self._key_prefix,), (self.docker,)
        given = [
            (_STREAM_NAMES.index(stream), p.start, p.time_text, p.time_ns, b"".join(p.parts), p.size, p.over)
            for stream, p in pending.items()
        ]
        try:
            joined = join(
                block, start, *fixed, self.max_size, self.truncate, time.time_ns(), given, self.time_ns, *declines
            )
        except OverflowError:  # a time beyond int64 ns (year 2262 on): Python's int holds it
            return None
        if joined is None:  # a line of the other format: the record path decides each line
            return None
        data, time_bytes, offset_bytes, count, left, counts = joined
        previous = dict(pending)
        pending.clear()
        for index, first, time_text, time_ns, text, size, over in left:
            stream = _STREAM_NAMES[index]
            old = previous.get(stream)
            # The same first piece is the same message: it keeps its age for the flush timeout.
            since = old.since if old is not None and old.start == first else time.monotonic()
            entry = pending[stream] = _Pending(first, time_text, time_ns, since, [text], size, over)
            if join is docker_join:  # the first piece's document without its log, as _docker_line keeps it
                entry.docker = {"stream": stream, "time": time_text}
        stats.bad_lines += counts[0]
        stats.bad_times += counts[1]
        stats.bad_utf8 += counts[2]
        stats.long_skipped += counts[3]
        stats.long_truncated += counts[4]
        times, offsets = array("q"), array("q")
        times.frombytes(time_bytes)
        offsets.frombytes(offset_bytes)
        uid = self.uid

        def build() -> list[Record]:
            lines = data.split(b"\n")  # one more than the records: the b"" after the last newline
            return [Record(tag, ns, None, line, (uid, at)) for line, ns, at in zip(lines, times, offsets, strict=False)]

        ready = ReadyBlock(data, count, build)
        ready.times = times
        ready.canonical = True  # the lines orjson writes for these records (tests compare them)
        return ready

    def _add(self, entry: _Pending, piece: bytes) -> None:
        if entry.over:
            return
        entry.size += len(piece)
        if entry.size > self.max_size:
            entry.over = True
            if self.truncate:
                keep = len(piece) - (entry.size - self.max_size)
                entry.parts.append(_cut(piece, keep))
            return
        entry.parts.append(piece)

    def _finish(self, entry: _Pending, stream: str, tag: str, stats: JoinStats) -> Record | None:
        if entry.over:
            if not self.truncate:
                stats.long_skipped += 1
                return None
            stats.long_truncated += 1
        text = _text(b"".join(entry.parts), stats)
        identity = (self.uid, entry.start)
        if entry.docker is not None:
            body = entry.docker
            body[self.key] = text
            return Record(tag, entry.time_ns, body, None, identity)
        body = {"time": entry.time_text, "stream": stream, "_p": "F", self.key: text}
        return Record(tag, entry.time_ns, body, None, identity)

    def _docker_line(
        self, line: bytes, line_start: int, tag: str, stats: JoinStats, records: list[Record], replaying: bool
    ) -> None:
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            doc = None
        log = doc.get("log") if isinstance(doc, dict) else None
        if not isinstance(log, str):
            if replaying and line_start < self.replay_until:
                return
            stats.bad_lines += 1
            records.append(Record(tag, time.time_ns(), {self.key: _text(line, stats)}, None, (self.uid, line_start)))
            return
        assert isinstance(doc, dict)
        stream_value = doc.get("stream")
        stream: str = stream_value if isinstance(stream_value, str) else "stdout"
        if replaying and line_start < self.replay_until:
            since = self.replay_streams.get(stream)
            if since is None or line_start < since:
                return
        complete = log.endswith("\n")
        entry = self.pending.get(stream)
        if complete and entry is None:
            ns = self._docker_time(doc, stats)
            # The limit is in bytes, as for every other line; a str has at most 4 per character.
            if len(log) * 4 > self.max_size and len(encoded := log.encode()) > self.max_size:
                if not self.truncate:
                    stats.long_skipped += 1
                    return
                stats.long_truncated += 1
                doc["log"] = _cut(encoded, self.max_size).decode()
            if self.key != "log":
                doc[self.key] = doc.pop("log")
            records.append(Record(tag, ns, doc, None, (self.uid, line_start)))
            return
        if entry is None:
            ns = self._docker_time(doc, stats)
            entry = self.pending[stream] = _Pending(line_start, str(doc.get("time", "")), ns, time.monotonic())
            doc.pop("log", None)
            entry.docker = doc
        self._add(entry, log.encode())
        if complete:
            del self.pending[stream]
            record = self._finish(entry, stream, tag, stats)
            if record is not None:
                records.append(record)

    def _docker_time(self, doc: dict[str, Any], stats: JoinStats) -> int:
        value = doc.get("time")
        ns = self.time_ns(value.encode()) if isinstance(value, str) else None
        if ns is None:
            stats.bad_times += 1
            return time.time_ns()
        return ns

    def flush(self, older_than: float, tag: str, stats: JoinStats) -> list[Record]:
        """Pending messages whose first piece is older than ``older_than`` (monotonic), as records:
        the ``F`` piece may never come (the container died mid-line)."""
        records: list[Record] = []
        for stream in [s for s, p in self.pending.items() if p.since <= older_than]:
            entry = self.pending.pop(stream)
            record = self._finish(entry, stream, tag, stats)
            if record is not None:
                if entry.docker is None:
                    record.body["_p"] = "P"  # Fluent Bit's marker for a message that never finished
                records.append(record)
        return records


def _cut(data: bytes, limit: int) -> bytes:
    """The first ``limit`` bytes of UTF-8 text, less a character the cut would split: a
    truncation of ours must not look like invalid input."""
    if limit >= len(data):
        return data
    end = limit
    # data[end] is the first byte left out: while it continues a character begun before it, move
    # the cut back to that character's first byte (at most 3 continuation bytes in UTF-8).
    while end > 0 and limit - end < 3 and data[end] & 0xC0 == 0x80:
        end -= 1
    return data[:end]


def _text(data: bytes, stats: JoinStats) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        stats.bad_utf8 += 1
        return data.decode("utf-8", "replace")
