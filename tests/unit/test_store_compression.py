"""Store schema 8: bodies compressed with a dictionary the store trains on its own first records
(kubetrail/sinks/sqlite_bodies.py). The answers must be the very ones of a store that keeps its
bodies as they came, whichever writer (native or Python) compressed them."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from pathlib import Path

import orjson
import pytest

from kubetrail.core.record import Batch
from kubetrail.history.model import HistoryError
from kubetrail.history.store import Filters, StoreBackend
from kubetrail.sinks.sqlite import BODY, SCHEMA_VERSION, SqliteSink, StoreWriter, row_of
from kubetrail.sinks.sqlite_bodies import DICTIONARY_ID_BASE, is_compressed
from tests.unit.helpers import build
from tests.unit.history_story import alerts, story
from tests.unit.test_store import _audit_line, _lazy, _records_of, needs_native

BLOCK = 500


def _block(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def _write(path: Path, *, native: bool, compress: bool, lines: int = 3000, train_after: int = 1000) -> int:
    """Audit lines in blocks of BLOCK (each block a commit), then the story's records (audit
    records, Events, log lines: the Python path); returns how many were new."""
    writer = StoreWriter(path, native=native, compress=compress, train_after=train_after)
    writer.open()
    assert (writer.native is not None) == native
    added = 0
    all_lines = [_audit_line(n) for n in range(lines)]
    for start in range(0, lines, BLOCK):
        new = writer.write_blocks([("kube.audit", _block(all_lines[start : start + BLOCK]))])
        assert new is not None
        added += new
    added += writer.write([row_of(record) for record in story()])
    writer.close()
    return added


def _stored_bodies(path: Path) -> list[tuple[int, bytes]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(f"SELECT r.id, {BODY} FROM records r ORDER BY r.id").fetchall()
    conn.close()
    return rows


def _answers(path: Path) -> list[tuple[int, int, str, dict[str, object]]]:
    backend = StoreBackend(path)
    try:
        return [(r.id, r.time_ns, r.kind, r.body) for r in backend.search(Filters(), None, None, 100_000)]
    finally:
        backend.close()


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False])
def test_bodies_are_compressed_once_trained_and_read_back_as_they_came(tmp_path: Path, native: bool) -> None:
    plain, packed = tmp_path / "plain.db", tmp_path / "packed.db"
    total = 3000 + len(story())
    assert _write(plain, native=native, compress=False) == total
    assert _write(packed, native=native, compress=True) == total

    # Trained once, after the commit that brought the store to 1,000 records, on 900 of those (every
    # 10th held out to measure the ratio it gives: its yardstick).
    with sqlite3.connect(packed) as conn:
        ((dictionary_id, samples, ratio),) = conn.execute("SELECT id, samples, ratio FROM dictionaries").fetchall()
        assert (dictionary_id, samples) == (DICTIONARY_ID_BASE, 900) and 0.01 < ratio < 0.2, ratio
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (8,)
    conn.close()
    # Every body compressed: the first 1,000, stored before the dictionary, in the background step
    # right after it was trained (OldBodies).
    bodies = _stored_bodies(packed)
    assert all(is_compressed(body) for _, body in bodies)
    assert not any(is_compressed(body) for _, body in _stored_bodies(plain))
    # Smaller: the bench's lines are ~490 bytes; compressed, a tenth of that or less.
    sizes = {
        "plain": sum(len(body) for _, body in _stored_bodies(plain)[1000:3000]),
        "packed": sum(len(body) for _, body in bodies[1000:3000]),
    }
    assert sizes["packed"] * 5 < sizes["plain"], sizes

    # The same answers, record for record (the story's Events and log lines, written the Python
    # way, included), and the same history of the story's Deployment.
    answers = _answers(packed)
    assert answers == _answers(plain) and len(answers) == total
    assert {orjson.dumps(body) for _, _, kind, body in answers if kind == "audit"} >= {
        _audit_line(n) for n in (0, 999, 1000, 2999)
    }


@needs_native
def test_a_replay_adds_nothing_whether_its_records_were_stored_plain_or_compressed(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    _write(path, native=True, compress=True)
    writer = StoreWriter(path, train_after=1000)
    writer.open()
    lines = [_audit_line(n) for n in range(3000)]
    assert writer.compressor is not None  # the store's dictionary, found by the next writer
    assert writer.write_blocks([("kube.audit", _block(lines[:BLOCK]))]) == 0  # stored plain
    assert writer.write_blocks([("kube.audit", _block(lines[-BLOCK:]))]) == 0  # stored compressed
    assert writer.write([row_of(record) for record in story()]) == 0
    writer.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM dictionaries").fetchone() == (1,)  # not trained again
    conn.close()


@needs_native
def test_after_a_replay_new_bodies_are_compressed_once_as_their_rows_prove_new(tmp_path: Path) -> None:
    """Once a block is mostly replayed rows, the native writer stops compressing bodies before the
    identity index has seen them (that set a replay's pace): the inserting thread compresses
    those of the new rows. Each new body is compressed exactly once, replayed ones not at all."""
    path = tmp_path / "s.db"
    _write(path, native=True, compress=True)
    writer = StoreWriter(path, train_after=1000)
    writer.open()
    # A replay in 12 blocks: the first is compressed before its rows prove old and, the decoder
    # being ahead by up to 3 blocks (one in hand, two queued), so may those; no more.
    old = [_audit_line(n) for n in range(3000)]
    start = writer.compressed_bytes()
    assert writer.write_blocks([("kube.audit", _block(old[i : i + 250])) for i in range(0, 3000, 250)]) == 0
    assert writer.compressed_bytes()[0] - start[0] <= sum(len(line) for line in old[:1000])
    # New lines, the second block's first without a user (its body stays in its row).
    new = [_audit_line(n) for n in range(3000, 3000 + 3 * BLOCK)]
    new[BLOCK] = _audit_line(3000 + BLOCK, user=None)
    before = writer.compressed_bytes()
    blocks = [("kube.audit", _block(new[i : i + BLOCK])) for i in range(0, len(new), BLOCK)]
    assert writer.write_blocks(blocks) == len(new)
    after = writer.compressed_bytes()
    bodies = _stored_bodies(path)[-len(new) :]
    assert after[0] - before[0] == sum(len(line) for line in new)
    assert after[1] - before[1] == sum(len(body) for _, body in bodies)
    assert all(is_compressed(body) for _, body in bodies)
    writer.close()
    followed = [record for record, _ in StoreBackend(path).newer(3000 + len(story()), 10_000)]
    assert [orjson.dumps(record.body) for record in followed] == new


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False])
def test_a_reader_open_before_the_dictionary_reads_what_is_compressed_after(tmp_path: Path, native: bool) -> None:
    """The UI follows a store it opened while the store was young."""
    path = tmp_path / "s.db"
    writer = StoreWriter(path, native=native, train_after=BLOCK)
    writer.open()
    lines = [_audit_line(n) for n in range(4 * BLOCK)]
    writer.write_blocks([("kube.audit", _block(lines[:BLOCK]))])
    backend = StoreBackend(path)
    try:
        assert len(backend.newer(0, 10_000)) == BLOCK
        for start in range(BLOCK, len(lines), BLOCK):
            writer.write_blocks([("kube.audit", _block(lines[start : start + BLOCK]))])
        assert writer.compressor is not None
        followed = backend.newer(BLOCK, 10_000)
        assert [orjson.dumps(record.body) for record, _ in followed] == lines[BLOCK:]
        assert all(is_compressed(body) for _, body in _stored_bodies(path)[BLOCK:])
    finally:
        backend.close()
        writer.close()


def test_a_store_without_the_dictionary_its_bodies_name_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    _write(path, native=False, compress=True, lines=1000, train_after=BLOCK)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM dictionaries")
    conn.close()
    backend = StoreBackend(path)
    try:
        with pytest.raises(HistoryError, match=rf"compressed with dictionary {DICTIONARY_ID_BASE}, which the store"):
            backend.search(Filters(), None, None, 10_000)
    finally:
        backend.close()


def test_a_store_whose_records_cannot_train_a_dictionary_keeps_them_plain_and_tries_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.db"
    writer = StoreWriter(path, native=False, train_after=3)
    writer.open()
    records = story()[:3]
    with caplog.at_level(logging.WARNING):
        assert writer.write([row_of(record) for record in records]) == 3  # too little to train on
    assert writer.compressor is None and "no new compression dictionary" in caplog.text
    assert writer._train_at == 6  # the next try, once the store holds 3 more
    assert writer.write([row_of(record) for record in story()[3:]]) == len(story()) - 3
    writer.close()
    answers = _answers(path)
    assert len(answers) == len(story())


def test_compress_off_keeps_every_body_as_it_came(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    _write(path, native=False, compress=False, lines=2000, train_after=BLOCK)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM dictionaries").fetchone() == (0,)
        # the sqlite3 shell's view of it: JSON
        assert conn.execute("SELECT json_extract(body, '$.auditID') FROM whole_records WHERE id = 2000").fetchone() == (
            "a-1999",
        )
    conn.close()


def test_a_schema_7_store_gets_the_dictionaries_table_and_nothing_else_changes(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    _write(path, native=False, compress=False, lines=1000)
    with sqlite3.connect(path) as conn:
        conn.executescript("DROP TABLE dictionaries; PRAGMA user_version=7;")
        before = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        rows = conn.execute("SELECT * FROM records ORDER BY id").fetchall()
    conn.close()
    writer = StoreWriter(path, train_after=500)
    writer.open()
    writer.close()
    with sqlite3.connect(path) as conn:
        after = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        assert [entry for entry in after if entry[1] != "dictionaries"] == before
        assert conn.execute("SELECT * FROM records ORDER BY id").fetchall() == rows
        assert conn.execute("PRAGMA user_version").fetchone() == (8,)
    conn.close()
    # The next writer trains its dictionary on the records it finds (the store holds enough).
    writer = StoreWriter(path, train_after=500)
    writer.open()
    writer.write_blocks([("kube.audit", _block([_audit_line(n) for n in range(5000, 5000 + BLOCK)]))])
    assert writer.compressor is not None
    writer.close()


def _shifted_line(n: int) -> bytes:
    """An audit event of another mix than ``_audit_line``'s: a write with its request's object,
    whose members no dictionary trained on reads has seen (a new resource, another policy)."""
    spec = {f"setting{k}": {"enabled": k % 2 == 0, "threshold": k * 7, "mode": f"mode-{k % 3}"} for k in range(12)}
    return _audit_line(
        n,
        verb="patch",
        objectRef={"resource": "widgets", "namespace": "prod", "name": f"w-{n}", "apiGroup": "example.io"},
        requestObject={"apiVersion": "example.io/v1", "kind": "Widget", "spec": spec},
    )


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False])
def test_records_of_another_mix_get_a_new_dictionary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, native: bool
) -> None:
    import zstandard

    from kubetrail.sinks import sqlite_bodies

    monkeypatch.setattr(sqlite_bodies, "RATIO_WINDOW_BYTES", 200_000)
    monkeypatch.setattr(sqlite_bodies, "RETRAIN_INTERVAL", 0.0)
    path = tmp_path / "s.db"
    writer = StoreWriter(path, native=native, train_after=1000)
    writer.open()
    lines = [_audit_line(n) for n in range(2000)] + [_shifted_line(n) for n in range(2000, 4000)]
    dictionaries = []
    with caplog.at_level(logging.INFO):
        for start in range(0, len(lines), BLOCK):
            assert writer.write_blocks([("kube.audit", _block(lines[start : start + BLOCK]))]) == BLOCK
            dictionaries.append(writer.compressor.dictionary_id if writer.compressor else None)
    writer.close()
    first, second = DICTIONARY_ID_BASE, DICTIONARY_ID_BASE + 1
    # Trained after the 2nd block; the 3rd and 4th blocks compress as its held-out samples did;
    # the 5th, of the other mix, more than twice worse: a new dictionary, trained on the newest
    # records of both mixes, kept to the end (the new mix compresses with it as its samples did).
    assert dictionaries == [None, first, first, first, second, second, second, second], dictionaries
    found = re.search(r"records compress to (\d+)% with dictionary 32768 \((\d+)% when it was trained\)", caplog.text)
    assert found and int(found[1]) > 2 * int(found[2]), caplog.text
    assert caplog.text.count("from now on") == 2
    bodies = _stored_bodies(path)
    ids = [zstandard.get_frame_parameters(body).dict_id if is_compressed(body) else None for _, body in bodies]
    assert ids == [first] * 2500 + [second] * 1500  # the first 1,000 in the background
    # Both dictionaries' records read back as they came.
    backend = StoreBackend(path)
    try:
        assert [orjson.dumps(r.body) for r, _ in backend.newer(0, 10_000)] == lines
    finally:
        backend.close()
    # The new dictionary compresses the new mix better than the first did.
    with sqlite3.connect(path) as conn:
        trained = dict(conn.execute("SELECT id, dictionary FROM dictionaries").fetchall())
    conn.close()
    sizes = {
        key: sum(len(zstandard.ZstdCompressor(dict_data=zstandard.ZstdCompressionDict(data)).compress(line))
                 for line in lines[3500:])
        for key, data in trained.items()
    }  # fmt: skip
    assert sizes[second] * 2 < sizes[first], sizes


def test_a_new_dictionary_waits_for_the_retrain_interval_unless_the_writer_found_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dictionary this writer trained is kept for RETRAIN_INTERVAL whatever comes (records that
    are merely varied do not make a dictionary a window); one it found in the store (another
    cluster's mix, say) is replaced at the first window that compresses badly."""
    from kubetrail.sinks import sqlite_bodies

    monkeypatch.setattr(sqlite_bodies, "RATIO_WINDOW_BYTES", 200_000)
    path = tmp_path / "s.db"
    writer = StoreWriter(path, native=False, train_after=1000)
    writer.open()
    old = [_audit_line(n) for n in range(1000)]
    new = [_shifted_line(n) for n in range(1000, 3000)]
    for lines in (old[:BLOCK], old[BLOCK:], new[:BLOCK], new[BLOCK:1000]):
        writer.write_blocks([("kube.audit", _block(lines))])
    assert writer.compressor is not None and writer.compressor.dictionary_id == DICTIONARY_ID_BASE  # kept
    assert writer._ratio is not None and writer._ratio.last_ratio is not None
    assert writer._ratio.last_ratio > 2 * writer._ratio.yardstick  # though it compresses badly
    writer.close()
    writer = StoreWriter(path, native=False, train_after=1000)
    writer.open()
    assert writer.compressor is not None and writer.compressor.dictionary_id == DICTIONARY_ID_BASE
    writer.write_blocks([("kube.audit", _block(new[1000:1500]))])
    assert writer.compressor.dictionary_id == DICTIONARY_ID_BASE + 1  # replaced at its first window
    writer.close()


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False])
def test_the_output_counts_the_bytes_it_compressed_before_and_after(tmp_path: Path, native: bool) -> None:
    """``kubetrail_store_body_bytes_total{state=plain|stored}``: what an SRE watches to see the
    dictionary fit (their rates' ratio), across a restart of the output."""
    lines = [_audit_line(n) for n in range(2000)]
    sink = build(SqliteSink, path=str(tmp_path / "s.db"))
    sink.writer.train_after = sink.writer._train_at = 1000
    sink.writer.use_native = native

    def counted(state: str) -> float:
        labels = {"component": "sqlite.0", "kind": "test", "plugin": "sqlite", "state": state}
        return sink.metrics.registry.get_sample_value("kubetrail_store_body_bytes_total", labels) or 0.0

    async def run(chunk: list[bytes], records: bool = False) -> None:
        await sink.start()
        assert (sink.writer.native is not None) == native
        batch = Batch("kube.audit", _records_of(chunk)) if records else _lazy(chunk)
        await sink.write(batch)
        await sink.close()

    asyncio.run(run(lines[:1000]))  # trained after this one: nothing compressed yet
    assert counted("plain") == counted("stored") == 0
    asyncio.run(run(lines[1000:1500]))
    plain = sum(len(line) for line in lines[1000:1500])
    stored = sum(len(body) for _, body in _stored_bodies(tmp_path / "s.db")[1000:1500])
    assert (counted("plain"), counted("stored")) == (plain, stored)
    asyncio.run(run(lines[1500:], records=True))  # the Python path, after a restart of the output
    plain += sum(len(line) for line in lines[1500:])
    stored += sum(len(body) for _, body in _stored_bodies(tmp_path / "s.db")[1500:])
    assert (counted("plain"), counted("stored")) == (plain, stored) and stored * 5 < plain


def test_a_failed_new_dictionary_keeps_the_old_one_until_the_retrain_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import time

    import zstandard

    from kubetrail.sinks import sqlite as sqlite_sink
    from kubetrail.sinks import sqlite_bodies

    monkeypatch.setattr(sqlite_bodies, "RATIO_WINDOW_BYTES", 200_000)
    path = tmp_path / "s.db"
    writer = StoreWriter(path, native=False, train_after=1000)
    writer.open()
    old = [_audit_line(n) for n in range(1000)]
    writer.write_blocks([("kube.audit", _block(old[:BLOCK]))])
    writer.write_blocks([("kube.audit", _block(old[BLOCK:]))])
    assert writer.compressor is not None
    first = writer.compressor
    writer.close()

    def refuse(*_: object) -> None:
        raise zstandard.ZstdError("cannot train dict: Src size is incorrect")

    monkeypatch.setattr(sqlite_sink, "train_dictionary", refuse)
    writer = StoreWriter(path, native=False, train_after=1000)
    writer.open()  # a dictionary found at the open: replaced at the first bad window, if it can be
    with caplog.at_level(logging.WARNING):
        writer.write_blocks([("kube.audit", _block([_shifted_line(n) for n in range(1000, 1500)]))])
    assert "no new compression dictionary (cannot train dict" in caplog.text
    assert writer.compressor is not None and writer.compressor.dictionary_id == first.dictionary_id
    assert writer._ratio is not None and writer._ratio.not_before > time.monotonic() + 3000  # not every window
    writer.close()
    backend = StoreBackend(path)
    try:  # nothing lost meanwhile: every record, plain and compressed, read back
        assert [record.body["auditID"] for record, _ in backend.newer(0, 10_000)] == [f"a-{n}" for n in range(1500)]
    finally:
        backend.close()


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False])
def test_bodies_stored_before_compression_are_compressed_in_the_background_newest_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, native: bool
) -> None:
    """A store written before compression (an upgrade in place) shrinks without a pause: after
    a commit, a step of old bodies, newest first, so that a restarted writer finds where the
    last one stopped; every answer stays the same."""
    from kubetrail.sinks import sqlite_bodies

    monkeypatch.setattr(sqlite_bodies, "OLD_BODIES_ROWS", 1000)
    monkeypatch.setattr(sqlite_bodies, "OLD_BODIES_INTERVAL", 0.0)
    path = tmp_path / "s.db"
    # 2,500 audit lines, every 5th without a user (its body in its row), and the story's records
    # with the alerts the detect filter raises on them (rows whose delete takes their alerts along).
    lines = [_audit_line(n, user=None) if n % 5 == 0 else _audit_line(n) for n in range(2500)]
    plain = StoreWriter(path, native=native, compress=False)
    plain.open()
    for start in range(0, len(lines), BLOCK):
        plain.write_blocks([("kube.audit", _block(lines[start : start + BLOCK]))])
    raised = alerts(story())
    alert_rows_in = [row_of(record) for record in raised]
    alert_rows_in[0] = (*alert_rows_in[0][:3], None, *alert_rows_in[0][4:])  # one without a user: in its row
    plain.write([*(row_of(record) for record in story()), *alert_rows_in])
    plain.close()
    old = len(lines) + len(story()) + len(raised)
    before = _answers(path)

    def alert_rows() -> list[tuple[object, ...]]:
        with sqlite3.connect(path) as conn:
            rows = conn.execute("SELECT * FROM alerts ORDER BY id").fetchall()
        conn.close()
        return rows

    alerts_before = alert_rows()
    assert len(alerts_before) == len(raised) > 0

    def compressed() -> list[bool]:
        return [is_compressed(body) for _, body in _stored_bodies(path)]

    more = [_audit_line(n) for n in range(2500, 2500 + 4 * BLOCK)]
    with caplog.at_level(logging.INFO):
        for step, block in enumerate(range(0, len(more), BLOCK)):
            writer = StoreWriter(path, native=native, train_after=1000)  # a restart at every block
            writer.open()
            assert writer.write_blocks([("kube.audit", _block(more[block : block + BLOCK]))]) == BLOCK
            writer.close()
            # The first block came before the dictionary (trained after its commit); then, after
            # each commit, the next 1,000 old bodies from the top.
            held = old + (step + 1) * BLOCK
            done = min(held, (step + 1) * 1000 + step * BLOCK)
            assert compressed() == [False] * (held - done) + [True] * done, step
    assert all(compressed())
    assert caplog.text.count("the bodies stored before compression are all compressed now") == 1
    answers = {answer[0]: answer for answer in _answers(path)}
    assert [answers[answer[0]] for answer in before] == before
    added = sorted(set(answers) - {answer[0] for answer in before})
    assert [orjson.dumps(answers[i][3]) for i in added] == more
    assert alert_rows() == alerts_before
    with sqlite3.connect(path) as conn:  # every page a rewritten row left underfull was merged
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    conn.close()
    assert free > 0


def test_old_bodies_that_cannot_be_written_now_are_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from kubetrail.sinks import sqlite_bodies

    monkeypatch.setattr(sqlite_bodies, "OLD_BODIES_INTERVAL", 0.0)
    monkeypatch.setattr(sqlite_bodies, "OLD_BODIES_ROWS", 10_000)
    path = tmp_path / "s.db"
    _write(path, native=False, compress=False)
    real_chunk = sqlite_bodies.OldBodies.chunk
    failures = iter([True])

    def chunk(self: sqlite_bodies.OldBodies, conn: sqlite3.Connection) -> list:  # type: ignore[type-arg]
        if next(failures, False):
            raise sqlite3.OperationalError("database or disk is full")
        return real_chunk(self, conn)

    monkeypatch.setattr(sqlite_bodies.OldBodies, "chunk", chunk)
    writer = StoreWriter(path, native=False, train_after=1000)
    writer.open()
    lines = [_audit_line(n) for n in range(3000, 3000 + BLOCK)]
    with caplog.at_level(logging.INFO):
        assert writer.write_blocks([("kube.audit", _block(lines))]) == BLOCK  # the write itself is safe
        assert "old bodies not compressed this time (database or disk is full)" in caplog.text
        assert not any(is_compressed(body) for _, body in _stored_bodies(path))
        writer.write([row_of(record) for record in story()])  # a commit (replays): tried again
    writer.close()
    assert all(is_compressed(body) for _, body in _stored_bodies(path))
