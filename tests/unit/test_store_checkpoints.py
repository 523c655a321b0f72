"""The store's WAL checkpoints run on a connection and a thread of their own, beside the
writer (``_Checkpointer`` in kubetrail/sinks/sqlite.py): the writer's connections never
checkpoint, the WAL is held to its limit (the writer waits for a checkpoint once it is over),
a reader holding an old snapshot delays the writer by a bounded wait only, and nothing
committed is lost. Real SQLite files throughout, through the native writer and the Python one."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from kubetrail.sinks import sqlite as sqlite_module
from kubetrail.sinks.sqlite import StoreWriter, native_rows
from tests.unit.test_store import _audit_line, needs_native

TAG = "kube.audit"


def _block(start: int, count: int) -> bytes:
    return b"".join(_audit_line(n) + b"\n" for n in range(start, start + count))


def _write(writer: StoreWriter, start: int, count: int, native: bool) -> None:
    block = _block(start, count)
    if native:
        assert writer.write_blocks([(TAG, block)]) == count
    else:
        rows = native_rows(TAG, block)
        assert rows is not None
        assert writer.write(rows) == count


def _wal_size(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return wal.stat().st_size if wal.exists() else 0


def _count(path: Path) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT count(*) FROM records").fetchone()[0])


PATHS = [pytest.param(True, marks=needs_native, id="native"), pytest.param(False, id="python")]


@pytest.mark.parametrize("native", PATHS)
def test_the_writer_never_checkpoints_the_thread_does(tmp_path: Path, native: bool) -> None:
    path = tmp_path / "s.db"
    writer = StoreWriter(path, native=native)
    writer.open()
    try:
        assert (writer.native is not None) == native
        assert writer.checkpointer is not None
        # The writer's connections leave the WAL alone (SQLite's own default is 1000 pages).
        assert writer.conn is not None
        assert writer.conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        writer.checkpointer.close()  # no checkpoints from here on: whatever is copied, a writer did
        writer.checkpointer = None
        size = path.stat().st_size
        for n in range(12):  # ~15 MB of pages: SQLite's autocheckpoint would have run
            _write(writer, n * 1000, 1000, native)
        assert path.stat().st_size == size  # nothing copied into the database file
        assert _wal_size(path) > 12 * 1000 * 900  # every commit's pages still in the WAL
        assert writer.conn.execute("SELECT count(*) FROM records").fetchone() == (12_000,)  # read from the WAL
    finally:
        writer.close()
    assert not Path(f"{path}-wal").exists()  # the last close checkpointed the rest
    assert _count(path) == 12_000


@pytest.mark.parametrize("native", PATHS)
def test_checkpoints_copy_the_wal_beside_the_writer(
    tmp_path: Path, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_INTERVAL", 0.01)
    path = tmp_path / "s.db"
    writer = StoreWriter(path, native=native)
    writer.open()
    try:
        size = path.stat().st_size
        _write(writer, 0, 2000, native)
        assert writer.checkpointer is not None
        deadline = time.monotonic() + 10
        while writer.checkpointer.checkpoints == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert writer.checkpointer.checkpoints >= 1
        assert path.stat().st_size > size + 1_000_000  # the rows' pages are in the file now (~750 bytes each)
        with sqlite3.connect(path) as other:  # and the WAL holds nothing the file lacks
            busy, frames, copied = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0 and frames == copied
    finally:
        writer.close()
    assert _count(path) == 2000


@pytest.mark.parametrize("native", PATHS)
def test_the_wal_is_held_to_its_limit(tmp_path: Path, native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # A limit of 8 pages (512 KiB): each commit is over it, so the writer waits for a checkpoint
    # before each transaction and the WAL starts anew each time. Checkpoints every 10 s at most
    # otherwise: without the writer's wait the WAL would hold every commit.
    monkeypatch.setattr(sqlite_module, "WAL_LIMIT_BYTES", 8 * 65536)
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_INTERVAL", 10.0)
    path = tmp_path / "s.db"
    writer = StoreWriter(path, native=native)
    writer.open()
    try:
        assert writer.conn is not None
        started = time.monotonic()
        written = 0  # what the WAL would hold if never started anew: each commit's pages
        for n in range(20):
            frames_before = writer.conn.execute("PRAGMA page_count").fetchall()[0][0]
            _write(writer, n * 1000, 1000, native)
            written += writer.conn.execute("PRAGMA page_count").fetchall()[0][0] - frames_before
        elapsed = time.monotonic() - started
        ((pages,),) = writer.conn.execute("PRAGMA page_count").fetchall()
        # These rows (five users, times all over a minute) dirty most pages at each commit, so
        # one commit's WAL is about the whole file: it is held to that, not to the sum.
        frame = 65536 + 24
        assert _wal_size(path) <= 32 + (pages + 8) * frame
        assert written * frame < _wal_size(path) * 2  # (the pages added alone)
        assert elapsed < 10  # the writer's waits asked for checkpoints at once, not after the interval
        assert writer.conn.execute("SELECT count(*) FROM records").fetchone() == (20_000,)
    finally:
        writer.close()
    assert _count(path) == 20_000


@pytest.mark.parametrize("native", PATHS)
def test_a_reader_holding_a_snapshot_delays_the_writer_only_so_long(
    tmp_path: Path, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "WAL_LIMIT_BYTES", 8 * 65536)
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_WAIT", 0.2)
    path = tmp_path / "s.db"
    writer = StoreWriter(path, native=native)
    writer.open()
    reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        _write(writer, 0, 1000, native)
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM records").fetchone() == (1000,)  # its snapshot
        started = time.monotonic()
        for n in range(1, 6):  # no checkpoint can pass the reader: each write waits 0.2 s, then goes on
            _write(writer, n * 1000, 1000, native)
        assert time.monotonic() - started < 5
        assert reader.execute("SELECT count(*) FROM records").fetchone() == (1000,)  # still its snapshot
        grown = _wal_size(path)
        reader.execute("COMMIT")
        for n in range(6, 9):  # the reader gone: checkpoints finish, the WAL is reused from its start
            _write(writer, n * 1000, 1000, native)
        assert _wal_size(path) == grown  # not grown further
        assert _count(path) == 9000
    finally:
        reader.close()
        writer.close()
    assert _count(path) == 9000


def test_a_checkpoint_error_is_said_and_the_records_stay(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.db"
    writer = StoreWriter(path, native=False)
    writer.open()
    try:
        checkpointer = writer.checkpointer
        assert checkpointer is not None
        real = checkpointer.conn
        # An error from SQLite at the checkpoint (what a full disk gives): said once, retried.
        broken = sqlite3.connect(":memory:")
        broken.close()
        checkpointer.conn = broken
        assert checkpointer._checkpoint() is None
        assert checkpointer._checkpoint() is None
        assert [r.getMessage() for r in caplog.records].count(
            "store checkpoint failed (the WAL keeps the records; retried): Cannot operate on a closed database."
        ) == 1
        checkpointer.conn = real
        _write(writer, 0, 100, False)
        assert checkpointer._checkpoint() is not None
    finally:
        writer.close()
    assert _count(path) == 100
    assert os.path.exists(path)
