"""Store schema 5: the body of every row with a user lives in ``user_bodies`` keyed ``(user,
time_ns, id)`` (a user's records together on disk, for a cold ``who``), the ``records`` row keeps
its columns and an empty body. Every writer path fills it (native blocks, Python records,
alerts), a replay adds nothing to either table, kill -9 leaves both or neither, retention takes
the bodies with their rows, a schema 4 store is migrated by the next writer in one transaction
(a reader opened before goes on), and ``who`` is one range scan of that table."""

from __future__ import annotations

import asyncio
import sqlite3
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from kubetrail.core.record import Batch, Record
from kubetrail.history.store import Filters, StoreBackend
from kubetrail.sinks import sqlite as sqlite_module
from kubetrail.sinks.sqlite import SCHEMA_VERSION, SqliteSink, StoreWriter, open_reader, row_of
from tests.unit.helpers import build
from tests.unit.history_helpers import copy_store, entries, fill, to_schema_4
from tests.unit.history_story import alerts, story
from tests.unit.test_store import (
    _NATIVE_WRITER,
    _all_rows,
    _audit_line,
    _lazy,
    _records_of,
    kill_9_after_acks,
    needs_native,
)


def consistent(conn: sqlite3.Connection) -> int:
    """Checks schema 5's invariant: every records row with a user has an empty body and exactly
    one user_bodies row (same user, time, id, kind, verb), every user_bodies row has its records
    row, and no other row has an empty body. Returns how many rows have a user."""
    (users,) = conn.execute("SELECT count(*) FROM records WHERE user IS NOT NULL").fetchone()
    assert conn.execute("SELECT count(*) FROM records WHERE user IS NOT NULL AND length(body) > 0").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM records WHERE user IS NULL AND length(body) = 0").fetchone() == (0,)
    matched = conn.execute(
        "SELECT count(*) FROM records r JOIN user_bodies b ON b.user = r.user AND b.time_ns = r.time_ns"
        " AND b.id = r.id AND b.kind = r.kind AND b.verb IS r.verb AND length(b.body) > 0"
    ).fetchone()
    assert matched == (users,)
    assert conn.execute("SELECT count(*) FROM user_bodies").fetchone() == (users,)
    return int(users)


def test_a_new_store_keeps_the_bodies_of_rows_with_a_user_apart(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    records = story()
    fill(path, records)
    assert _all_rows(path) == [row_of(r) for r in records]  # the view gives every body back
    conn = open_reader(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (8,)
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "records_user" not in indexes
        users = consistent(conn)
        assert users == sum(1 for r in records if row_of(r)[3] is not None) > 0
        # Events and log lines keep their body in records.
        assert (
            conn.execute("SELECT count(*) FROM records WHERE kind IN ('event', 'log') AND length(body) > 0").fetchone()[
                0
            ]
            > 0
        )
        # who is one backwards range scan of user_bodies: no sort, no other table.
        plan = str(
            conn.execute(
                "EXPLAIN QUERY PLAN SELECT id, time_ns, kind, body FROM user_bodies WHERE user = ?"
                " AND verb IN ('create', 'update') AND time_ns >= ? ORDER BY time_ns DESC, id DESC LIMIT ?",
                ("alice", 0, 10),
            ).fetchall()
        )
        assert "SEARCH user_bodies USING PRIMARY KEY (user=? AND time_ns>?)" in plan, plan
        assert "TEMP B-TREE" not in plan, plan
    finally:
        conn.close()


@needs_native
async def test_every_writer_path_fills_it_and_a_replay_adds_nothing(tmp_path: Path) -> None:
    """Native blocks, Python records (native off) and blocks through Python give the same
    tables; replays by every path, alone and mixed in one group, add nothing to either."""
    lines = [_audit_line(n) for n in range(100, 1300)] + [_audit_line(9, user=None)]  # one without a user
    chunks = [lines[start : start + 400] for start in range(0, len(lines), 400)]
    paths = {name: tmp_path / f"{name}.db" for name in ("native", "python", "blocks")}
    for name, path in paths.items():
        s = build(SqliteSink, path=str(path))
        s.writer.use_native = name == "native"
        await s.start()
        assert (s.writer.native is not None) == (name == "native")
        if name == "python":
            await s.write_group([Batch("kube.audit", _records_of(chunk)) for chunk in chunks])
        else:
            await s.write_group([_lazy(chunk) for chunk in chunks])
        # Replays: blocks, records, a group mixing both; then one new event beside replays.
        await s.write_group([_lazy(chunk) for chunk in chunks])
        await s.write(Batch("kube.audit", _records_of(lines[:50])))
        await s.write_group([_lazy(lines[50:60]), Batch("kube.audit", _records_of(lines[60:70]))])
        await s.write_group([_lazy([lines[70], _audit_line(5000)])])
        assert s.m_new._value.get() == len(lines) + 1  # type: ignore[attr-defined]
        await s.close()
    rows = {name: _all_rows(path) for name, path in paths.items()}
    assert rows["native"] == rows["python"] == rows["blocks"]
    assert len(rows["native"]) == len(lines) + 1
    for path in paths.values():
        conn = open_reader(path)
        try:
            assert consistent(conn) == len(lines)  # all but the one without a user, plus the new one
        finally:
            conn.close()


async def test_an_older_native_module_leaves_every_row_to_python(tmp_path: Path, monkeypatch: Any) -> None:
    """A native module built before schema 5 (its StoreInserter has no insert_body): the writer
    does not use it, so no body stays in a row with a user."""
    if sqlite_module._StoreInserter is None:
        pytest.skip("no native module")
    real = sqlite_module._StoreInserter

    class Older:
        def __init__(self, path: str, synchronous: str, insert: str, flat_keys: list[str]) -> None:
            self.inner = real(path, synchronous, insert, flat_keys)

        @staticmethod
        def sqlite_version() -> str:
            return real.sqlite_version()  # type: ignore[no-any-return]

    monkeypatch.setattr(sqlite_module, "_StoreInserter", Older)
    path = tmp_path / "s.db"
    s = build(SqliteSink, path=str(path))
    await s.start()
    assert s.writer.native is None
    lines = [_audit_line(n) for n in range(40)]
    await s.write(_lazy(lines))
    await s.close()
    assert _all_rows(path) == [row_of(r) for r in _records_of(lines)]
    with sqlite3.connect(path) as conn:
        assert consistent(conn) == 40


def test_alerts_with_a_user_are_kept_by_user_and_read_back(tmp_path: Path) -> None:
    records = story()
    fired = alerts(records)
    assert fired
    path = tmp_path / "s.db"
    fill(path, records, fired)
    assert _all_rows(path) == [row_of(r) for r in [*records, *fired]]
    conn = open_reader(path)
    try:
        consistent(conn)
        assert conn.execute("SELECT count(*) FROM user_bodies WHERE kind = 'alert'").fetchone()[0] > 0
    finally:
        conn.close()
    backend = StoreBackend(path)
    try:
        got = backend.search(Filters(kind="alert"), None, None, 100)
        assert sorted(r.body["rule"] for r in got) == sorted(r.body["rule"] for r in fired)
    finally:
        backend.close()


async def test_retention_takes_the_bodies_with_their_rows(tmp_path: Path) -> None:
    now = time.time_ns()
    writer = StoreWriter(tmp_path / "s.db", retention_time=3600)
    writer.open()
    lines = [_audit_line(n) for n in range(300)]
    old = [
        Record(r.tag, now - 7200 * 10**9 + n, raw=r.raw, identity=r.identity) for n, r in enumerate(_records_of(lines))
    ]
    new = [Record("t", now - 60 * 10**9 + i, {"i": i}) for i in range(50)]  # no user
    writer.write([row_of(r) for r in old + new])
    assert writer.deleted == 300
    assert writer.conn is not None
    assert consistent(writer.conn) == 0
    writer.close()
    # By size: the oldest go, bodies with them, and the pages in use stay under the limit.
    limit = 2 * 1024 * 1024
    s = build(SqliteSink, path=str(tmp_path / "size.db"), retention_size="2M", retention_interval=0)
    await s.start()
    for n in range(20):  # ~6 MB of audit events with users
        await s.write(_lazy([_audit_line(n * 300 + i, requestURI="/" + "y" * 800) for i in range(300)]))
    used = s.writer.used_bytes()
    assert s.writer.conn is not None
    kept = consistent(s.writer.conn)
    await s.close()
    assert used <= limit and 0 < kept < 6000
    assert (tmp_path / "size.db").stat().st_size < 3 * limit


_PYTHON_USER_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {repo!r})
    from kubetrail.core.record import Batch
    from kubetrail.sinks.sqlite import SqliteSink
    from tests.unit.helpers import build
    from tests.unit.test_store import _audit_line, _records_of

    async def main():
        s = build(SqliteSink, path={path!r})
        s.writer.use_native = False
        await s.start()
        n = 0
        while True:
            lines = [_audit_line(n * 500 + i, verb=f"v{{n}}") for i in range(500)]
            await s.write(Batch("kube.audit", _records_of(lines)))
            print(n, flush=True)  # acknowledged
            n += 1

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("script", ["python", pytest.param("native", marks=needs_native)])
def test_kill_9_leaves_both_or_neither(tmp_path: Path, script: str) -> None:
    acked, conn = kill_9_after_acks(_NATIVE_WRITER if script == "native" else _PYTHON_USER_WRITER, tmp_path / "s.db")
    try:
        counts = dict(conn.execute("SELECT verb, count(*) FROM user_bodies GROUP BY 1").fetchall())
        assert all(counts.get(f"v{n}") == 500 for n in range(acked + 1)), "an acknowledged batch is missing"
        assert all(count == 500 for count in counts.values()), "a batch was stored in part"
        assert consistent(conn) == 500 * len(counts)
    finally:
        conn.close()


def _v4_store(tmp_path: Path) -> tuple[Path, list[Record]]:
    """A schema 4 store of the story, its alerts and many audit events of several users."""
    records = story() + _records_of([_audit_line(n) for n in range(2000, 2600)])
    path = tmp_path / "v4.db"
    fill(path, records, alerts(records))
    to_schema_4(path)
    return path, records


def test_a_schema_4_store_is_migrated_by_the_next_writer(tmp_path: Path) -> None:
    path, records = _v4_store(tmp_path)
    with sqlite3.connect(path) as conn:
        before = conn.execute(
            "SELECT ident, time_ns, kind, user, verb, resource, namespace, name, uid, code, reason, tag, body"
            " FROM records ORDER BY id"
        ).fetchall()
    conn.close()
    asks = [("who", "user-1"), ("who", "alice", "--writes"), ("history", "deploy/shop/web", "--logs")]
    answers = [entries(path, *ask) for ask in asks]
    reader = StoreBackend(path)  # opened before the migration, as the UI would be
    assert not reader.split
    last = reader.last_id()
    old_who = reader.user_records("user-2", None, None, 1000)
    counts = asyncio.run(_write_again(path, records))  # the writer migrates; a replay adds nothing
    assert counts == len(before)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "records_user" not in indexes
        assert consistent(conn) > 600
    conn.close()
    assert _all_rows(path) == before  # every row and every body as it was
    assert [entries(path, *ask) for ask in asks] == answers
    # The reader opened before goes on, now reading the bodies where they are.
    assert reader.user_records("user-2", None, None, 1000) == old_who
    assert reader.split
    assert [record for record, _ in reader.newer(last - 5)] == [
        record for record in reader._records(list(range(last - 4, last + 1)))
    ]
    reader.close()


async def _write_again(path: Path, records: list[Record]) -> int:
    s = build(SqliteSink, path=str(path))
    await s.start()
    await s.write(Batch("t", records))
    assert s.writer.conn is not None
    (count,) = s.writer.conn.execute("SELECT count(*) FROM records").fetchone()
    await s.close()
    return int(count)


def test_a_failed_migration_from_schema_4_changes_nothing(tmp_path: Path) -> None:
    path, _ = _v4_store(tmp_path)
    with sqlite3.connect(path) as conn:  # a user_bodies of another shape: the copy into it fails
        conn.execute("CREATE TABLE user_bodies (x)")
    conn.close()
    copy = copy_store(path, tmp_path / "copy.db")
    writer = StoreWriter(path)
    with pytest.raises(Exception, match=r"cannot migrate .* from store schema 4 to 8: .*user_bodies"):
        writer.open()
    with sqlite3.connect(path) as conn, sqlite3.connect(copy) as was:
        assert conn.execute("PRAGMA user_version").fetchone() == (4,)
        for sql in ("SELECT * FROM records ORDER BY id", "SELECT type, name, sql FROM sqlite_master ORDER BY name"):
            assert conn.execute(sql).fetchall() == was.execute(sql).fetchall()
    conn.close()
    was.close()


def test_a_store_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    fill(path, story())
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    newer = rf"newer kubetrail \(store schema {SCHEMA_VERSION + 1}; this version reads up to {SCHEMA_VERSION}\)"
    with pytest.raises(Exception, match=newer):
        StoreWriter(path).open()


def test_the_users_are_listed_from_user_bodies(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    fill(path, story() + _records_of([_audit_line(n) for n in range(40)]))
    backend = StoreBackend(path)
    try:
        got = sorted(backend.users())
    finally:
        backend.close()
    assert got == sorted({row_of(r)[3] for r in story() if row_of(r)[3]} | {f"user-{n}" for n in range(5)})
