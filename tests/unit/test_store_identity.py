"""The identity index led by the bucket of a time the identity determines (issue 19: schema 4's
buckets of 19.5 hours, schema 7's of about a second). A replay changes nothing whichever path
brings it (native blocks, records from the tail's k8s_audit parser, records a source stamped with
another time, the webhook's records); records whose time comes from their source are unique by
identity alone (bucket 0); a store of schema 3 or 6 is read as it is and migrated by the next
writer in one transaction; an alert's audit records are found from its time."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import orjson
import pytest

from kubetrail.core.record import Batch, Record
from kubetrail.history import queries
from kubetrail.history.store import StoreBackend
from kubetrail.parsers.registry import ParserRegistry
from kubetrail.runtime.plugins import COMMON_INPUT_OPTIONS
from kubetrail.sinks.sqlite import (
    ALERTS_SCHEMA,
    APPLICATION_ID,
    IDENT_BITS,
    IDENT_INDEX,
    IDENT_INDEX_NAME,
    IDENT_KEY,
    INSERT,
    INSERT_ALERT,
    OLD_IDENT_INDEX_NAME,
    SCHEMA,
    SCHEMA_VERSION,
    UID_INDEX,
    SqliteSink,
    StoreWriter,
    ident_buckets,
    identity_bucket,
    row_of,
)
from kubetrail.sources.kubernetes_audit import KubernetesAuditSource
from tests.unit.helpers import build
from tests.unit.history_helpers import V4_USER_INDEX, V6_UID_INDEX, entries, to_schema_6
from tests.unit.history_story import alerts, story
from tests.unit.test_store import _audit_line, _edge_lines, _lazy, _records_of, needs_native

BUCKET = 1 << IDENT_BITS
EDGE = 1_650_000_000  # an identity bucket in 2026 (2^30 ns each)
# Schema 3's identity index and table (no ibucket): the store an older kubetrail wrote.
V3_IDENT_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS records_ident ON records (ident)"
V3_SCHEMA = (
    SCHEMA.replace(IDENT_INDEX, V3_IDENT_INDEX).replace(UID_INDEX, V6_UID_INDEX).replace(",\n    ibucket INTEGER", "")
    + V4_USER_INDEX
)
assert V3_SCHEMA.count("ibucket") == 0 and V3_IDENT_INDEX in V3_SCHEMA
COLUMNS = "ident, time_ns, kind, user, verb, resource, namespace, name, uid, code, reason, tag, body"


def stamp(time_ns: int) -> str:
    """RFC 3339 with nanoseconds, as the API server writes (microseconds) and more."""
    import time

    seconds, fraction = divmod(time_ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}Z"


def boundary_lines(first: int = 0) -> list[bytes]:
    """Audit events on both sides of identity bucket boundaries (a microsecond before a bucket,
    its first nanosecond) and in the middle of one."""
    edge = EDGE * BUCKET
    times = []
    for n in range(12):
        base = edge + (n // 3) * BUCKET
        times.append((base - 1000, base, base + BUCKET // 2)[n % 3])
    return [_audit_line(first + n, stageTimestamp=stamp(t)) for n, t in enumerate(times)]


def open_store(path: Path) -> SqliteSink:
    return build(SqliteSink, path=str(path))  # type: ignore[no-any-return]


async def write_all(path: Path, *batches: Batch) -> list[int]:
    """Each batch written in turn by a new sink; how many rows the store holds after each."""
    counts = []
    sink = open_store(path)
    await sink.start()
    for batch in batches:
        await sink.write(batch)
        assert sink.writer.conn is not None
        counts.append(sink.writer.conn.execute("SELECT count(*) FROM records").fetchone()[0])
    await sink.close()
    return counts


def stored(path: Path, columns: str = COLUMNS) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT {columns} FROM whole_records ORDER BY id").fetchall()
    finally:
        conn.close()


def restamped(records: list[Record], shift_ns: int) -> list[Record]:
    """The same records as a source that stamps them otherwise would give them (a json parser
    without a time key stamps the time it read the line; a re-read days later)."""
    return [Record(r.tag, r.time_ns + shift_ns, r.body, r.raw, r.identity) for r in records]


def webhook_records(lines: list[bytes]) -> tuple[list[Record], bytes | None]:
    """What the real webhook input makes of an EventList of these events (its own parse)."""
    source = build(KubernetesAuditSource, common=COMMON_INPUT_OPTIONS, listen="127.0.0.1", port=0, tag="kube.audit")
    body = b'{"kind":"EventList","apiVersion":"audit.k8s.io/v1","items":[' + b",".join(lines) + b"]}"
    return source._parse(body)  # type: ignore[no-any-return]


def test_a_new_store_has_the_bucket_led_identity_index_and_lookups_use_it(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    asyncio.run(write_all(path, Batch("t", story())))
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (8,)
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert IDENT_INDEX_NAME in indexes and not {"records_ident", OLD_IDENT_INDEX_NAME} & indexes
        plan = str(conn.execute("EXPLAIN QUERY PLAN " + INSERT_ALERT, [None] * 7 + [b"x"]).fetchall())
        assert f"{IDENT_INDEX_NAME} (<expr>=? AND ident=?)" in plan, plan
        buckets = ident_buckets(conn, IDENT_KEY)
        # The story's audit events are in their stageTimestamps' buckets; everything else in 0.
        audits = [r for r in story() if r.tag == "kube.audit"]
        assert buckets == [0, *sorted({r.time_ns >> IDENT_BITS for r in audits})]
        ident = row_of(audits[0])[0]
        sql = f"SELECT kind FROM records WHERE {IDENT_KEY} IN ({','.join(map(str, buckets))}) AND ident = ?"
        assert conn.execute(sql, (ident,)).fetchall() == [("audit",)]
        assert IDENT_INDEX_NAME in str(conn.execute("EXPLAIN QUERY PLAN " + sql, (ident,)).fetchall())
    finally:
        conn.close()


def test_the_bucket_is_the_stage_timestamps_for_audit_events_and_0_for_the_rest() -> None:
    lines = boundary_lines()
    expected = [(t >> IDENT_BITS) for t in (r.time_ns for r in _records_of(lines))]
    assert [identity_bucket("audit", line) for line in lines] == expected
    assert sorted(set(expected)) == list(range(EDGE - 1, EDGE + 4))  # both sides of four boundaries
    # Other spellings of the same instant: the same bucket.
    t = (EDGE * BUCKET // 10**9 + 5) * 10**9 + 5_000_000
    same = [stamp(t), stamp(t).replace("T", " "), stamp(t).replace("Z", "+00:00"), stamp(t)[:19] + ".005000Z"]
    assert len({identity_bucket("audit", _audit_line(1, stageTimestamp=s)) for s in same}) == 1
    for kind, body in (
        ("audit", _audit_line(1, stageTimestamp=None)),
        ("audit", _audit_line(1, stageTimestamp="yesterday")),
        ("audit", _audit_line(1, stageTimestamp=12)),
        ("audit", b"not json"),
        ("event", story()[2].json_bytes()),
        ("log", story()[3].json_bytes()),
        ("alert", _audit_line(1)),
        ("other", _audit_line(1)),
    ):
        assert identity_bucket(kind, body) == 0, (kind, body)


@needs_native
def test_native_rows_fall_in_the_bucket_python_gives_them(tmp_path: Path) -> None:
    """The native rows leave ibucket NULL (the index's default: their time's bucket, their time
    being the stageTimestamp); the Python path sets it from the body: the same for every line
    the native decoder takes, unusual times included."""
    lines = boundary_lines() + _edge_lines()
    path = tmp_path / "s.db"
    asyncio.run(write_all(path, _lazy(lines)))
    got = stored(path, f"ibucket, {IDENT_KEY}, kind, body")
    assert len(got) == len(lines)
    assert all(ibucket is None for ibucket, *_ in got)  # written natively
    assert [key for _, key, _, _ in got] == [identity_bucket(kind, body) for _, _, kind, body in got]  # type: ignore[arg-type]


def _paths(lines: list[bytes]) -> dict[str, Batch]:
    """The same audit events as each path brings them to the store."""
    tail = ParserRegistry().get("k8s_audit")
    assert tail is not None
    parsed, failed = tail.parse_lines(lines, "kube.audit")
    assert failed == 0
    identified = [Record(r.tag, r.time_ns, r.body, r.raw, (f"file-{n}", n)) for n, r in enumerate(parsed)]
    webhook, block = webhook_records(lines)
    read_later = ParserRegistry().get("json")  # no time key: stamped with the time it was read
    assert read_later is not None
    unparsed, _ = read_later.parse_lines(lines, "kube.audit")
    return {
        "native block": _lazy(lines),
        "tail records": Batch("kube.audit", identified),
        "webhook records": Batch("kube.audit", webhook),
        "webhook block": Batch("kube.audit", webhook, raw_block=block),
        "restamped 3 days later": Batch("kube.audit", restamped(identified, 3 * 86_400 * 10**9)),
        "read without a time key": Batch("kube.audit", unparsed),
    }


@pytest.mark.parametrize(
    "first",
    ["native block", "tail records", "webhook records", "restamped 3 days later", "read without a time key"],
)
def test_a_replay_through_any_other_path_changes_nothing(tmp_path: Path, first: str) -> None:
    lines = boundary_lines() + _edge_lines()
    paths = _paths(lines)
    order = [first] + [name for name in paths if name != first]
    counts = asyncio.run(write_all(tmp_path / "s.db", *(paths[name] for name in order)))
    assert counts == [len(lines)] * len(order), dict(zip(order, counts, strict=True))


def test_records_timed_by_their_source_are_unique_by_identity_alone(tmp_path: Path) -> None:
    """Events, log lines, alerts and an audit event without a stageTimestamp: a replay stamped
    a month later (another bucket) is still recognised."""
    records = [r for r in story() if r.tag != "kube.audit"] + alerts(story())
    records.append(Record("kube.audit", EDGE * BUCKET, orjson.loads(_audit_line(90, stageTimestamp=None))))
    records.append(Record("kube.audit", EDGE * BUCKET, orjson.loads(_audit_line(91, stageTimestamp="soon")),
                          identity=("a-91", "ResponseComplete")))  # fmt: skip
    month = 30 * 86_400 * 10**9
    counts = asyncio.run(
        write_all(tmp_path / "s.db", Batch("t", records), Batch("t", restamped(records, month)), Batch("t", records))
    )
    assert counts == [len(records)] * 3
    got = stored(tmp_path / "s.db", f"kind, {IDENT_KEY}")
    assert {kind for kind, _ in got} == {"event", "log", "alert", "audit"}
    assert {key for _, key in got} == {0}


def _v3_store(path: Path, rows: list[tuple[object, ...]]) -> None:
    """A store as kubetrail wrote it with schema 3: its identity index, no ibucket column."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA page_size=65536")
    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
    conn.execute("PRAGMA user_version=3")
    conn.executescript(V3_SCHEMA + ALERTS_SCHEMA)
    conn.executemany(INSERT, rows)
    conn.commit()
    conn.close()


def _v3_rows(lines: list[bytes]) -> tuple[list[tuple[object, ...]], list[Record]]:
    """Schema 3 rows of the three kinds a migration meets, and the records they came from:
    audit rows timed by their stageTimestamp (tail, webhook, native), audit rows a source
    stamped otherwise (then the stageTimestamp's bucket must be set), the story's other kinds."""
    records = _records_of(lines)
    half = len(records) // 2
    odd = restamped(records[half:], 86_400 * 10**9)  # read again a day later
    other = [r for r in story() if r.tag != "kube.audit"]
    untimed = Record("kube.audit", EDGE * BUCKET, orjson.loads(_audit_line(92, stageTimestamp=None)))
    everything = records[:half] + odd + other + [untimed]
    return [row_of(r) for r in everything], everything


def test_a_schema_3_store_is_read_as_it_is_and_migrated_by_the_next_writer(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    lines = boundary_lines() + [r.json_bytes() for r in story() if r.tag == "kube.audit"]
    rows, records = _v3_rows(lines)
    _v3_store(path, rows)
    history = ("history", "deploy/shop/web", "--logs")
    before = entries(path, *history)
    assert before
    reader = StoreBackend(path)  # a reader changes nothing
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (3,)
    counts = asyncio.run(write_all(path, Batch("t", records)))  # the writer migrates; a replay adds nothing
    assert counts == [len(rows)]
    ref = queries.parse_ref("deploy/shop/web")
    assert not isinstance(ref, str)
    assert reader.object_records(ref, None, None, True, 1000)  # the reader opened before goes on
    reader.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert IDENT_INDEX_NAME in indexes and "records_ident" not in indexes
        assert "records_user" not in indexes  # schema 5: user_bodies holds those rows' bodies
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        # Nothing of the records changed; only the restamped audit rows and the untimed one got
        # an ibucket (their stageTimestamp's bucket, and 0).
        assert conn.execute(f"SELECT {COLUMNS} FROM whole_records ORDER BY id").fetchall() == rows
        got = conn.execute(
            "SELECT ibucket, kind, body FROM whole_records WHERE ibucket IS NOT NULL ORDER BY id"
        ).fetchall()
        assert len(got) == len(lines) - len(lines) // 2 + 1
        assert [ibucket for ibucket, _, _ in got] == [identity_bucket(kind, body) for _, kind, body in got]
        assert got[-1][0] == 0
    # Every path's replay of every record still adds nothing.
    assert set(asyncio.run(write_all(path, *_paths(lines).values()))) == {len(rows)}
    assert entries(path, *history) == before


def test_a_failed_migration_from_schema_3_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    rows, _ = _v3_rows(boundary_lines())
    _v3_store(path, rows)
    with sqlite3.connect(path) as conn:  # the new index's name, taken: CREATE INDEX fails
        conn.execute(f"CREATE TABLE {IDENT_INDEX_NAME} (x)")
    writer = StoreWriter(path)
    with pytest.raises(Exception, match=rf"cannot migrate .* from store schema 3 to 8: .*{IDENT_INDEX_NAME}"):
        writer.open()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (3,)
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "records_ident" in indexes and "records_user" in indexes
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'user_bodies'").fetchone() == (0,)
        columns = {r[1] for r in conn.execute("PRAGMA table_info(records)")}
        assert "ibucket" not in columns  # the ALTER TABLE rolled back with the rest
        assert conn.execute(f"SELECT {COLUMNS} FROM records ORDER BY id").fetchall() == rows


def test_audit_records_are_found_by_identity_in_every_bucket(tmp_path: Path) -> None:
    """``triggers_of`` (an alert's audit records, asked with the alert's time: its record's)
    finds records on both sides of bucket boundaries, in bucket 0 and restamped ones, in a store
    of schema 3 (no bucket), 6 (every bucket named) and 7 (buckets near the time, else the time)."""
    lines = [*boundary_lines(), _audit_line(93, stageTimestamp=None)]
    rows, records = _v3_rows(lines)
    v3, v6, v7 = tmp_path / "v3.db", tmp_path / "v6.db", tmp_path / "v7.db"
    _v3_store(v3, rows)
    for path in (v6, v7):
        asyncio.run(write_all(path, Batch("t", records)))
    to_schema_6(v6)
    ids = [f"a-{n}" for n in range(len(boundary_lines()))] + ["a-92", "a-93", "a-none"]
    times = {r.body["auditID"]: r.time_ns for r in records if r.body.get("auditID") in ids}
    asked = [(audit_id, times.get(audit_id, EDGE * BUCKET)) for audit_id in ids]
    found = {}
    for path in (v3, v6, v7):
        backend = StoreBackend(path)
        try:
            assert backend.ident_bits == {v3: None, v6: 46, v7: IDENT_BITS}[path]
            found[path] = sorted((r.body["auditID"], r.time_ns) for r in backend.triggers_of(asked))
        finally:
            backend.close()
    expected = sorted((r.body["auditID"], r.time_ns) for r in records if r.body.get("auditID") in ids)
    assert found[v3] == found[v6] == found[v7] == expected
    assert len(expected) == len(lines) + 1  # a-92 is _v3_rows' own untimed event


def test_an_alert_finds_the_stages_of_its_request_near_its_time(tmp_path: Path) -> None:
    """Schema 7 looks for an alert's request from its time: a stage up to 4 buckets (4.3 s)
    before it is found; a watch's ResponseStarted ten minutes before its end is not (schema 6,
    naming every bucket, finds it: the price of the finer bucket, said in triggers_of)."""
    end = EDGE * BUCKET + BUCKET // 2
    stages = [
        ("a-1", "RequestReceived", end - 3 * 10**9),
        ("a-1", "ResponseComplete", end),
        ("a-2", "ResponseStarted", end - 600 * 10**9),
        ("a-2", "ResponseComplete", end + 10**6),
    ]
    lines = [_audit_line(0, auditID=a, stage=stage, stageTimestamp=stamp(t)) for a, stage, t in stages]
    v6, v7 = tmp_path / "v6.db", tmp_path / "v7.db"
    for path in (v6, v7):
        asyncio.run(write_all(path, _lazy(lines)))
    to_schema_6(v6)
    asked = [("a-1", end), ("a-2", end + 10**6)]
    found = {}
    for path in (v6, v7):
        backend = StoreBackend(path)
        try:
            found[path] = sorted((r.body["auditID"], r.body["stage"]) for r in backend.triggers_of(asked))
        finally:
            backend.close()
    assert found[v6] == sorted((a, stage) for a, stage, _ in stages)
    assert found[v7] == [("a-1", "RequestReceived"), ("a-1", "ResponseComplete"), ("a-2", "ResponseComplete")]


def test_a_schema_6_store_is_migrated_to_buckets_of_a_second_by_the_next_writer(tmp_path: Path) -> None:
    """Schema 7 sets every audit row's bucket at its width (NULL where its time's own) and builds
    the identity index anew in one transaction: a replay through every path still adds nothing,
    and the answers stay the same."""
    lines = boundary_lines() + _edge_lines() + [r.json_bytes() for r in story() if r.tag == "kube.audit"]
    paths = _paths(lines)
    path = tmp_path / "s.db"
    half = len(lines) // 2
    tail = paths["tail records"].records
    restamped_ = paths["restamped 3 days later"].records
    # Rows of the Python path (ibucket set; some restamped) and of the native one (NULL).
    asyncio.run(write_all(path, Batch("t", tail[: half // 2] + restamped_[half // 2 : half]), _lazy(lines[half:])))
    asyncio.run(write_all(path, Batch("t", [r for r in story() if r.tag != "kube.audit"])))
    to_schema_6(path)
    history = ("history", "deploy/shop/web", "--logs")
    before = entries(path, *history)
    assert before
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM records WHERE ibucket > 0").fetchone()[0] == half
        count = conn.execute("SELECT count(*) FROM records").fetchone()[0]
        audits = conn.execute("SELECT count(*) FROM records WHERE kind = 'audit'").fetchone()[0]
    reader = StoreBackend(path)
    assert reader.ident_bits == 46 and reader.uid_bits is None
    assert set(asyncio.run(write_all(path, *paths.values()))) == {count}  # migrated; replays add nothing
    assert reader.triggers_of([("a-0", tail[0].time_ns)]) and reader.ident_bits == IDENT_BITS
    assert reader.uid_ref("no-such-uid") is None and reader.uid_bits is not None
    reader.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert IDENT_INDEX_NAME in indexes and OLD_IDENT_INDEX_NAME not in indexes
        assert "records_uid_segment" in indexes and "records_uid" not in indexes
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        got = conn.execute("SELECT ibucket, time_ns, kind, body FROM whole_records WHERE kind = 'audit'").fetchall()
        assert len(got) == audits > half
        for ibucket, time_ns, kind, body in got:
            bucket = identity_bucket(kind, body)
            assert ibucket == (None if bucket == time_ns >> IDENT_BITS else bucket), (ibucket, time_ns, body)
        assert sum(ibucket is not None for ibucket, *_ in got) >= half - half // 2  # the restamped rows
    assert entries(path, *history) == before
