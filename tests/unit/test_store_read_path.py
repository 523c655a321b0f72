"""The store's read path for long and cold answers (issue 19: the object index walked bucket by
bucket in groups by several connections, bodies read in runs of neighbouring ids by several
connections, the descriptors told the reads are random; schema 5: ``who`` from ``user_bodies``
by one range scan, every body through the one ``BODY`` expression) gives exactly what the
simple path gives: one statement per question on one connection, the user's newest ids then
their bodies. Compared on a store written by the real ``sqlite`` output with 60 time buckets, a
dozen users, many objects and bodies with diffs, for ``who``, ``history`` (with and without
logs) and ``search``, with limits that cut inside a bucket and ``--since``/``--until`` inside
buckets; on that store (schema 8: since schema 6 its object index is in segments, here of 64 ids; a tenth of the records
stored late, after newer ones: the segments are not in time order), on the same store as
schema 5 wrote it (the object index by time bucket), as schema 4 wrote it, and on that one
migrated to schema 8 by a writer, whose answers must all be the same."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubetrail.core.record import Record
from kubetrail.history import queries
from kubetrail.history import store as store_module
from kubetrail.history.model import StoredRecord
from kubetrail.history.store import PARALLEL_FROM, Filters, StoreBackend, advise_random
from kubetrail.sinks.sqlite import BUCKET_BITS, SEGMENT_BITS, StoreWriter
from tests.unit.history_helpers import copy_store, fill, segments_of, to_schema_4, to_schema_5
from tests.unit.history_story import T0, audit, deployment, event, log

BUCKET_S = (1 << BUCKET_BITS) / 1e9  # a bucket in seconds (19.5 hours)
BUCKETS = 60
USERS = [f"user-{n}" for n in range(12)] + ["system:serviceaccount:ci:default"]
DEPLOYMENTS = [f"web-{n}" for n in range(8)]


class OneStatement(StoreBackend):
    """The simple read path: the newest ids by one statement, the bodies by one connection."""

    def _newest_ids(
        self,
        where: str,
        params: list[Any],
        since: int | None,
        until: int | None,
        limit: int,
        parts: store_module.Parts | None = None,
    ) -> list[int]:
        time_params: list[Any] = []
        clause = store_module._time_clause(since, until, time_params)
        sql = f"SELECT id FROM records WHERE {where}{clause} ORDER BY time_ns DESC LIMIT ?"
        return [row[0] for row in self.conn.execute(sql, [*params, *time_params, limit])]

    def _records(self, ids: list[int]) -> list[StoredRecord]:
        marks = ",".join("?" * len(ids))
        rows = self.conn.execute(
            f"SELECT r.id, r.time_ns, r.kind, {self.body} FROM records r WHERE r.id IN ({marks})", ids
        )
        records = [StoredRecord(r[0], r[1], r[2], orjson.loads(r[3])) for r in rows]
        return sorted(records, key=lambda r: (r.time_ns, r.id))

    def user_records(
        self, user: str, since: int | None, until: int | None, limit: int, writes_only: bool = False
    ) -> list[StoredRecord]:
        self._check_schema()
        split, self.split = self.split, False  # the user's ids from records, then their bodies
        try:
            return super().user_records(user, since, until, limit, writes_only)
        finally:
            self.split = split

    def search(self, filters: Filters, since: int | None, until: int | None, limit: int) -> list[StoredRecord]:
        self._check_schema()
        split, self.split = self.split, False  # records' own user column, no user_bodies
        try:
            return super().search(filters, since, until, limit)
        finally:
            self.split = split


def records() -> list[Record]:
    """A month and a half of a busy namespace: every record at its own time (no ties at a limit),
    updates with request and response objects (diffs), Events of the ReplicaSets and pods, logs."""
    rng = random.Random(19)
    out: list[Record] = []
    replicas = dict.fromkeys(DEPLOYMENTS, 1)
    count = 3_000
    for n in range(count):
        offset = n * BUCKETS * BUCKET_S / count + rng.random() * 0.5  # increasing, distinct
        name = rng.choice(DEPLOYMENTS)
        roll = rng.random()
        if roll < 0.6:
            user = rng.choice(USERS)
            verb = rng.choice(("get", "list", "update", "patch", "create", "delete"))
            before = deployment(replicas[name], "nginx:1.27", str(1000 + n))
            if verb in ("update", "patch"):
                replicas[name] = rng.randrange(1, 9)
            after = deployment(replicas[name], "nginx:1.27", str(1001 + n))
            for body in (before, after):
                body["metadata"]["name"] = name
            writes = verb in ("update", "patch", "create")
            out.append(
                audit(
                    offset,
                    f"a-{n}",
                    verb,
                    user,
                    "deployments",
                    name,
                    request=after if writes else None,
                    response=after if verb != "delete" else None,
                    code=403 if rng.random() < 0.05 else 200,
                )
            )
        elif roll < 0.85:
            owner = f"{name}-6d4b8" if rng.random() < 0.5 else f"{name}-6d4b8-{n % 7}x"
            kind = "ReplicaSet" if owner.count("-") == 2 else "Pod"
            uid = f"00000000-0000-4000-8000-{n:012d}"
            out.append(event(offset, uid, str(n), kind, owner, "Scaled", f"event {n} of {owner}"))
        else:
            pod = f"{name}-6d4b8-{n % 7}x"
            out.append(log(offset, pod, f"line {n}", n * 100, file_uid=f"f-{pod}"))
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The store as this version writes it, as schemas 5 and 4 wrote it, and that one migrated."""
    folder = tmp_path_factory.mktemp("readpath")
    path = folder / "store.db"
    everything = records()
    # Every tenth record comes 500 records late (a buffer replayed, a node that was away): in a
    # segment after records newer than it.
    order = sorted(range(len(everything)), key=lambda n: n + 500 * (n % 10 == 3))
    stored = [everything[n] for n in order]
    with segments_of(6):
        fill(path, *[stored[start : start + 400] for start in range(0, len(stored), 400)])
    v5 = copy_store(path, folder / "v5.db")
    to_schema_5(v5)
    v4 = copy_store(path, folder / "v4.db")
    to_schema_4(v4)
    migrated = copy_store(v4, folder / "migrated.db")
    writer = StoreWriter(migrated)
    writer.open()  # migrates
    writer.close()
    return {"schema 8": path, "schema 5": v5, "schema 4": v4, "migrated": migrated}


@pytest.fixture(params=["schema 8", "schema 5", "schema 4", "migrated"])
def store(stores: dict[str, Path], request: pytest.FixtureRequest) -> Path:
    return stores[request.param]


def test_the_four_stores_are_what_they_say(stores: dict[str, Path]) -> None:
    for label, path in stores.items():
        backend = StoreBackend(path)
        try:
            assert backend.split == (label != "schema 4"), label
            version = backend.conn.execute("PRAGMA user_version").fetchone()[0]
            assert version == {"schema 5": 5, "schema 4": 4}.get(label, 8), label
            assert backend.segment_bits == {"schema 8": 6, "migrated": SEGMENT_BITS}.get(label), label
            assert backend.by_bucket == (label in ("schema 5", "schema 4")), label
            assert backend.uid_bits == {"schema 8": 6, "migrated": SEGMENT_BITS}.get(label), label
            if label == "schema 8":  # many segments, and records in them out of time order
                assert len(backend.segments()) > 40
                (late,) = backend.conn.execute(
                    "SELECT count(*) FROM records a WHERE a.time_ns < (SELECT max(b.time_ns) FROM records b"
                    " WHERE b.id >> 6 < a.id >> 6)"
                ).fetchone()
                assert late > 200
            assert backend.conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            if backend.split:  # every row with a user has its body there only, and no other body is there
                assert backend.conn.execute(
                    "SELECT count(*) FROM records WHERE user IS NOT NULL AND length(body) > 0"
                ).fetchone() == (0,)
                joined = (
                    "SELECT count(*) FROM records r JOIN user_bodies b"
                    " ON (b.user, b.time_ns, b.id) = (r.user, r.time_ns, r.id)"
                )
                (users,) = backend.conn.execute("SELECT count(*) FROM records WHERE user IS NOT NULL").fetchone()
                assert users > 1000
                assert backend.conn.execute(joined).fetchone() == (users,)
                assert backend.conn.execute("SELECT count(*) FROM user_bodies").fetchone() == (users,)
        finally:
            backend.close()


def test_an_object_is_found_by_uid_in_every_schema(tmp_path: Path) -> None:
    """Schema 7's uid index is led by the segment of ids: ``uid_ref`` names every segment (a seek
    each, the index used) and finds what schema 6's index on the uid finds, for uids whose
    records lie in many segments (a tenth stored late), and for a uid no record carries."""
    from tests.unit.history_helpers import to_schema_6
    from tests.unit.test_store import _audit_line, _records_of

    lines = [
        _audit_line(n, objectRef={"resource": "pods", "namespace": "ns", "name": f"p-{n % 300}", "uid": f"u-{n % 300}"})
        for n in range(3000)
    ]
    records = _records_of(lines)
    order = sorted(range(len(records)), key=lambda n: n + 500 * (n % 10 == 3))
    v7 = tmp_path / "v7.db"
    with segments_of(6):
        fill(v7, *[[records[n] for n in order[start : start + 100]] for start in range(0, len(order), 100)])
    v6 = copy_store(v7, tmp_path / "v6.db")
    to_schema_6(v6)
    asked = [f"u-{n}" for n in range(0, 300, 7)] + ["u-none"]
    answers = {}
    for path in (v7, v6):
        backend = StoreBackend(path)
        try:
            answers[path] = [backend.uid_ref(uid) for uid in asked]
            if path == v7:  # what uid_ref asks SQLite is answered by the segment-led index
                assert backend.uid_bits == 6 and len(backend._segments(6)) > 40
                statements: list[str] = []
                backend.conn.set_trace_callback(statements.append)
                backend.uid_ref("u-1")
                backend.conn.set_trace_callback(None)
                (asked_sql,) = [sql for sql in statements if "uid =" in sql]
                plan = backend.conn.execute(f"EXPLAIN QUERY PLAN {asked_sql}").fetchall()
                assert "records_uid_segment (<expr>=? AND uid=?)" in str(plan), plan
            else:
                assert backend.uid_bits is None
        finally:
            backend.close()
    assert answers[v7][-1] is None and [ref.name for ref in answers[v7][:-1]] == [f"p-{n}" for n in range(0, 300, 7)]
    assert answers[v7] == answers[v6]


def test_answers_are_the_same_before_and_after_the_migration(stores: dict[str, Path]) -> None:
    """who, history and search on the schema 4 store, on its migration, on the schema 5 store
    and on the store this version wrote: the same answers."""
    asks = [
        lambda b: queries.who(b, "user-3"),
        lambda b: queries.who(b, "user-5", writes_only=True, limit=50),
        lambda b: queries.history(b, "deploy/shop/web-2", logs=True),
        lambda b: queries.search(b, Filters(user="user-7", kind="audit"), limit=200),
        lambda b: queries.search(b, Filters(code=403), limit=300),
    ]
    answers: dict[str, list[Any]] = {}
    for label, path in stores.items():
        backend = StoreBackend(path)
        try:
            answers[label] = [ask(backend) for ask in asks]
        finally:
            backend.close()
    assert all(answer.entries for answer in answers["schema 4"])
    assert answers["schema 4"] == answers["migrated"] == answers["schema 5"] == answers["schema 8"]


def _both(store: Path, ask: Any) -> tuple[Any, Any, StoreBackend]:
    fast, simple = StoreBackend(store), OneStatement(store)
    try:
        got, want = ask(fast), ask(simple)
    except queries.HistoryError as exc:  # the same error from both, or a failure
        with pytest.raises(queries.HistoryError, match=str(exc)):
            ask(simple)
        got = want = str(exc)
    finally:
        fast.close()
        simple.close()
    return got, want, fast


def _times() -> list[tuple[int | None, int | None]]:
    """No range, and ranges starting and ending inside buckets."""
    inside = [T0 + int((k + 0.37) * BUCKET_S * 1e9) for k in (3, 11, 29, 30, 47)]
    return [(None, None), (inside[0], None), (None, inside[3]), (inside[1], inside[2]), (inside[3], inside[4])]


@pytest.mark.parametrize("limit", [queries.DEFAULT_LIMIT, PARALLEL_FROM + 3, 40, 7, 1])
def test_who_is_the_same(store: Path, limit: int) -> None:
    used_readers = False
    for user in USERS:
        for since, until in _times():
            for writes_only in (False, True):
                got, want, fast = _both(
                    store,
                    lambda b, u=user, s=since, t=until, w=writes_only: queries.who(
                        b, u, since=s, until=t, writes_only=w, limit=limit
                    ),
                )
                assert got == want, (user, since, until, writes_only)
                used_readers |= bool(fast._readers)  # the body readers' pool took part
    # Users have ~140 records each: an unlimited answer is read by several connections; schema 5
    # reads them and their bodies by one statement.
    assert used_readers == (limit > PARALLEL_FROM and not fast.split)


@pytest.mark.parametrize("limit", [queries.DEFAULT_LIMIT, 25, 3])
@pytest.mark.parametrize("logs", [False, True])
def test_history_is_the_same(store: Path, limit: int, logs: bool) -> None:
    targets = [f"deploy/shop/{name}" for name in DEPLOYMENTS[:4]] + ["deploy/web-5", "pods/shop/web-1-6d4b8-3x"]
    for target in targets:
        for since, until in _times():
            got, want, fast = _both(
                store,
                lambda b, t=target, s=since, u=until: queries.history(b, t, since=s, until=u, logs=logs, limit=limit),
            )
            assert fast.by_bucket or fast.segment_bits is not None
            assert got == want, (target, since, until)
            if since is None and until is None:
                assert not isinstance(got, str) and len(got.entries) >= min(limit, 3)


@pytest.mark.parametrize(
    "filters",
    [
        Filters(name="web-3"),
        Filters(kind="audit"),
        Filters(user="user-4", writes_only=True),
        Filters(kind="event", name="web-2-6d4b8"),
        Filters(code=403),
    ],
)
def test_search_is_the_same(store: Path, filters: Filters) -> None:
    for limit in (queries.DEFAULT_LIMIT, 90, 5):
        for since, until in _times():
            got, want, _ = _both(
                store, lambda b, s=since, u=until, n=limit: queries.search(b, filters, since=s, until=u, limit=n)
            )
            assert got == want, (filters, limit, since, until)


def test_every_descriptor_of_the_store_is_told_reads_are_random(store: Path, tmp_path: Path) -> None:
    """advise_random finds SQLite's own descriptors of the store and its WAL by inode: two for
    each connection (the backend's and each body reader's), none of another file's."""
    other = tmp_path / "other"
    other.write_bytes(b"x")
    fd = os.open(other, os.O_RDONLY)
    backend = StoreBackend(store)
    try:
        assert advise_random(other) == 1
        wal = Path(f"{store}-wal").exists()
        per_connection = 2 if wal else 1
        assert advise_random(store) == per_connection
        backend.search(Filters(kind="audit"), None, None, 1_000)  # 1,000 records: the body readers
        # (how many connections the pool opens depends on how its threads are scheduled)
        assert backend._readers
        assert advise_random(store) == per_connection * (1 + len(backend._readers))
    finally:
        backend.close()
        os.close(fd)
    assert advise_random(store) == 0
    assert advise_random(tmp_path / "missing.db") == 0


def test_the_segments_are_listed_without_reading_the_rows(stores: dict[str, Path]) -> None:
    """The newest and oldest ids come from the edges of the table's B-tree: a few dozen steps of
    SQLite's machine, not one per row (``max(id), min(id)`` in one SELECT read every row: a
    cold ``history`` on 10M records took 1.1 s instead of 20 ms)."""
    backend = StoreBackend(stores["schema 8"])
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    try:
        backend.conn.set_progress_handler(count, 1)
        segments = backend.segments()
        backend.conn.set_progress_handler(None, 1)
        (rows,) = backend.conn.execute("SELECT count(*) FROM records").fetchone()
        assert rows == 3000 and segments == list(range(rows >> 6, -1, -1))
        assert steps < 100, steps
    finally:
        backend.close()
