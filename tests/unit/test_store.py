"""The ``sqlite`` output (the embedded store): columns, idempotence, ack after commit, kill -9,
retention, a real full disk (a small tmpfs, as root), bad files left untouched, one writer."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import orjson
import pytest

from kubetrail.core.errors import RetryableError
from kubetrail.core.record import Batch, Record
from kubetrail.history.model import HistoryError
from kubetrail.history.store import Filters, StoreBackend
from kubetrail.sinks.sqlite import SCHEMA_VERSION, SqliteSink, StoreError, StoreWriter, open_reader, row_of
from tests.unit.helpers import build
from tests.unit.history_story import T0, UID_WEB, story

REPO = Path(__file__).resolve().parents[2]


def sink(path: Path, **props: object) -> SqliteSink:
    return build(SqliteSink, path=str(path), **props)  # type: ignore[no-any-return]


async def write(s: SqliteSink, *batches: list[Record]) -> None:
    await s.start()
    for records in batches:
        await s.write(Batch("t", records))


def rows(path: Path) -> list[tuple[object, ...]]:
    conn = open_reader(path)
    try:
        return conn.execute(
            "SELECT kind, user, verb, resource, namespace, name, uid, code, reason, body FROM whole_records ORDER BY id"
        ).fetchall()
    finally:
        conn.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_columns_and_the_whole_record(tmp_path: Path) -> None:
    s = sink(tmp_path / "s.db")
    await write(s, story())
    await s.close()
    got = rows(tmp_path / "s.db")
    assert len(got) == len(story())
    columns = [r[:9] for r in got]
    assert columns[1] == ("audit", "alice", "create", "deployments", "shop", "web", UID_WEB, 201, None)
    assert columns[2][:7] == ("event", None, None, "deployments", "shop", "web", None)
    assert columns[2][8] == "ScalingReplicaSet"
    assert columns[3] == ("log", None, None, "pods", "shop", "web-6d4b8-x7k2p", story()[3].body["kubernetes"]["pod_id"],
                          None, "app")  # fmt: skip
    assert columns[9][:6] == ("event", None, None, "pods", "shop", "web-6d4b8-x7k2p")
    assert columns[12][:8] == ("audit", "mallory", "delete", "deployments", "shop", "web", None, 403)
    # The whole record beside its columns, byte for byte what the pipeline delivered.
    assert [r[9] for r in got] == [r.json_bytes() for r in story()]


async def test_a_replay_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    s = sink(path)
    await write(s, story())
    before = rows(path)
    await write(s, story(), story()[3:7])  # the same occurrences again, whole and in part
    assert rows(path) == before
    await s.close()
    s2 = sink(path)  # and after a restart
    await write(s2, story())
    await s2.close()
    assert rows(path) == before


def test_a_record_without_identity_is_keyed_by_its_content() -> None:
    a = Record("t", T0, {"msg": "x"})
    assert row_of(a)[0] == row_of(Record("t", T0, {"msg": "x"}))[0]
    assert row_of(a)[0] != row_of(Record("t", T0 + 1, {"msg": "x"}))[0]
    assert row_of(a)[2] == "other"


async def test_acknowledged_means_committed_and_visible_to_a_reader(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    s = sink(path)
    await write(s, story()[:2])
    reader = open_reader(path)  # a reader open while the writer goes on (WAL)
    assert reader.execute("SELECT count(*) FROM records").fetchone()[0] == 2
    await s.write(Batch("t", story()[2:]))
    # write() returned: the commit is done, a new read transaction sees every row.
    assert reader.execute("SELECT count(*) FROM records").fetchone()[0] == len(story())
    assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reader.close()
    await s.close()


_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {repo!r})
    from kubetrail.core.record import Batch, Record
    from kubetrail.sinks.sqlite import SqliteSink
    from tests.unit.helpers import build

    async def main():
        s = build(SqliteSink, path={path!r})
        await s.start()
        n = 0
        while True:
            records = [Record("t", n * 1000 + i, {{"n": n, "i": i, "pad": "x" * 300}}, identity=("w", n, i))
                       for i in range(500)]
            await s.write(Batch("t", records))
            print(n, flush=True)  # acknowledged
            n += 1

    asyncio.run(main())
    """
)


def kill_9_after_acks(script: str, path: Path, acks: int = 16) -> tuple[int, sqlite3.Connection]:
    """Runs a writer ``script`` (``{repo}``/``{path}`` filled in; it prints each batch's number
    once acknowledged) until ``acks`` batches are acknowledged, SIGKILLs it mid-stream (the next
    batch may be half written), reopens the store (replaying the WAL) and checks its integrity.
    Returns the last acknowledged batch and a reader."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script.format(repo=str(REPO), path=str(path))], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    acked = -1
    for line in proc.stdout:
        acked = int(line)
        if acked >= acks - 1:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # A writer that died on its own (a broken script) acknowledged nothing: the test must fail.
    assert acked == acks - 1, f"the writer acknowledged {acked + 1} batches, not {acks}"
    writer = StoreWriter(path)
    writer.open()
    writer.close()
    conn = open_reader(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    return acked, conn


def test_kill_9_keeps_every_acknowledged_batch(tmp_path: Path) -> None:
    acked, conn = kill_9_after_acks(_WRITER, tmp_path / "s.db")
    batches = conn.execute("SELECT json_extract(body, '$.n'), count(*) FROM records GROUP BY 1").fetchall()
    conn.close()
    counts = dict(batches)
    assert all(counts.get(n) == 500 for n in range(acked + 1)), "an acknowledged batch is missing"
    assert all(count == 500 for count in counts.values()), "a batch was stored in part"


async def test_retention_by_age(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path / "s.db", retention_time=3600)
    writer.open()
    now = time.time_ns()
    old = [Record("t", now - 7200 * 10**9 + i, {"i": i}) for i in range(100)]
    new = [Record("t", now - 60 * 10**9 + i, {"i": i}) for i in range(50)]
    writer.write([row_of(r) for r in old + new])  # the check after this commit removes the old ones
    assert writer.deleted == 100
    assert writer.apply_retention(now_ns=now + 3600 * 10**9) == 50  # an hour later, the rest
    assert writer.conn is not None
    assert writer.conn.execute("SELECT count(*) FROM records").fetchone()[0] == 0
    writer.close()


async def test_retention_by_size_keeps_the_newest(tmp_path: Path) -> None:
    limit = 2 * 1024 * 1024
    s = sink(tmp_path / "s.db", retention_size="2M", retention_interval=0)
    await s.start()
    for n in range(30):  # ~6 MB in all
        await s.write(Batch("t", [Record("t", n * 1000 + i, {"n": n, "pad": "y" * 800}) for i in range(250)]))
    used = s.writer.used_bytes()
    await s.close()
    assert used <= limit
    conn = open_reader(tmp_path / "s.db")
    kept = [n for (n,) in conn.execute("SELECT DISTINCT json_extract(body, '$.n') FROM records ORDER BY 1")]
    conn.close()
    assert kept[-1] == 29 and kept[0] > 0  # the oldest went first, the newest stayed
    assert (tmp_path / "s.db").stat().st_size < 3 * limit  # freed pages are reused: the file stops growing


@pytest.fixture
def tiny_disk(tmp_path: Path) -> object:
    """A real 2 MiB filesystem (tmpfs), so SQLite meets a real ENOSPC/SQLITE_FULL."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def write_until_full(s: SqliteSink, disk: Path, batch: Callable[[int], Batch]) -> tuple[list[int], int]:
    """Writes ``batch(0)``, ``batch(1)``... until the disk is full (the write must fail saying
    so), then makes room again (the operator grows the volume). Returns the acknowledged
    batches and the one that failed."""
    acked: list[int] = []
    failed_at = None
    for n in range(400):
        try:
            await s.write(batch(n))
            acked.append(n)
        except RetryableError as exc:
            assert "full" in str(exc)
            failed_at = n
            break
    assert failed_at is not None, "the disk never filled"
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
    return acked, failed_at


async def test_a_full_disk_stops_acknowledging_and_loses_nothing(tiny_disk: Path) -> None:
    path = tiny_disk / "s.db"
    s = sink(path)
    await s.start()

    def batch(n: int) -> Batch:
        records = [Record("t", n * 1000 + i, {"n": n, "pad": "z" * 200}, identity=("d", n, i)) for i in range(100)]
        return Batch("t", records)

    acked, failed_at = await write_until_full(s, tiny_disk, batch)
    await s.write(batch(failed_at))  # the same batch, retried with room again, goes in once
    await s.close()
    conn = open_reader(path)
    counts = dict(conn.execute("SELECT json_extract(body, '$.n'), count(*) FROM records GROUP BY 1").fetchall())
    conn.close()
    assert counts == {n: 100 for n in [*acked, failed_at]}


async def test_bad_files_are_refused_and_left_unchanged(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.db"
    good = sink(corrupt)
    await write(good, story())
    await good.close()
    with corrupt.open("r+b") as damaged:  # a store whose pages were overwritten (a bad disk, a stray write)
        damaged.seek(65536 + 16)
        damaged.write(b"\xff" * 65536)
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    newer = tmp_path / "newer.db"
    good = sink(newer)
    await write(good, story()[:2])
    await good.close()
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    expected = {
        corrupt: "corrupt",
        foreign: "not a kubetrail store",
        newer: f"newer kubetrail (store schema {SCHEMA_VERSION + 1}",
    }
    for path, message in expected.items():
        before = sha(path)
        s = sink(path)
        with pytest.raises(RetryableError, match=re.escape(message)):
            await s.start()
        if path == corrupt:
            # A reader does not check every page when it opens (a 10 GB store would take long):
            # the query that meets the damage says so.
            backend = StoreBackend(path)
            with pytest.raises(HistoryError, match=r"cannot read store .*malformed"):
                backend.search(Filters(), None, None, 100)
            backend.close()
        else:
            with pytest.raises(StoreError):
                open_reader(path)
        assert sha(path) == before, f"{path.name} was changed"


async def test_one_writer_many_readers(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    first = sink(path)
    await write(first, story()[:3])
    second = sink(path)
    with pytest.raises(RetryableError, match="in use by another writer"):
        await second.start()
    readers = [open_reader(path) for _ in range(3)]
    assert [r.execute("SELECT count(*) FROM records").fetchone()[0] for r in readers] == [3, 3, 3]
    for r in readers:
        r.close()
    await first.close()
    await second.start()  # the lock went with the first writer
    await second.close()


def test_the_store_is_written_by_a_real_pipeline(tmp_path: Path) -> None:
    """tail of an audit log + the kubernetes_audit filter -> sqlite, run as `kubetrail run`; run
    twice from scratch offsets: the second run's replay adds nothing."""
    from tests.unit.run_helpers import run_config

    audit_lines = [r.json_bytes().decode() for r in story() if r.tag == "kube.audit"]
    (tmp_path / "audit.log").write_text("\n".join(audit_lines) + "\n")
    config = tmp_path / "p.conf"
    config.write_text(
        textwrap.dedent(
            f"""
            [SERVICE]
                log_level warn
            [INPUT]
                name           tail
                path           {tmp_path}/audit.log
                parser         k8s_audit
                read_from_head on
                exit_on_eof    on
                tag            kube.audit
            [FILTER]
                name  kubernetes_audit
                match kube.audit
            [OUTPUT]
                name  sqlite
                match *
                path  {tmp_path}/store/s.db
            """
        )
    )
    for _ in range(2):
        done = run_config(config)
        assert done.returncode == 0, done.stderr
    got = rows(tmp_path / "store" / "s.db")
    # 10 audit lines, RequestReceived and ResponseComplete of one request are two occurrences.
    assert len(got) == len(audit_lines)
    assert {r[0] for r in got} == {"audit"}
    assert sorted({r[1] for r in got}) == ["alice", "bob", "carol", "mallory", "system:serviceaccount:ci:default"]


async def test_two_workers_share_the_writer(tmp_path: Path) -> None:
    """With ``workers 2`` the runner calls write_group concurrently: the commits take turns."""
    s = sink(tmp_path / "s.db")
    await s.start()
    groups = [
        [Batch("t", [Record("t", g * 10**6 + n * 1000 + i, {"g": g, "n": n}, identity=(g, n, i)) for i in range(200)])]
        for g in range(2)
        for n in range(10)
    ]
    await asyncio.gather(*(s.write_group(group) for group in groups))
    await s.close()
    conn = open_reader(tmp_path / "s.db")
    assert conn.execute("SELECT count(*) FROM records").fetchone()[0] == 2 * 10 * 200
    conn.close()


# -- the native path: blocks of audit events decoded and inserted without the GIL ----------------

try:
    from kubetrail_native import TimeFormat as _TimeFormat

    from kubetrail.sinks.sqlite import _one_sqlite_in_process, _StoreInserter, native_rows

    _NATIVE = _StoreInserter is not None
except ImportError:  # pragma: no cover - depends on the installation
    _NATIVE = False
needs_native = pytest.mark.skipif(not _NATIVE, reason="kubetrail_native is not built (scripts/setup builds it)")
_RFC3339 = _TimeFormat(None, 0) if _NATIVE else None


def _audit_line(n: int, **changes: object) -> bytes:
    body: dict[str, object] = {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": "Metadata",
        "auditID": f"a-{n}",
        "stage": "ResponseComplete",
        "requestURI": f"/api/v1/namespaces/ns-{n % 3}/pods/p-{n}",
        "verb": "get",
        "user": {"username": f"user-{n % 5}", "groups": ["system:authenticated"]},
        "sourceIPs": ["10.0.0.1"],
        "objectRef": {"resource": "pods", "namespace": f"ns-{n % 3}", "name": f"p-{n}", "apiVersion": "v1"},
        "responseStatus": {"metadata": {}, "code": 200},
        "requestReceivedTimestamp": "2026-12-05T06:00:00.000001Z",
        "stageTimestamp": f"2026-12-05T06:00:{n % 60:02d}.{n:06d}Z",
    }
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return orjson.dumps(body)


def _records_of(lines: list[bytes], tag: str = "kube.audit") -> list[Record]:
    """The records tail (k8s_audit parser: time from stageTimestamp) would make of ``lines``; a
    line that is not JSON (to msgspec, the reference) is kept under ``log``, as the tail does."""
    assert _RFC3339 is not None
    out = []
    for line in lines:
        try:
            body = msgspec.json.decode(line)
        except msgspec.DecodeError:
            out.append(Record(tag, T0, {"log": line.decode(errors="replace")}, identity=("file", len(out))))
            continue
        stamp = body.get("stageTimestamp") if isinstance(body, dict) else None
        time_ns = _RFC3339.parse_ns(stamp) if isinstance(stamp, str) else None
        out.append(Record(tag, time_ns if time_ns is not None else T0, raw=line, identity=("file", len(out))))
    return out


def _lazy(lines: list[bytes], tag: str = "kube.audit") -> Batch:
    """A batch as tail -> kubernetes_audit hands it on: a block, records built only if asked."""
    return Batch(
        tag, None, raw_block=b"".join(line + b"\n" for line in lines), materialize=lambda: _records_of(lines, tag),
        count=len(lines),
    )  # fmt: skip


def _edge_lines() -> list[bytes]:
    return [
        *(r.json_bytes() for r in story() if r.tag == "kube.audit"),
        # a create with generateName: the name (and uid) only in the response
        _audit_line(
            1,
            verb="create",
            objectRef={"resource": "pods", "namespace": "ns-1"},
            responseObject={"kind": "Pod", "metadata": {"name": "web-x1", "uid": "u-1"}},
        ),
        # the response names another object: its uid is not this one's
        _audit_line(2, responseObject={"metadata": {"name": "other", "uid": "u-2"}}),
        _audit_line(3, objectRef={"resource": "pods", "name": "p-3", "uid": "u-3", "subresource": "exec"}),
        _audit_line(6, responseObject={"metadata": None}),
        _audit_line(7, user={"username": 'a "quoted" name\u00e9\\'}, responseStatus=None),
        _audit_line(8, stageTimestamp="2026-12-05T08:00:00.123456789+02:00"),
        _audit_line(9, user=None, objectRef=None, verb=None),
        # flattened by kubernetes_audit: its prefix first, the event's members after
        b'{"time":"2026-12-05T06:00:10.000010Z","k8s.audit.id":"a-10","user.name":"flat",'
        + _audit_line(10, verb="patch")[1:],
    ]


@needs_native
def test_native_rows_are_row_of() -> None:
    """The native decoder gives exactly the Python rows (time from stageTimestamp, as tail's
    k8s_audit parser and the webhook give the record), for ordinary and unusual events."""
    lines = _edge_lines()
    got = native_rows("kube.audit", b"".join(line + b"\n" for line in lines))
    assert got is not None
    assert got == [row_of(record) for record in _records_of(lines)]
    names = {row[7] for row in got}
    assert "web-x1" in names and "p-3" in names  # the create's name from its response; the ref's uid
    assert {row[8] for row in got} >= {"u-1", "u-3"} and "u-2" not in {row[8] for row in got}


@needs_native
@pytest.mark.parametrize(
    "line",
    [
        b'{"kind":"Event","involvedObject":{"kind":"Pod","name":"p"},"reason":"Pulled"}',  # a Kubernetes Event
        b'{"log":"hello","kubernetes":{"pod_name":"p","namespace_name":"n"}}',  # a container log line
        b'{"rule":"r","priority":"Warning","output":"o","k8s.audit.id":"a","k8s.audit.stage":"ResponseComplete"}',
        b"not json",
        _audit_line(20)[:-1] + b',"verb":"delete"}',  # a repeated key: msgspec takes the last
        _audit_line(21, stageTimestamp=None),
        _audit_line(22, user="alice"),  # a member of another type: msgspec stores it as "other"
        _audit_line(23, responseStatus={"code": 200.5}),
        _audit_line(24, user={"username": "\\ud800"}).replace(b"\\\\ud800", b"\\ud800"),  # a lone surrogate
        _audit_line(25, responseObject="not an object"),  # msgspec: object or null
        _audit_line(26, responseObject=[1, 2]),
        _audit_line(27, user=["alice"]),  # an array where an object belongs
        _audit_line(28, objectRef=["pods", "ns", "p"]),
        _audit_line(29, responseStatus=[200]),
        b'["a-1", "ResponseComplete", "2026-12-05T06:00:00Z"]',
    ],
    ids=[
        "event",
        "log",
        "alert",
        "not-json",
        "repeated-key",
        "no-stage-time",
        "user-string",
        "float-code",
        "surrogate",
        "response-string",
        "response-array",
        "user-array",
        "ref-array",
        "status-array",
        "array",
    ],
)
async def test_a_block_the_native_decoder_does_not_take_goes_the_python_way(tmp_path: Path, line: bytes) -> None:
    lines = [_audit_line(30), line, _audit_line(31)]
    assert native_rows("kube.audit", b"".join(x + b"\n" for x in lines)) is None
    s = sink(tmp_path / "s.db")
    await s.start()
    assert s.writer.native is not None
    await s.write(_lazy(lines))
    await s.close()
    conn = open_reader(tmp_path / "s.db")
    stored = conn.execute("SELECT ident, time_ns, kind, user, verb, resource, namespace, name, uid, code, reason,"
                          " tag, body FROM whole_records ORDER BY id").fetchall()  # fmt: skip
    conn.close()
    assert stored == [row_of(r) for r in _records_of(lines)]


def _all_rows(path: Path) -> list[tuple[object, ...]]:
    conn = open_reader(path)
    try:
        return conn.execute(
            "SELECT ident, time_ns, kind, user, verb, resource, namespace, name, uid, code, reason, tag, body"
            " FROM whole_records ORDER BY id"
        ).fetchall()
    finally:
        conn.close()


@needs_native
async def test_the_native_writer_stores_what_python_stores(tmp_path: Path) -> None:
    """The same events as blocks (native writer) and as records (Python, ``native`` off): the
    same rows; a replay either way adds nothing; a group mixing both kinds of batch."""
    assert _one_sqlite_in_process()  # this machine's Python links the system libsqlite3
    lines = [_audit_line(n) for n in range(100, 2600)] + _edge_lines()  # other auditIDs than the edge lines'
    chunks = [lines[start : start + 1000] for start in range(0, len(lines), 1000)]
    fast = sink(tmp_path / "native.db")
    await fast.start()
    assert fast.writer.native is not None
    await fast.write_group([_lazy(chunk) for chunk in chunks])
    slow = sink(tmp_path / "python.db")
    slow.writer.use_native = False
    await slow.start()
    assert slow.writer.native is None
    await slow.write_group([Batch("kube.audit", _records_of(chunk)) for chunk in chunks])
    await slow.close()
    assert _all_rows(tmp_path / "native.db") == _all_rows(tmp_path / "python.db")
    # Without the native writer (another SQLite in the process, say) blocks still get the
    # native rows, inserted through Python's sqlite3.
    middle = sink(tmp_path / "rows.db")
    middle.writer.use_native = False
    await middle.start()
    await middle.write_group([_lazy(chunk) for chunk in chunks])
    await middle.close()
    assert _all_rows(tmp_path / "rows.db") == _all_rows(tmp_path / "python.db")
    assert len(_all_rows(tmp_path / "native.db")) == len(lines)
    # Replays: as blocks, as records (another identity on the record: the event's own counts),
    # and a group mixing a block, records and a block the native decoder declines.
    await fast.write_group([_lazy(chunk) for chunk in chunks])
    await fast.write(Batch("kube.audit", _records_of(lines[:10])))
    event = story()[2].json_bytes()
    await fast.write_group([_lazy(lines[:5]), Batch("kube.audit", _records_of(lines[5:9])), _lazy([lines[9], event])])
    # New events, then a block with an Event line: the native writer has inserted the first
    # block when it meets the second; it rolls back and the group goes the Python way, once.
    fresh = [_audit_line(n) for n in range(5000, 5100)]
    second = [*fresh[60:], story()[9].json_bytes()]
    await fast.write_group([_lazy(fresh[:60]), _lazy(second)])
    await fast.close()
    stored = _all_rows(tmp_path / "native.db")
    assert len(stored) == len(lines) + 1 + 101  # only the Events and the fresh events were new
    assert [row[2] for row in stored[len(lines) :]] == ["event"] + ["audit"] * 100 + ["event"]
    assert stored[len(lines) + 1 :] == [row_of(r) for r in [*_records_of(fresh[:60]), *_records_of(second)]]
    assert fast.m_new._value.get() == len(lines) + 102  # type: ignore[attr-defined]


_NATIVE_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {repo!r})
    from kubetrail.core.record import Batch
    from kubetrail.sinks.sqlite import SqliteSink
    from tests.unit.helpers import build
    from tests.unit.test_store import _audit_line, _lazy

    async def main():
        s = build(SqliteSink, path={path!r})
        await s.start()
        assert s.writer.native is not None
        n = 0
        while True:
            await s.write(_lazy([_audit_line(n * 500 + i, verb=f"v{{n}}") for i in range(500)]))
            print(n, flush=True)  # acknowledged
            n += 1

    asyncio.run(main())
    """
)


@needs_native
def test_kill_9_keeps_every_batch_the_native_writer_acknowledged(tmp_path: Path) -> None:
    acked, conn = kill_9_after_acks(_NATIVE_WRITER, tmp_path / "s.db")
    counts = dict(conn.execute("SELECT verb, count(*) FROM records GROUP BY 1").fetchall())
    conn.close()
    assert all(counts.get(f"v{n}") == 500 for n in range(acked + 1)), "an acknowledged batch is missing"
    assert all(count == 500 for count in counts.values()), "a batch was stored in part"


@needs_native
async def test_a_full_disk_stops_the_native_writer_and_loses_nothing(tiny_disk: Path) -> None:
    path = tiny_disk / "s.db"
    s = sink(path)
    await s.start()
    assert s.writer.native is not None

    def batch(n: int) -> Batch:
        return _lazy([_audit_line(n * 100 + i, verb=f"v{n}") for i in range(100)])

    acked, failed_at = await write_until_full(s, tiny_disk, batch)
    await s.write(batch(failed_at))
    await s.close()
    conn = open_reader(path)
    counts = dict(conn.execute("SELECT verb, count(*) FROM records GROUP BY 1").fetchall())
    conn.close()
    assert counts == {f"v{n}": 100 for n in [*acked, failed_at]}


def _flattened(lines: list[bytes], native_scan: bool) -> list[bytes]:
    """``lines`` as the kubernetes_audit filter hands them on (its flat members in front)."""
    from kubetrail.transforms.kubernetes_audit import KubernetesAuditTransform

    flt = build(KubernetesAuditTransform, dedupe="off")
    if not native_scan:
        flt.native = None  # its pure-Python scan, the reference
    out = flt.process_batch(Batch("kube.audit", _records_of(lines)))
    return [record.json_bytes() for record in out.records]


_SECRET_READ = _audit_line(
    40,
    level="RequestResponse",
    objectRef={"resource": "secrets", "namespace": "shop", "name": "db"},
    responseObject={"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "db"}, "data": {"pw": "aHVudGVyMg=="}},
)


@needs_native
@pytest.mark.parametrize("native_scan", [True, False], ids=["native-scan", "python-scan"])
def test_the_store_keeps_the_event_without_the_filters_copies(native_scan: bool) -> None:
    """An audit event is stored as the API server wrote it, without the members the
    kubernetes_audit filter copied in front (about as many bytes again); both paths alike. A
    Secret the filter redacted keeps them (its ``k8s.audit.redacted`` is no copy)."""
    lines = [*_edge_lines(), _SECRET_READ]
    flat = _flattened(lines, native_scan)
    assert all(f.startswith(b'{"time":') and len(f) > len(line) for f, line in zip(flat, lines, strict=True))
    python = [row_of(record) for record in _records_of(flat)]
    assert native_rows("kube.audit", b"".join(f + b"\n" for f in flat)) == python
    # The events' own bytes; the line that came flattened already loses both runs of copies; a
    # redacted event (the story's Secret read too) is kept whole, redacted.
    redacted = [b'"k8s.audit.redacted":true' in f for f in flat]
    assert sum(redacted) == 2 and redacted[-1]
    for f, line, row in zip(flat[:-2], lines[:-2], python[:-2], strict=True):
        assert row[12] == (f if b'"k8s.audit.redacted":true' in f else line)
    assert python[-2][12] == b"{" + lines[-2][lines[-2].index(b'"kind"') :]
    assert python[-1][12] == flat[-1] and b"aHVudGVy" not in flat[-1]
    # The columns are the same as from the events themselves (the twice-flattened line aside).
    plain = [row_of(r) for r in _records_of(lines)]
    assert [row[:12] for row in python[:-1]] == [row[:12] for row in plain[:-1]]


@needs_native
def test_a_prefix_that_is_not_the_filters_is_kept() -> None:
    """Only the filter's exact members are taken off: anything else stays in the body."""
    line = _audit_line(41)
    kept = [
        b'{"time":"x","user.name":"u",' + line[1:],  # no k8s.audit.id among them
        b'{"time":"x","k8s.audit.id":"a-41","k8s.audit.redacted":true,' + line[1:],
        b'{"time": "x","k8s.audit.id":"a-41",' + line[1:],  # not the filter's compact form
        b'{"other":1,"k8s.audit.id":"a-41",' + line[1:],
    ]
    for body in kept:
        (row,) = native_rows("kube.audit", body + b"\n") or [None]
        assert row is not None and row[12] == body, body[:60]
        (python,) = [row_of(r) for r in _records_of([body])]
        assert python[12] == body
    # Values of every shape the filter writes (escapes, negative numbers, empty and escaped
    # arrays, booleans) are passed over alike by the native scan and the pattern.
    stripped = [
        b'{"time":"a\\"b\\\\","k8s.audit.id":"a-41","http.response.status_code":-1,"user.groups":[],',
        b'{"k8s.audit.id":"a-41","k8s.audit.source_ips":["1","2\\"x"],"user.name":"\\u00e9",',
        b'{"k8s.audit.id":"a-41","user.groups":["a"],"k8s.audit.verb":"get",',
    ]
    for prefix in stripped:
        body = prefix + line[1:]
        (row,) = native_rows("kube.audit", body + b"\n") or [None]
        (python,) = [row_of(r) for r in _records_of([body])]
        assert row is not None and row[12] == python[12] == line, prefix


async def test_a_cleanly_closed_store_is_not_read_through_at_the_next_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full quick_check runs only after an unclean close or a change since the clean one."""
    from kubetrail.sinks import sqlite as sqlite_sink

    checks: list[Path] = []
    check = sqlite_sink._quick_check
    monkeypatch.setattr(sqlite_sink, "_quick_check", lambda conn, path: (checks.append(path), check(conn, path)))
    path = tmp_path / "s.db"
    first = sink(path)
    await write(first, story()[:3])
    await first.close()
    assert Path(f"{path}-clean").exists()
    again = sink(path)
    await write(again, story()[3:5])
    assert not Path(f"{path}-clean").exists(), "a writer at work leaves no marker"
    assert checks == []  # left clean: not read through
    # A crash (what kill -9 leaves: connections gone, no clean close): the next writer checks.
    writer = again.writer
    if writer.native is not None:
        writer.native.close()
    assert writer.conn is not None and writer._lock_fd is not None
    writer.conn.close()
    os.close(writer._lock_fd)
    third = sink(path)
    await write(third, story()[5:6])
    await third.close()
    assert checks == [path]
    # Changed since the clean close (same size: pages overwritten): checked, and refused.
    with path.open("r+b") as damaged:
        damaged.seek(65536 + 16)
        damaged.write(b"\xff" * 65536)
    fourth = sink(path)
    with pytest.raises(RetryableError, match="corrupt"):
        await fourth.start()
    assert checks == [path, path]


async def test_a_reader_open_at_the_writers_close_does_not_cost_the_next_open_a_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader left open (the UI in the agent's process, `kubetrail history` in another) keeps
    the WAL file: the writer's close checkpoints every frame and empties it, so the close is
    still clean and the next writer does not read the store through. A reader in the middle of
    a read at that moment keeps its frames: then no marker, and the next open checks."""
    from kubetrail.sinks import sqlite as sqlite_sink

    checks: list[Path] = []
    check = sqlite_sink._quick_check
    monkeypatch.setattr(sqlite_sink, "_quick_check", lambda conn, path: (checks.append(path), check(conn, path)))
    path = tmp_path / "s.db"
    wal = Path(f"{path}-wal")
    first = sink(path)
    await write(first, story()[:3])
    reader = open_reader(path)
    assert reader.execute("SELECT count(*) FROM records").fetchone()[0] == 3
    await first.close()
    assert wal.exists() and wal.stat().st_size == 0, "the reader keeps the file, the frames are in the store"
    assert Path(f"{path}-clean").exists()
    assert reader.execute("SELECT count(*) FROM records").fetchone()[0] == 3
    again = sink(path)
    await write(again, story()[3:5])
    assert checks == []
    # Mid-read at the close: the checkpoint cannot empty the WAL, and is not waited for.
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM records").fetchone()[0] == 5
    await write(again, story()[5:6])
    started = time.monotonic()
    await again.close()
    assert time.monotonic() - started < 2
    assert wal.stat().st_size > 0 and not Path(f"{path}-clean").exists()
    reader.execute("COMMIT")
    assert reader.execute("SELECT count(*) FROM records").fetchone()[0] == 6
    reader.close()
    third = sink(path)
    await write(third, story()[6:7])
    await third.close()
    assert checks == [path]


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False])
def test_the_wal_is_checkpointed_after_the_configured_pages_on_both_writers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """WAL_CHECKPOINT_PAGES reaches the connection that inserts: the native writer's own (a
    per-connection setting) as well as Python's. Seen as the WAL file's high-water mark: with a
    small limit it is reused from its start after each checkpoint, with a large one it holds
    every commit."""
    from kubetrail.sinks import sqlite as sqlite_sink

    def high_water(pages: int) -> int:
        monkeypatch.setattr(sqlite_sink, "WAL_CHECKPOINT_PAGES", pages)
        path = tmp_path / f"{pages}-{native}.db"
        writer = StoreWriter(path, native=native)
        writer.open()
        assert (writer.native is not None) == native
        for commit in range(30):
            lines = [_audit_line(commit * 200 + n) for n in range(200)]
            assert writer.write_blocks([("kube.audit", b"".join(line + b"\n" for line in lines))]) == 200
        size = Path(f"{path}-wal").stat().st_size
        writer.close()
        assert len(_all_rows(path)) == 6000  # every row in, through the checkpoints
        return size

    small, large = high_water(4), high_water(100_000)
    assert small * 4 < large, (small, large)


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False])
def test_a_wal_grown_behind_a_readers_snapshot_is_cut_back_once_it_starts_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """A reader's old snapshot keeps checkpoints from finishing, so the WAL grows past its
    checkpoint size; once the reader is gone and the WAL starts anew, the file is cut back to
    WAL_LIMIT_BYTES instead of keeping that size on disk for as long as the writer runs."""
    from kubetrail.sinks import sqlite as sqlite_sink

    monkeypatch.setattr(sqlite_sink, "WAL_CHECKPOINT_PAGES", 4)
    monkeypatch.setattr(sqlite_sink, "WAL_LIMIT_BYTES", 2 * 2**20)
    path = tmp_path / "s.db"
    wal = Path(f"{path}-wal")
    writer = StoreWriter(path, native=native)
    writer.open()
    assert (writer.native is not None) == native
    written = 0

    def commit() -> None:
        nonlocal written
        lines = [_audit_line(written + n) for n in range(200)]
        assert writer.write_blocks([("kube.audit", b"".join(line + b"\n" for line in lines))]) == 200
        written += 200

    commit()
    reader = open_reader(path)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM records").fetchone()[0] == 200  # the snapshot, held
    for _ in range(30):
        commit()
    grown = wal.stat().st_size
    assert grown > 8 * 2**20, grown  # nothing checkpointed past the reader's snapshot
    reader.execute("COMMIT")
    reader.close()
    for _ in range(3):  # a checkpoint of everything, then a transaction that starts the WAL anew
        commit()
    # Cut to the limit when the WAL started anew, then the commits since (~2.3 MB each in 64 KiB
    # pages); without the limit the file keeps the 70-odd MB it grew to.
    assert wal.stat().st_size < grown // 8, (grown, wal.stat().st_size)
    writer.close()
    assert len(_all_rows(path)) == written
