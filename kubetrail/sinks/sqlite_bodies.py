"""The ``sqlite`` output's bodies compressed with a dictionary the store trains on its own records
(``compress zstd``, the default; store schema 8).

Why: a stored audit event is ~900 bytes of JSON of which most is the same keys, the same user
agents, the same API paths as in every other one. Compressed alone, a record shrinks by half;
with a zstd dictionary trained on the store's records it shrinks ~10x (886 -> ~90 bytes for the
bench's events; 1,158 -> 186 on a RequestResponse audit log of the tests' real control plane). What a
record costs the writer is mostly bytes: each one is written twice (the WAL, then the checkpoint
into the file), and the kernel's time for that decided whether the sink made 78,000 or 94,000
records/s (docs/benchmarks.md, "Schema 7"); smaller cells also make the B-trees cheaper. So the
store is 3x smaller on disk (389 against 1,201 MiB per million of the bench's audit events) and
the writer faster (docs/benchmarks.md, "Schema 8"), for ~1 us
of compression a record, done natively by the thread that decodes the blocks, beside the one
running SQLite, and ~1 us to decompress on reading (a ``history`` answer of 1,000 records: 1 ms).

Format: a body is either the record's JSON as it came (it starts with ``{``; or empty: a row
whose body is in ``user_bodies``) or exactly one zstd frame (starting with :data:`ZSTD_MAGIC`)
made with one of the store's dictionaries, whose ID the frame names in its header, with its
content size and without a checksum (SQLite's pages carry none either). The dictionaries are rows
of :data:`DICTIONARIES` keyed by that ID, never deleted (~110 KiB each): any body stays readable
whichever dictionary made it, and a body stored as it came (before compression, or with
``compress off``) is read as it is. The native writer (``native/src/storerows.rs``, ``use_dictionary``) and the
Python one (:class:`BodyCompressor`, the ``zstandard`` wheel) make the same frames.

When: a store starts without a dictionary; once it holds :data:`TRAIN_AFTER_ROWS` records, the
writer trains one (0.2 s, between two commits) on up to :data:`TRAIN_SAMPLES` bodies spread over
the newest :data:`TRAIN_SPAN` records (a burst of one kind of request does not make the whole
dictionary), and compresses every body it writes from then on. The bodies stored before (the
store's first records, or a whole store written by a version before compression) are compressed
in the background (:class:`OldBodies`): a thousand after a commit, at most once a second, newest
first, so that a store upgraded in place shrinks without a pause; each row is deleted and
written again, so that SQLite merges the pages it leaves underfull and frees them for new
records (an UPDATE would leave every page in use; docs/benchmarks.md, "Old bodies").

Each dictionary keeps the ratio it gave on a tenth of the samples it was not trained on, its
yardstick. Records change (a cluster upgraded, new resources, another audit policy) and a
dictionary of another mix compresses less: the writer watches the ratio over each
:data:`RATIO_WINDOW_BYTES` of bodies (:class:`RatioWatch`), and when a window's is
:data:`RETRAIN_FACTOR` times the yardstick it trains a new dictionary on the newest records, at
most once per :data:`RETRAIN_INTERVAL` (records that are merely varied do not make one every
window). A writer that opens a store whose dictionary fits its records badly
(another cluster's store, say) trains at its first window.

The price: a body in the file is not JSON any more for someone reading it with the ``sqlite3``
shell (the ``whole_records`` view's ``body``; every column beside it is as before): ``kubetrail
search --json`` prints the records, and ``compress off`` keeps bodies as they came.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import zstandard

# Every zstd frame starts so (RFC 8878); a JSON body starts with "{", so the two never meet.
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LEVEL = 3  # on audit events here: 1.2 us a record natively (1.0 at level 1), 2-3% smaller than 1-2
DICTIONARY_SIZE = 112_640  # zstd's own default size, 110 KiB
TRAIN_AFTER_ROWS = 10_000  # a store trains its dictionary once it holds this many records
TRAIN_SAMPLES = 10_000  # the bodies it trains on (0.2 s here)
TRAIN_SPAN = 100_000  # spread over the newest this many records (every 10th of them)
TRAIN_MAX_BYTES = 32 * 2**20  # and at most this many bytes of them
RATIO_WINDOW_BYTES = 64 * 2**20  # of bodies before compression (~75,000 audit events)
RETRAIN_FACTOR = 2.0  # a window's ratio this many times the yardstick's: a new dictionary
RETRAIN_INTERVAL = 3600.0  # seconds: at most one new dictionary per writer in this time
OLD_BODIES_ROWS = 1_000  # old bodies compressed after a commit (~80 ms here, SQLite's B-trees) ...
OLD_BODIES_INTERVAL = 1.0  # ... at most once in this many seconds: 1M old bodies in ~17 minutes
# Dictionary IDs 0-32767 are zstd's "reserved for a public registry": ours start above.
DICTIONARY_ID_BASE = 32_768

DICTIONARIES = """
CREATE TABLE IF NOT EXISTS dictionaries (
    id INTEGER PRIMARY KEY,
    created_ns INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    ratio REAL NOT NULL,
    dictionary BLOB NOT NULL
);"""


class BodyError(Exception):
    """A compressed body that cannot be read back (its dictionary missing, a damaged frame)."""


def is_compressed(body: bytes) -> bool:
    return body[:4] == ZSTD_MAGIC


class BodyCompressor:
    """Compresses bodies with one of the store's dictionaries, as the native writer does. Not
    thread-safe (the store's writer uses it under its write lock)."""

    def __init__(self, dictionary_id: int, dictionary: bytes, ratio: float, level: int = LEVEL) -> None:
        self.dictionary_id = dictionary_id
        self.dictionary = dictionary
        self.ratio = ratio  # compressed / plain bytes on samples it was not trained on
        self.level = level
        self.plain_bytes = 0  # the bodies compressed so far, before and after
        self.stored_bytes = 0
        data = zstandard.ZstdCompressionDict(dictionary)
        self._compressor = zstandard.ZstdCompressor(
            level=level, dict_data=data, write_checksum=False, write_content_size=True, write_dict_id=True
        )

    def compress(self, body: bytes) -> bytes:
        if not body:
            return body
        stored = self._compressor.compress(body)
        self.plain_bytes += len(body)
        self.stored_bytes += len(stored)
        return stored

    def compress_old(self, body: bytes) -> bytes:
        """A body stored before: not counted (the ratio watch judges the records coming in)."""
        return self._compressor.compress(body)


class RatioWatch:
    """Whether bodies compress much worse than the dictionary did on its held-out samples
    (``yardstick``). Fed the running totals of bytes before and after compression; judges once
    a window's worth came, and not before ``not_before`` (``time.monotonic()``)."""

    def __init__(self, yardstick: float, plain: int = 0, stored: int = 0, not_before: float = 0.0) -> None:
        self.yardstick = yardstick
        self.not_before = not_before
        self._start = (plain, stored)  # the totals when the current window began
        self.last_ratio: float | None = None  # the last whole window's

    def worse(self, plain: int, stored: int) -> bool:
        window_plain, window_stored = plain - self._start[0], stored - self._start[1]
        if window_plain < RATIO_WINDOW_BYTES:
            return False
        self._start = (plain, stored)
        self.last_ratio = window_stored / window_plain
        return self.last_ratio > RETRAIN_FACTOR * self.yardstick and time.monotonic() >= self.not_before


def needs_compressing(body: bytes) -> bool:
    return bool(body) and not is_compressed(body)


class OldBodies:
    """Which of a store's bodies stored as they came to compress next, in the background (see the
    module doc); the store's writer rewrites them (it knows the tables).

    Which: the writer compresses every body once the store has a dictionary, so its plain bodies
    are its oldest: those below a boundary id, found by bisection (~25 probes for 10M records)
    when the writer opens the store. Going down from there, newest first, keeps that true after
    every step, so a restart finds where it stopped without keeping any state. Bodies written
    while ``compress off`` was set, above the boundary, stay as they are: a user who chose that.
    ``body_sql``: the SQL of a ``records`` row ``r``'s body.
    """

    def __init__(self, body_sql: str) -> None:
        self.body_sql = body_sql
        self.below: int | None = None  # every body from this id up is compressed; None: not found yet
        self.done = False
        self.compressed = 0  # bodies compressed so far
        self._next = 0.0

    def due(self) -> bool:
        """Whether a step is due now (at most one per :data:`OLD_BODIES_INTERVAL`)."""
        now = time.monotonic()
        if self.done or now < self._next:
            return False
        self._next = now + OLD_BODIES_INTERVAL
        return True

    def chunk(self, conn: sqlite3.Connection) -> list[tuple[int, str | None, int, str, str | None, bytes]]:
        """The next :data:`OLD_BODIES_ROWS` rows down, newest first: ``(id, user, time_ns, kind,
        verb, body)``, the body as stored (some may be compressed already: a replay's)."""
        if self.below is None:
            self.below = self._boundary(conn)
        sql = f"SELECT r.id, r.user, r.time_ns, r.kind, r.verb, {self.body_sql} FROM records r WHERE r.id < ?"
        return conn.execute(f"{sql} ORDER BY r.id DESC LIMIT ?", (self.below, OLD_BODIES_ROWS)).fetchall()

    def advance(self, rows: list[tuple[int, str | None, int, str, str | None, bytes]], compressed: int) -> None:
        """``rows`` (a :meth:`chunk`) are written, ``compressed`` of them compressed."""
        if rows:
            self.below = rows[-1][0]
        self.done = len(rows) < OLD_BODIES_ROWS
        self.compressed += compressed

    def _first_from(self, conn: sqlite3.Connection, at: int) -> tuple[int, bytes] | None:
        sql = f"SELECT r.id, {self.body_sql} FROM records r WHERE r.id >= ? ORDER BY r.id LIMIT 1"
        row = conn.execute(sql, (at,)).fetchone()
        return (row[0], row[1] or b"") if row else None

    def _boundary(self, conn: sqlite3.Connection) -> int:
        """The lowest id from which every body is compressed (or empty)."""
        low, high = conn.execute("SELECT coalesce(min(id), 0), coalesce(max(id), 0) + 1 FROM records").fetchone()
        while low < high:
            middle = (low + high) // 2
            first = self._first_from(conn, middle)
            if first is None or not needs_compressing(first[1]):
                high = middle
            else:
                low = first[0] + 1
        return int(low)


def newest_dictionary(conn: sqlite3.Connection) -> BodyCompressor | None:
    """A compressor with the store's newest dictionary; None for a store without one."""
    if not _has_dictionaries(conn):
        return None
    row = conn.execute("SELECT id, dictionary, ratio FROM dictionaries ORDER BY id DESC LIMIT 1").fetchone()
    return BodyCompressor(row[0], row[1], row[2]) if row else None


def train_dictionary(conn: sqlite3.Connection, body_sql: str, path: object = None) -> BodyCompressor:
    """Train a dictionary on bodies (as they came) spread over the store's newest records, and
    add it with its ratio on every 10th of them, held out (``conn`` is the writer's, outside a
    transaction; ``body_sql``: the SQL of a ``records`` row ``r``'s body). Raises
    ``zstandard.ZstdError`` when the samples cannot make one (too few, too alike)."""
    reader = BodyReader(conn, path)
    newest = conn.execute("SELECT max(id) FROM records").fetchone()[0] or 0
    stride = min(TRAIN_SPAN // TRAIN_SAMPLES, max(1, newest // TRAIN_SAMPLES))
    samples: list[bytes] = []
    held_out: list[bytes] = []
    size = 0
    sql = f"SELECT {body_sql} FROM records r WHERE r.id % ? = 0 ORDER BY r.id DESC LIMIT ?"
    for n, (body,) in enumerate(conn.execute(sql, (stride, TRAIN_SAMPLES))):
        if body:
            body = reader.plain(body)
            if n % 10 == 9:
                held_out.append(body)
            else:
                samples.append(body)
            size += len(body)
            if size >= TRAIN_MAX_BYTES:
                break
    row = conn.execute("SELECT max(id) FROM dictionaries").fetchone()
    dictionary_id = max(DICTIONARY_ID_BASE, (row[0] or 0) + 1)
    training: list[bytes | bytearray | memoryview] = [*samples]
    trained = zstandard.train_dictionary(DICTIONARY_SIZE, training, dict_id=dictionary_id, level=LEVEL)
    data = trained.as_bytes()
    probe = BodyCompressor(dictionary_id, data, 0.0)
    for body in held_out or samples[:1000]:
        probe.compress(body)
    ratio = probe.stored_bytes / max(1, probe.plain_bytes)
    conn.execute(
        "INSERT INTO dictionaries (id, created_ns, samples, ratio, dictionary) VALUES (?, ?, ?, ?, ?)",
        (dictionary_id, time.time_ns(), len(samples), ratio, data),
    )
    return BodyCompressor(dictionary_id, data, ratio)


def _has_dictionaries(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dictionaries'").fetchone()
    return row is not None


class BodyReader:
    """Gives stored bodies back as they came: a compressed one decompressed with the dictionary
    its frame names, read from the store on first need (``conn``: a connection to it; a writer
    may add a dictionary after this reader opened). Thread-safe: the history backend's body
    readers call it from their pool."""

    def __init__(self, conn: sqlite3.Connection, path: object) -> None:
        self.conn = conn
        self.path = path
        self._dictionaries: dict[int, zstandard.ZstdCompressionDict] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # a decompressor per dictionary, per thread

    def plain(self, body: bytes) -> bytes:
        if not is_compressed(body):
            return body
        try:
            dictionary_id = zstandard.get_frame_parameters(body).dict_id
            decompressors: dict[int, zstandard.ZstdDecompressor] = self._local.__dict__.setdefault("by_id", {})
            decompressor = decompressors.get(dictionary_id)
            if decompressor is None:
                decompressor = zstandard.ZstdDecompressor(dict_data=self._dictionary(dictionary_id))
                decompressors[dictionary_id] = decompressor
            return decompressor.decompress(body)
        except zstandard.ZstdError as exc:
            raise BodyError(f"store {self.path}: a compressed record cannot be read: {exc}") from None

    def _dictionary(self, dictionary_id: int) -> zstandard.ZstdCompressionDict:
        with self._lock:
            found = self._dictionaries.get(dictionary_id)
            if found is None:
                row = None
                if _has_dictionaries(self.conn):
                    sql = "SELECT dictionary FROM dictionaries WHERE id = ?"
                    row = self.conn.execute(sql, (dictionary_id,)).fetchone()
                if row is None:
                    raise BodyError(
                        f"store {self.path}: a record was compressed with dictionary {dictionary_id},"
                        " which the store does not hold (the file is damaged)"
                    )
                found = zstandard.ZstdCompressionDict(row[0])
                self._dictionaries[dictionary_id] = found
            return found
