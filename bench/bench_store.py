"""The embedded store (the ``sqlite`` output) and ``kubetrail history`` / ``who`` on it.

    python bench/bench_store.py ingest [--records N] [--into M]  # records/s into the store (holding M) vs file
    python bench/bench_store.py query [--records N] [--cold]  # history/who latency on a store of N records
    python bench/bench_store.py who-layout [--records N] [--cold]  # who as read today vs bodies kept by user
    python bench/bench_store.py sink [--records N] [--into M]  # the sqlite output alone in a fresh process
    python bench/bench_store.py writer [--into M] [--variant WORD]  # the writer alone: what each part costs
    python bench/bench_store.py pipeline [--records N] [--rounds R]  # tail -> kubernetes_audit -> sqlite vs file
    python bench/bench_store.py compare --store A --store B [--records N] [--cold]  # the same queries on two stores
    python bench/bench_store.py migrate [--records N] [--store S]  # the writer's migration of a store to this schema
    python bench/bench_store.py upgrade [--records N] [--into M]  # a plain store's old bodies compressed beside

**ingest**: real audit lines (shared/bench/gen_audit.py, cached) as batches of 1,000 like
``tail -> kubernetes_audit`` hands them on (a block, no record built; "from records": the
records built, each with its audit identity; "flattened": with the filter's copies of the
fields in front, as it really hands them on), written by the sink as the runtime calls it (one
worker); the same batches through the ``file`` output (plain JSON lines, fsync per
batch) in the same run, for the ratio the issue asks for (at most 2x the file output's cost).
Also the size on disk per million records. ``--into M``: each sqlite row writes into a copy of
a cached store of M synthetic records whose month of activity ends where the audit lines begin
(the steady state: the new records join the newest segment of ids and time bucket), and one
more row does the same with schema 2's object index (led by the name) in place of schema 6's
(led by the segment of ids), one with schema 3-5's (led by the time bucket): the befores and
after of issue 19 in the same run; another with schema 3's global
identity index in place of schema 4's (led by the identity's time bucket), and one into an
empty store. ``--pair``: only the file (plain), the store as it is, ``compress off`` (into a
copy of the same store with its bodies as they came) and empty store rows. The cached stores'
bodies are compressed as the output compresses them (schema 8), or not for ``compress off``.

**pipeline**: the whole agent as a child process, ``tail`` (the built-in ``k8s_audit`` parser,
``read_from_head``, ``exit_on_eof``) -> ``kubernetes_audit`` -> the ``sqlite`` output, against
the same pipeline into the ``file`` output with its default format (``out_file``), alternating
rounds in the same run; wall time and CPU seconds (user+sys) of each child. The sink's own cost
is the difference between the two (the tail and the filter are the same work in both).

**writer**: the store's writer alone, in process (``StoreWriter.write_blocks``, the native
writer), the same blocks into an empty store or a copy of the ``--into`` store, once as it is
and once without each part of a row's insert (an index dropped, the bodies kept in ``records``,
bodies cut to 250 bytes, ``compress off`` into a copy of the store with plain bodies),
alternating in each round: the writer thread's CPU per record (the
thread that runs SQLite, its checkpoints included; the decoder's thread is not in it), the
process's, and records/s. Where each us goes.

**query**: a store of N synthetic records (default 10M: 60% audit, 30% Events, 10% log lines,
over 500,000 objects in 50 namespaces and 500 users, ~300-byte bodies) is built once into the
cache (rows inserted directly, indexes built after; minutes), then ``history`` (the same call
``kubetrail history`` makes: query, decode, timeline with diffs) for 300 random objects and
``who`` for 100 random users (each has ~12,000 records: the default ``--limit`` keeps the
newest 1,000), p50/p99 in milliseconds. ``--cold``: before each query the store file is dropped
from the page cache (``posix_fadvise(DONTNEED)``) and the store opened anew, as a ``kubetrail
history`` command finds it when the agent's writes and other programs have pushed it out.
A store of schema 2 (an older kubetrail's) is cached under another name than schema 3's.

**who-layout**: cold (or warm) ``who`` on the query store as it reads today (the user index, then
each body by its id: ~1,000 pages of 64 KiB) against the same answer from a copy of the store's
audit rows clustered by ``(user, time_ns)`` in a file of their own (built once into the cache,
~2 minutes; what a covering user index or a user-clustered table would give: a writer-side
change), alternating user by user; both must give the same timeline entries. Also the bytes the
store's disk read for each (the block device's counter: the whole machine's reads count too).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec
import orjson
from _sinks import BATCH, build

from _common import CACHE, audit_lines_file
from kubetrail.core.record import Batch, Record
from kubetrail.parsers.timefmt import TimeParser
from kubetrail.sinks import sqlite as _sqlite_module
from kubetrail.sinks.file import FileSink
from kubetrail.sinks.sqlite import ALERTS_SCHEMA, APPLICATION_ID, INSERT, SCHEMA, SCHEMA_VERSION, SqliteSink

# Schema 5's table of the bodies of the rows with a user (None in an older tree: this file is also
# run from a schema 4 tree, for the before of the same run).
SPLIT_SCHEMA: str | None = getattr(_sqlite_module, "USER_BODIES", None)
BODY_SQL: str = getattr(_sqlite_module, "BODY", "r.body")
try:  # schema 8: compressed bodies (absent from an older tree this bench may run on)
    from kubetrail.sinks.sqlite_bodies import DICTIONARIES, TRAIN_AFTER_ROWS, train_dictionary
except ImportError:
    DICTIONARIES = None  # type: ignore[assignment]
_AUDIT_IDENT: Any = getattr(_sqlite_module, "audit_ident", None)  # None in a tree before schema 4

# Schema 2's object index (schema 3 leads it by the time bucket): the "before" of issue 19.
NAME_LED_INDEX = "CREATE INDEX records_object ON records (name, resource, namespace, time_ns) WHERE name IS NOT NULL"
# Schemas 3-5's object index, led by the time bucket (schema 6 leads it by the segment of ids).
BUCKET_LED_INDEX = (
    "CREATE INDEX records_object_bucket ON records (time_ns >> 46, name, resource, namespace, time_ns)"
    " WHERE name IS NOT NULL"
)
# Schema 3's identity index (schema 4 leads it by the identity's time bucket): the "before" of
# the identity index.
GLOBAL_IDENT_INDEX = "CREATE UNIQUE INDEX records_ident ON records (ident)"
# Schema 4-6's identity index, led by the time bucket (2^46 ns), which schema 7's replaced.
TIME_BUCKET_IDENT_INDEX = (
    "CREATE UNIQUE INDEX records_ident_bucket ON records"
    " (ifnull(ibucket, CASE WHEN kind = 'audit' THEN time_ns >> 46 ELSE 0 END), ident)"
)

NAMESPACES = 50
OBJECTS_PER_NS = 2_000  # per resource
RESOURCES = ("deployments", "pods", "configmaps", "services", "replicasets")
USERS = 500
_TIMES = TimeParser()


class _Keys(msgspec.Struct):
    auditID: str
    stage: str
    stageTimestamp: str


_KEYS = msgspec.json.Decoder(_Keys)


def audit_batches(lines: list[bytes], lazy: bool = True) -> list[Batch]:
    """Batches as ``tail -> kubernetes_audit`` hands them on: a block of the lines, records
    (each with its audit identity) built only if a sink asks (``lazy``); or those records
    already built, as a batch that some other filter or output touched has them."""
    out = []
    for start in range(0, len(lines), BATCH):
        chunk = lines[start : start + BATCH]

        def materialize(chunk: list[bytes] = chunk) -> list[Record]:
            records = []
            for line in chunk:
                raw = line.rstrip(b"\n")
                event = _KEYS.decode(raw)  # what the tail's parser and the audit filter took
                stamp = _TIMES.parse_ns(event.stageTimestamp)
                records.append(Record("audit", stamp, raw=raw, identity=(event.auditID, event.stage)))
            return records

        block = b"".join(chunk)
        if lazy:
            out.append(Batch("audit", None, raw_block=block, materialize=materialize, count=len(chunk)))
        else:
            out.append(Batch("audit", materialize(), raw_block=block, size_bytes=len(block)))
    return out


async def timed(sink: object, batches: list[Batch], group: int, workers: int = 1) -> tuple[float, float]:
    """Seconds to write ``batches`` in groups of ``group`` (what the sink runner hands a busy
    output: up to 16 queued batches per ``write_group``, one commit/fsync each), by ``workers``
    concurrent deliveries as the runner's ``workers`` option runs them."""
    await sink.start()  # type: ignore[attr-defined]
    groups = [batches[start : start + group] for start in range(0, len(batches), group)]
    started = time.perf_counter()
    cpu = time.process_time()  # every thread of this process: the sink's work whatever the load

    async def worker(mine: list[list[Batch]]) -> None:
        for item in mine:
            await sink.write_group(item)  # type: ignore[attr-defined]

    await asyncio.gather(*(worker(groups[n::workers]) for n in range(workers)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    await sink.close()  # type: ignore[attr-defined]
    return elapsed, cpu


def flattened(lines: list[bytes]) -> list[bytes]:
    """``lines`` as ``kubernetes_audit`` hands them on: its copies of the queried fields in front
    (what the store gets from ``tail -> kubernetes_audit``; it stores the event without them)."""
    from kubetrail.transforms.kubernetes_audit import KubernetesAuditTransform

    flt = build(KubernetesAuditTransform, dedupe="off")
    out = []
    for batch in audit_batches(lines, lazy=False):
        out += [record.json_bytes() + b"\n" for record in flt.process_batch(batch).records]
    return out


def prefilled_store(into: int, lines: list[bytes], compress: bool = True) -> Path:
    """The cached store of ``into`` records that the ingest benches copy and write into (built if
    missing: a month of synthetic records up to the first of ``lines``), its bodies compressed
    as the output compresses them (``compress``) or as they came."""
    plain = "" if compress else "-plain"
    prefilled = CACHE / f"store-{into}-64k-s{SCHEMA_VERSION}{plain}-before-ingest.db"
    if into and not prefilled.exists():
        first = _TIMES.parse_ns(_KEYS.decode(lines[0].rstrip(b"\n")).stageTimestamp)
        build_store(prefilled, into, t0=first - MONTH_NS, compress=compress)
    return prefilled


def _store_words(into: int) -> str:
    return f"a copy of the store of {into:,} records" if into else "an empty store"


def ingest(records: int, group: int, into: int = 0, without: str = "", pair: int = 0) -> None:
    """``pair``: only the file (plain) baseline, the native ``sync full`` row and (``into``) the
    same with schema 2's name-led index, alternating for that many rounds (medians and each)."""
    lines = audit_lines_file(max(records, 100_000)).read_bytes().splitlines(keepends=True)[:records]
    work = Path(tempfile.mkdtemp(prefix="bench-store-", dir=CACHE))
    prefilled = prefilled_store(into, lines)
    prefilled_plain = prefilled_store(into, lines, compress=False)
    try:
        results: dict[str, list[tuple[float, float]]] = {}
        rows = (
            (
                "file (plain, fsync per batch)",
                lambda: build(FileSink, path=str(work), file="out.jsonl", format="plain"),
            ),
            (
                "file (out_file, per record)",
                lambda: build(FileSink, path=str(work), file="out2.jsonl", format="out_file"),
            ),
            ("sqlite (sync full)", lambda: build(SqliteSink, path=str(work / "full.db"), sync="full")),
            (
                "sqlite (sync full, compress off)",
                lambda: build(SqliteSink, path=str(work / "plain.db"), sync="full", compress="off"),
            ),
            ("sqlite (sync full, from records)", lambda: build(SqliteSink, path=str(work / "rec.db"), sync="full")),
            ("sqlite (sync normal)", lambda: build(SqliteSink, path=str(work / "normal.db"), sync="normal")),
            ("sqlite (sync full, workers 2)", lambda: build(SqliteSink, path=str(work / "w2.db"), sync="full")),
            ("sqlite (sync full, flattened)", lambda: build(SqliteSink, path=str(work / "flat.db"), sync="full")),
            (
                "sqlite (sync full, name-led index)",
                lambda: build(SqliteSink, path=str(work / "name-led.db"), sync="full"),
            ),
            (
                "sqlite (sync full, bucket-led index)",
                lambda: build(SqliteSink, path=str(work / "bucket-led.db"), sync="full"),
            ),
            (
                "sqlite (sync full, identity by time bucket)",
                lambda: build(SqliteSink, path=str(work / "ident-bucket.db"), sync="full"),
            ),
            (
                "sqlite (sync full, global identity)",
                lambda: build(SqliteSink, path=str(work / "ident-global.db"), sync="full"),
            ),
            ("sqlite (sync full, empty store)", lambda: build(SqliteSink, path=str(work / "empty.db"), sync="full")),
        )
        if pair:
            # (schema 3's global identity index against schema 4's was measured with this before
            # schema 5; it is left out: its copy's index rebuild took minutes at 10M)
            pairs = ("plain, fsync per batch)", "(sync full)", "compress off)", "empty store)")
            rows = tuple(row for row in rows if row[0].endswith(pairs))
        for name, factory in rows * max(pair, 1):
            if ("-led" in name or " identity" in name or "empty store" in name) and not into:
                continue  # a young store: both indexes take new keys anywhere in a small tree
            if name.startswith("sqlite"):
                db = Path(factory().writer.path)
                for stale in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):  # an earlier round's
                    stale.unlink(missing_ok=True)
            if into and name.startswith("sqlite") and "empty store" not in name:  # holding ``into`` records
                shutil.copy(prefilled_plain if "compress off" in name else prefilled, db)
                with sqlite3.connect(db) as conn:
                    if without:  # what one index costs: the same ingest without it
                        conn.execute(f"DROP INDEX {without}")
                    if "name-led" in name:  # schema 2's index under this schema's number: not migrated
                        conn.execute("DROP INDEX records_object_segment")
                        conn.execute(NAME_LED_INDEX)
                    if "bucket-led" in name:  # schema 5's index, the same way
                        conn.execute("DROP INDEX records_object_segment")
                        conn.execute(BUCKET_LED_INDEX)
                    if "global identity" in name:  # schema 3's identity index, the same way
                        conn.execute("DROP INDEX records_ident_second")
                        conn.execute(GLOBAL_IDENT_INDEX)
                    if "identity by time bucket" in name:  # schema 6's identity index, the same way
                        conn.execute("DROP INDEX records_ident_second")
                        conn.execute(TIME_BUCKET_IDENT_INDEX)
            # The copy's gigabytes and the last row's writes (the file output's 888 MB, a store's
            # checkpoints) written back now, not during this row's timed writes.
            os.sync()
            workers = 2 if "workers 2" in name else 1
            batches = audit_batches(flattened(lines) if "flattened" in name else lines, lazy="from records" not in name)
            results.setdefault(name, []).append(asyncio.run(timed(factory(), batches, group, workers)))
        replay = asyncio.run(timed(build(SqliteSink, path=str(work / "full.db")), audit_batches(lines), group))
        if into:
            print(
                f"into a store holding {into:,} records already (its copy for each sqlite row)"
                + (f", without the index {without}" if without else "")
            )
        base = statistics.median(wall for wall, _ in results["file (plain, fsync per batch)"])
        base_cpu = statistics.median(cpu for _, cpu in results["file (plain, fsync per batch)"])
        print(
            f"ingest of {records:,} audit records ({sum(map(len, lines)) / len(lines):.0f} bytes each),"
            f" batches of {BATCH}, {group} batches per write (commit)"
        )
        for name, runs in results.items():
            elapsed = statistics.median(wall for wall, _ in runs)
            cpu = statistics.median(cpu for _, cpu in runs)
            each = f"   rounds: {', '.join(f'{records / wall:,.0f}' for wall, _ in runs)}" if len(runs) > 1 else ""
            print(
                f"  {name:<34} {records / elapsed:>10,.0f} records/s {elapsed / base:6.2f}x the file output's time"
                f"   CPU {cpu / records * 1e6:5.2f} us/record ({cpu / base_cpu:5.2f}x){each}"
            )
        print(f"  {'sqlite replay (all present)':<34} {records / replay[0]:>10,.0f} records/s")
        size = (work / "full.db").stat().st_size - (prefilled.stat().st_size if into else 0)
        print(
            f"  store size: {size / records * 1e6 / 2**20:,.0f} MiB per million records"
            f" ({size / records:.0f} bytes each)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


_PIPELINE = """
[SERVICE]
    log_level warn
    grace     60
[INPUT]
    name           tail
    path           {src}
    tag            audit
    read_from_head on
    exit_on_eof    on
    parser         k8s_audit
    db             {db}
[FILTER]
    name  kubernetes_audit
    match audit
[OUTPUT]
    name  {output}
    match *
{options}
"""


def pipeline(records: int, rounds: int, into: int = 0) -> None:
    """``into``: each sqlite round writes into a copy of the ingest bench's cached store of that
    many records (the copy and its writeback not timed)."""
    from _common import cpu_count_hint, measure, medians_against, warm_free_memory

    src = audit_lines_file(max(records, 100_000))
    lines = src.read_bytes().splitlines(keepends=True)[:records]
    prefilled = prefilled_store(into, lines)
    work = Path(tempfile.mkdtemp(prefix="bench-store-pipe-", dir=CACHE))
    try:
        source = work / "audit.log"
        source.write_bytes(b"".join(lines))
        outputs = {
            "tail -> kubernetes_audit -> file (out_file)": ("file", "    path {out}\n    file out.log"),
            "tail -> kubernetes_audit -> sqlite": ("sqlite", "    path {out}/store.db"),
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in outputs}
        for _ in range(rounds):
            for name, (output, options) in outputs.items():  # alternating: the same noise for both
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                config = work / "pipeline.conf"
                config.write_text(
                    _PIPELINE.format(src=source, db=out / "tail.db", output=output, options=options.format(out=out))
                )
                if into and output == "sqlite":
                    shutil.copy(prefilled, out / "store.db")
                    os.sync()  # the copy written back before the timed run
                warm_free_memory(work, 512)
                m = measure([sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)])
                if m.returncode != 0:
                    raise SystemExit(f"{name}: kubetrail exited {m.returncode}")
                if output == "sqlite":
                    with sqlite3.connect(out / "store.db") as conn:
                        stored = conn.execute("SELECT count(*) FROM records").fetchone()[0]
                    if stored != records + into:
                        raise SystemExit(f"{name}: {stored:,} records in the store, expected {records + into:,}")
                results[name].append((m.wall, m.cpu))
        print(
            f"pipeline of {records:,} audit records, {rounds} alternating rounds ({cpu_count_hint()})"
            + (f", the store holding {into:,} records already" if into else "")
        )
        for name, wall, cpu, wall_ratio, cpu_ratio in medians_against(
            results, "tail -> kubernetes_audit -> file (out_file)"
        ):
            print(
                f"  {name:<44} {records / wall:>9,.0f} records/s wall ({wall_ratio:4.2f}x)"
                f"   CPU {cpu:6.2f} s ({cpu_ratio:4.2f}x, {cpu / records * 1e6:5.1f} us/record)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def migrate(count: int, store: Path | None = None) -> None:
    """The writer's migration of a store of ``count`` records to this schema (on open, one
    transaction, the open's ``quick_check`` included), on a copy dropped from the page cache.
    Schema 7: from the schema 6 store the ingest bench of a schema 6 tree cached (every audit
    row's identity bucket read from its body, the identity index built anew). Schema 6: from
    the schema 5 store the ingest bench of a schema 5 tree cached (the object index built led by
    the segment of ids, the bucket-led one dropped). Schema 5: from the schema 4 store the
    ingest bench of a schema 4 tree cached (its audit rows' bodies copied into user_bodies,
    emptied in records, records_user dropped). Schema 4: from the schema 4 store put back to
    schema 3's identity index ("typical": the index is built, no row changes) and the store a
    schema-3 bench built ("worst": its synthetic audit bodies had no stageTimestamp: every audit
    row gets its ibucket, 0). ``store``: that store instead (a copy of it is migrated; ``count``
    only labels it)."""
    from kubetrail.sinks.sqlite import StoreWriter

    if store is not None:
        sources = {"given": store}
    elif SCHEMA_VERSION >= 7:
        sources = {"schema 6": CACHE / f"store-{count}-64k-s6-before-ingest.db"}
    elif SCHEMA_VERSION >= 6:
        sources = {"schema 5": CACHE / f"store-{count}-64k-s5-before-ingest.db"}
    elif SCHEMA_VERSION >= 5:
        sources = {"schema 4": CACHE / f"store-{count}-64k-s4-before-ingest.db"}
    else:
        sources = {
            "typical": CACHE / f"store-{count}-64k-s{SCHEMA_VERSION}-before-ingest.db",
            "worst": CACHE / f"store-{count}-64k-s3-before-ingest.db",
        }
    work = Path(tempfile.mkdtemp(prefix="bench-store-migrate-", dir=CACHE))
    try:
        for label, source in sources.items():
            if not source.exists():
                print(f"  {label}: no {source.name} (built by `bench_store.py ingest --into {count}` of that schema)")
                continue
            copy = work / "store.db"
            for stale in (Path(f"{copy}-wal"), Path(f"{copy}-shm")):  # the last copy's: not this file's
                stale.unlink(missing_ok=True)
            shutil.copy(source, copy)
            with sqlite3.connect(copy) as conn:
                if label == "typical":
                    conn.execute("DROP INDEX records_ident_bucket")
                    conn.execute(GLOBAL_IDENT_INDEX)
                    conn.execute("PRAGMA user_version=3")
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            conn.close()
            os.sync()  # the copy written back before the timed open
            drop_from_page_cache(copy)  # as an agent's restart after an upgrade may find it
            size = copy.stat().st_size
            writer = StoreWriter(copy)
            started, cpu = time.perf_counter(), time.process_time()
            writer.open()
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            assert writer.conn is not None
            if SCHEMA_VERSION >= 7:
                changed = writer.conn.execute("SELECT count(*) FROM records WHERE kind = 'audit'").fetchone()[0]
                what = "audit rows whose bucket was read from their body"
            elif SCHEMA_VERSION >= 6:
                changed = writer.conn.execute("SELECT count(*) FROM records WHERE name IS NOT NULL").fetchone()[0]
                what = "rows in the new object index"
            elif SCHEMA_VERSION >= 5:
                changed = writer.conn.execute("SELECT count(*) FROM user_bodies").fetchone()[0]
                what = "bodies moved to user_bodies"
            else:
                changed = writer.conn.execute("SELECT count(*) FROM records WHERE ibucket IS NOT NULL").fetchone()[0]
                what = "rows given an ibucket"
            used = writer.used_bytes()
            writer.close()
            after = copy.stat().st_size
            print(
                f"  {label:<8} schema {version} -> {SCHEMA_VERSION}, {count:,} records: {elapsed:6.1f} s"
                f" (CPU {cpu:5.1f} s), {changed:,} {what}; file {size / 2**30:.2f} -> {after / 2**30:.2f} GiB"
                f" ({used / 2**30:.2f} GiB in use)"
            )
            copy.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)


MONTH_NS = 30 * 86400 * 10**9
QUERY_T0 = 1_760_000_000_000_000_000  # the query store's month starts here (2025-10-09)


def _rfc3339(time_ns: int) -> str:
    seconds, fraction = divmod(time_ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}Z"


def synthetic_rows(count: int, seed: int = 7, t0: int = QUERY_T0) -> object:
    """Rows as the sqlite output stores them; an audit row's time is its body's stageTimestamp
    (as from tail's k8s_audit parser or the webhook: its identity bucket is the default one)."""
    rng = random.Random(seed)
    step = MONTH_NS // count  # a month of activity
    verbs = ("get", "list", "update", "patch", "create", "delete", "watch")
    for i in range(count):
        ns = f"ns-{rng.randrange(NAMESPACES)}"
        resource = RESOURCES[rng.randrange(len(RESOURCES))]
        name = f"obj-{rng.randrange(OBJECTS_PER_NS)}"
        roll = rng.random()
        t = t0 + i * step
        # A 16-byte hash, as the output's identities are (consecutive integers would all sort
        # before the new records' keys, and a global identity index would look cheap); an audit
        # row's is its (auditID, stage)'s, as the output gives it (an alert's lookup finds it).
        ident = hashlib.blake2b(i.to_bytes(8, "big"), digest_size=16).digest()
        if roll < 0.6 and _AUDIT_IDENT is not None:
            ident = _AUDIT_IDENT(f"{i:032x}", "ResponseComplete")
        if roll < 0.6:
            user = f"user-{rng.randrange(USERS)}"
            verb = verbs[rng.randrange(len(verbs))]
            body = {
                "kind": "Event",
                "apiVersion": "audit.k8s.io/v1",
                "level": "Metadata",
                "auditID": f"{i:032x}",
                "stage": "ResponseComplete",
                "verb": verb,
                "user": {"username": user},
                "sourceIPs": ["10.0.0.1"],
                "objectRef": {"resource": resource, "namespace": ns, "name": name},
                "responseStatus": {"code": 200},
                "stageTimestamp": _rfc3339(t),
            }
            yield (ident, t, "audit", user, verb, resource, ns, name, None, 200, None, "audit", orjson.dumps(body))
        elif roll < 0.9:
            body = {
                "kind": "Event",
                "metadata": {"uid": f"e-{i}", "resourceVersion": str(i)},
                "involvedObject": {"kind": resource[:-1].capitalize(), "namespace": ns, "name": name},
                "reason": "Synced",
                "message": f"synced {name} in {ns}",
                "count": 1,
                "type": "Normal",
                "source": {"component": "controller"},
            }
            yield (
                ident,
                t,
                "event",
                None,
                None,
                resource,
                ns,
                name,
                None,
                None,
                "Synced",
                "events",
                orjson.dumps(body),
            )
        else:
            pod = f"{name}-abc12"
            body = {
                "log": f"line {i} of {pod}",
                "stream": "stdout",
                "kubernetes": {"pod_name": pod, "namespace_name": ns},
            }
            yield (ident, t, "log", None, None, "pods", ns, pod, None, None, "app", "logs", orjson.dumps(body))


def build_store(path: Path, count: int, t0: int = QUERY_T0, compress: bool = True) -> None:
    """A store of ``count`` synthetic records laid out as the ``sqlite`` output of this tree
    writes them: rows appended in time order (their ids ascending), indexes built after; with
    schema 5, the bodies of the rows with a user inserted into ``user_bodies`` in the same time
    order, as the writer does (each user's range grows at its end; its leaf pages are taken as
    the file grows, interleaved with the other users': not the contiguous run that one sorted
    insert, or a migration, would give). ``compress`` (schema 8): the bodies after the first
    ``TRAIN_AFTER_ROWS`` compressed with a dictionary trained on those, as the writer does."""
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    conn = sqlite3.connect(partial, isolation_level=None)
    conn.execute("PRAGMA page_size=65536")  # as the sqlite output makes its stores (check_store)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    table, *indexes = [s for s in SCHEMA.split(";") if s.strip()]
    conn.execute(table)
    if SPLIT_SCHEMA is not None:
        conn.executescript(SPLIT_SCHEMA)
    if DICTIONARIES is not None:
        conn.executescript(DICTIONARIES)
    compressor = None
    started = time.perf_counter()
    rows = synthetic_rows(count, t0=t0)
    insert = INSERT.replace("INSERT OR IGNORE", "INSERT")
    next_id = 1  # rows appended to an empty table: ids 1, 2, 3...
    while True:
        chunk = [row for _, row in zip(range(100_000), rows, strict=False)]
        if not chunk:
            break
        if compressor is None and compress and DICTIONARIES is not None and next_id > TRAIN_AFTER_ROWS:
            compressor = train_dictionary(conn, "r.body" if SPLIT_SCHEMA is None else BODY_SQL)
        if compressor is not None:
            chunk = [(*row[:12], compressor.compress(row[12])) for row in chunk]
        conn.execute("BEGIN")
        if SPLIT_SCHEMA is not None:
            bodies = []
            for n, row in enumerate(chunk):
                if row[3] is not None:
                    bodies.append((row[3], row[1], next_id + n, row[2], row[4], row[12]))
                    chunk[n] = (*row[:12], b"")
            conn.executemany(insert, chunk)
            conn.executemany("INSERT INTO user_bodies VALUES (?,?,?,?,?,?)", bodies)
        else:
            conn.executemany(insert, chunk)
        conn.execute("COMMIT")
        next_id += len(chunk)
    assert conn.execute("SELECT max(id) FROM records").fetchone()[0] == next_id - 1
    for statement in indexes:  # building an index once is much faster than keeping it row by row
        conn.execute(statement)
    conn.executescript(ALERTS_SCHEMA)  # schema 2: the (empty) alerts table
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    partial.rename(path)
    print(f"built a store of {count:,} records in {time.perf_counter() - started:.0f} s ({path})")


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"p50 {statistics.median(ordered) * 1000:7.1f} ms   p99 {p99 * 1000:7.1f} ms   max {ordered[-1] * 1000:7.1f} ms"
    )


def drop_from_page_cache(path: Path) -> None:
    for name in (path, Path(f"{path}-wal")):
        if name.exists():
            fd = os.open(name, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def query(count: int, cold: bool, store: Path | None = None) -> None:
    """``store``: another store of the same synthetic records (``--store``: the ingest bench's
    cached store of a schema, say, to compare two schemas' layouts of the same rows)."""
    from kubetrail.history import queries
    from kubetrail.history.store import StoreBackend

    path = store or _query_store(count)
    size = path.stat().st_size
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.close()
    print(
        f"store of {count:,} records: {size / 2**30:.2f} GiB ({size / count * 1e6 / 2**20:,.0f} MiB per million),"
        f" schema {version}, {'cold: dropped from the page cache before each query' if cold else 'warm'} ({path.name})"
    )
    if not cold:  # warm: every page in the page cache (read through once), whatever ran before
        with path.open("rb") as whole:
            while whole.read(1 << 24):
                pass
    backend = StoreBackend(path)

    def drop() -> None:
        """Cold: the file out of the page cache, no connection (none of SQLite's cache)."""
        if cold:
            backend.close()
            drop_from_page_cache(path)

    def fresh() -> StoreBackend:
        """Cold: the store opened anew (timed: a command opens it too)."""
        nonlocal backend
        if cold:
            backend = StoreBackend(path)
        return backend

    rng = random.Random(11)
    samples: dict[str, list[float]] = {"history": [], "history --logs": [], "who": [], "who --limit 100": []}
    sizes: dict[str, list[int]] = {k: [] for k in samples}
    cpu: dict[str, list[float]] = {k: [] for k in samples}  # CPU of all threads: less noisy than wall
    for label, logs in (("history", False), ("history --logs", True)):
        for _ in range(300):  # other random objects for each variant: no answer comes from a warm cache
            resource = RESOURCES[rng.randrange(len(RESOURCES))]
            target = f"{resource}/ns-{rng.randrange(NAMESPACES)}/obj-{rng.randrange(OBJECTS_PER_NS)}"
            drop()
            started, cpu_started = time.perf_counter(), time.process_time()
            try:
                result = queries.history(fresh(), target, logs=logs)
                sizes[label].append(len(result.entries))
            except queries.HistoryError:
                sizes[label].append(0)
            samples[label].append(time.perf_counter() - started)
            cpu[label].append(time.process_time() - cpu_started)
    for label, limit in (("who", queries.DEFAULT_LIMIT), ("who --limit 100", 100)):
        for _ in range(100):
            user = f"user-{rng.randrange(USERS)}"
            drop()
            started, cpu_started = time.perf_counter(), time.process_time()
            result = queries.who(fresh(), user, limit=limit)
            samples[label].append(time.perf_counter() - started)
            cpu[label].append(time.process_time() - cpu_started)
            sizes[label].append(len(result.entries))
    for label, values in samples.items():
        print(
            f"  {label:<16} {percentiles(values)}   CPU p50 {statistics.median(cpu[label]) * 1000:6.1f} ms"
            f"   (entries: median {statistics.median(sizes[label]):,.0f})"
        )
    backend.close()


USER_BODIES = (
    "CREATE TABLE user_bodies (user TEXT, time_ns INTEGER, id INTEGER, kind TEXT, body BLOB,"
    " PRIMARY KEY (user, time_ns, id)) WITHOUT ROWID"
)


def _query_store(count: int) -> Path:
    """The cached query store (built if missing); schema 2's under its old name (an older
    kubetrail measured with this bench reads it)."""
    path = CACHE / (f"store-{count}-64k.db" if SCHEMA_VERSION == 2 else f"store-{count}-64k-s{SCHEMA_VERSION}.db")
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        build_store(path, count)
    return path


def _device_read_bytes(path: Path) -> int | None:
    """Bytes read so far by the block device holding ``path`` (None where unknown)."""
    dev = os.stat(path).st_dev
    try:
        fields = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat").read_text().split()
    except OSError:
        return None
    return int(fields[2]) * 512


def who_layout(count: int, cold: bool, users: int = 100) -> None:
    from kubetrail.history import queries
    from kubetrail.history.model import StoredRecord, timeline
    from kubetrail.history.store import StoreBackend, advise_random

    path = _query_store(count)
    clustered = path.with_name(path.stem + "-user-bodies.db")
    if not clustered.exists():
        started = time.perf_counter()
        partial = clustered.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        conn = sqlite3.connect(partial, isolation_level=None)
        for pragma in ("page_size=65536", "journal_mode=OFF", "synchronous=OFF", "cache_size=-1000000"):
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("ATTACH ? AS src", (f"file:{path}?mode=ro",))
        conn.execute(USER_BODIES)
        conn.execute(  # a scan and one sort (through the user index: a random read per row)
            "INSERT INTO user_bodies SELECT user, time_ns, id, kind, body FROM src.records NOT INDEXED"
            " WHERE user IS NOT NULL ORDER BY user, time_ns, id"
        )
        conn.close()
        partial.rename(clustered)
        print(f"built {clustered.name} in {time.perf_counter() - started:.0f} s")
    print(
        f"who on {count:,} records, {'cold' if cold else 'warm'}: the store ({path.stat().st_size / 2**30:.2f} GiB)"
        f" against its users' audit rows clustered by user ({clustered.stat().st_size / 2**30:.2f} GiB more)"
    )
    if not cold:
        for name in (path, clustered):
            with name.open("rb") as whole:
                while whole.read(1 << 24):
                    pass

    def today(user: str) -> list[dict[str, object]]:
        backend = StoreBackend(path)
        try:
            return queries.who(backend, user).entries
        finally:
            backend.close()

    def by_user(user: str) -> list[dict[str, object]]:
        conn = sqlite3.connect(f"file:{clustered}?mode=ro", uri=True)
        try:
            advise_random(clustered)
            rows = conn.execute(
                "SELECT id, time_ns, kind, body FROM user_bodies WHERE user = ? ORDER BY time_ns DESC LIMIT ?",
                (user, queries.DEFAULT_LIMIT),
            ).fetchall()
        finally:
            conn.close()
        return timeline([StoredRecord(row[0], row[1], row[2], orjson.loads(row[3])) for row in reversed(rows)])

    rng = random.Random(13)
    results: dict[str, list[tuple[float, float, float]]] = {"today (index, then bodies by id)": [], "clustered": []}
    for _ in range(users):
        user = f"user-{rng.randrange(USERS)}"
        answers = []
        for label, run in zip(results, (today, by_user), strict=True):
            if cold:
                drop_from_page_cache(path)
                drop_from_page_cache(clustered)
            read = _device_read_bytes(path)
            started, cpu = time.perf_counter(), time.process_time()
            answers.append(run(user))
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            after = _device_read_bytes(path)
            mib = (after - read) / 2**20 if read is not None and after is not None else 0.0
            results[label].append((elapsed, cpu, mib))
        if answers[0] != answers[1]:
            raise SystemExit(f"who {user}: the clustered rows gave another timeline")
    for label, samples in results.items():
        print(
            f"  {label:<34} {percentiles([s[0] for s in samples])}   CPU p50"
            f" {statistics.median(s[1] for s in samples) * 1000:6.1f} ms   disk read p50"
            f" {statistics.median(s[2] for s in samples):6.1f} MiB"
        )


class _Found:
    """An answer of ``compare``'s that is not a timeline: ``entries`` to compare across stores."""

    def __init__(self, entries: list[Any]) -> None:
        assert entries, "not found"  # every asked record is in the store
        self.entries = entries


def compare(count: int, cold: bool, stores: list[Path], since_hours: float = 0) -> None:
    """The same queries on two stores of the same synthetic records (``--store A --store B``: the
    ingest bench's schema 4 and schema 5 stores, say), alternating query by query in one process
    (the same load for both), each answer checked equal: ``history`` of 150 objects (and with
    ``--logs``), ``who`` of 100 users (newest 1,000, and ``--limit 100``); wall p50/p99, CPU p50
    and the bytes the store's disk read (the block device's counter: the whole machine's reads
    count too). Cold: both files dropped from the page cache and the store opened anew before
    each query (the open is timed); warm: both files read through once first. ``--since-hours H``:
    also 150 histories of the store's last H hours (``--since``). And 100 alerts' audit records
    (``triggers_of``, by auditID and time)."""
    from kubetrail.history import queries
    from kubetrail.history.store import StoreBackend

    for path in stores:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.close()
        print(f"  {path.name}: schema {version}, {path.stat().st_size / 2**30:.2f} GiB")
    print(f"{count:,} records, {'cold' if cold else 'warm'}, alternating query by query")
    if not cold:
        for path in stores:
            with path.open("rb") as whole:
                while whole.read(1 << 24):
                    pass
    backends = {path: StoreBackend(path) for path in stores}
    rng = random.Random(17)
    asks: list[tuple[str, Any]] = []
    for label, logs in (("history", False), ("history --logs", True)):
        for _ in range(150):
            resource = RESOURCES[rng.randrange(len(RESOURCES))]
            target = f"{resource}/ns-{rng.randrange(NAMESPACES)}/obj-{rng.randrange(OBJECTS_PER_NS)}"
            asks.append((label, lambda b, t=target, g=logs: queries.history(b, t, logs=g)))
    if since_hours:  # the last hours of the store's month only
        since = QUERY_T0 + MONTH_NS - int(since_hours * 3600e9)
        for _ in range(150):
            resource = RESOURCES[rng.randrange(len(RESOURCES))]
            target = f"{resource}/ns-{rng.randrange(NAMESPACES)}/obj-{rng.randrange(OBJECTS_PER_NS)}"
            asks.append(("history --since", lambda b, t=target: queries.history(b, t, since=since)))
    for label, limit in (("who", queries.DEFAULT_LIMIT), ("who --limit 100", 100)):
        for _ in range(100):
            user = f"user-{rng.randrange(USERS)}"
            asks.append((label, lambda b, u=user, n=limit: queries.who(b, u, limit=n)))
    # An alert's audit record (``triggers_of``, what a search for alerts and the UI's live view
    # ask for each alert): 100 audit rows at random, asked by (auditID, the row's time) as an
    # alert gives them (synthetic_rows: the row of id N has auditID N - 1 in hex).
    with sqlite3.connect(f"file:{stores[0]}?mode=ro", uri=True) as conn:
        audits: list[tuple[str, int]] = []
        while len(audits) < 100:
            row = conn.execute("SELECT id, time_ns FROM records WHERE id = ? AND kind = 'audit'",
                               (rng.randrange(1, count + 1),)).fetchone()  # fmt: skip
            if row is not None:
                audits.append((f"{row[0] - 1:032x}", row[1]))
    conn.close()
    for audit in audits:
        asks.append(("alert's request", lambda b, a=audit: _Found([(r.id, r.time_ns) for r in b.triggers_of([a])])))
    results: dict[tuple[str, Path], list[tuple[float, float, float]]] = {}
    for label, ask in asks:
        answers = []
        for path in stores:
            if cold:
                backends[path].close()
                for other in stores:
                    drop_from_page_cache(other)
            read = _device_read_bytes(path)
            started, cpu = time.perf_counter(), time.process_time()
            if cold:
                backends[path] = StoreBackend(path)
            try:
                answers.append(ask(backends[path]).entries)
            except queries.HistoryError as exc:
                answers.append(str(exc))
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            after = _device_read_bytes(path)
            mib = (after - read) / 2**20 if read is not None and after is not None else 0.0
            results.setdefault((label, path), []).append((elapsed, cpu, mib))
        if any(answer != answers[0] for answer in answers):
            raise SystemExit(f"{label}: the stores gave other answers")
    for (label, path), samples in results.items():
        print(
            f"  {label:<16} {path.name:<44} {percentiles([s[0] for s in samples])}   CPU p50"
            f" {statistics.median(s[1] for s in samples) * 1000:6.1f} ms   disk read p50"
            f" {statistics.median(s[2] for s in samples):6.1f} MiB"
        )
    for backend in backends.values():
        backend.close()


# The writer's levers (``writer``): what each part of a row's insert costs, as the same rows
# written without it. Each: (SQL run on the new store before the writes, the native writer's
# body statement or None for the bodies in ``records``).
_CUT_BODY = "INSERT INTO user_bodies (user, time_ns, id, kind, verb, body) VALUES (?,?,?,?,?,substr(?,1,250))"
_BY_IDS = (
    "DROP INDEX records_object_segment; CREATE INDEX records_object_ids ON records (id >> {bits}, name, resource,"
    " namespace, time_ns) WHERE name IS NOT NULL"
)
_BY_BUCKET = f"DROP INDEX records_object_segment; {BUCKET_LED_INDEX}"
_IDENT_BY = (
    "DROP INDEX records_ident_second; CREATE UNIQUE INDEX records_ident_other ON records"
    " (ifnull(ibucket, CASE WHEN kind = 'audit' THEN time_ns >> {bits} ELSE 0 END), ident)"
)
WRITER_VARIANTS: dict[str, tuple[str, str | None]] = {
    "as it is": ("", ""),
    "bodies as they came (compress off)": ("", ""),
    "without records_object_segment": ("DROP INDEX records_object_segment", ""),
    "without records_ident_second": ("DROP INDEX records_ident_second", ""),
    "without records_time": ("DROP INDEX records_time", ""),
    "without records_uid_segment": ("DROP INDEX records_uid_segment", ""),
    "bodies in records (no user_bodies)": ("", None),
    "bodies cut to 250 bytes": ("", _CUT_BODY),
    "object index by time bucket (schema 5)": (_BY_BUCKET, ""),
    "identity index by time bucket (schema 6)": (f"DROP INDEX records_ident_second; {TIME_BUCKET_IDENT_INDEX}", ""),
    "identity index by 2^28 ns": (_IDENT_BY.format(bits=28), ""),
    "identity index by 2^33 ns": (_IDENT_BY.format(bits=33), ""),
    "uid index on the uid (schema 6)": (
        "DROP INDEX records_uid_segment; CREATE INDEX records_uid ON records (uid) WHERE uid IS NOT NULL",
        "",
    ),
    "object index by 2^16 ids": (_BY_IDS.format(bits=16), ""),
    "object index by 2^20 ids": (_BY_IDS.format(bits=20), ""),
}
# Variants that change only the native writer connection's settings: run after the store's own
# (StoreInserter's ``setup``), so each differs from "as it is" by its statement alone.
WRITER_SETUPS: dict[str, str] = {
    "checkpoints every 1,000 pages (SQLite's default; before)": "PRAGMA wal_autocheckpoint=1000",
    "checkpoints every 16,000 pages (1 GiB)": "PRAGMA wal_autocheckpoint=16000",
    "a 256 MiB page cache": "PRAGMA cache_size=-262144",
    "sync normal": "PRAGMA synchronous=NORMAL",
}


def with_uids(lines: list[bytes], share: float) -> list[bytes]:
    """``lines`` with an ``objectRef.uid`` (random, as object uids are) in ``share`` of them: the
    bench's events are at level Metadata, without one; a policy at RequestResponse gives most
    rows a uid (in the answer's object: 25-46% of the rows of this repository's real clusters'
    audit logs)."""
    import uuid

    rng = random.Random(5)
    out = []
    for line in lines:
        if rng.random() < share:
            line = line.replace(
                b'"objectRef":{', b'"objectRef":{"uid":"%s",' % str(uuid.UUID(int=rng.getrandbits(128))).encode(), 1
            )
        out.append(line)
    return out


def writer(records: int, group: int, into: int, rounds: int, only: list[str], uids: float = 0.0) -> None:
    """The store's writer alone, in process: ``StoreWriter.write_blocks`` (the native writer) with
    blocks of 1,000 real audit lines, ``group`` blocks a transaction, into an empty store or a
    copy of the cached store of ``into`` records, for each variant (``WRITER_VARIANTS``),
    alternating in each round. Reports the writer thread's CPU per record (the thread that runs
    SQLite, its checkpoints included: its ``thread_time``; the native decoder's thread is not in
    it), the process's CPU and the wall time; the open and the close are not timed. ``uids``:
    that share of the new lines get a uid (:func:`with_uids`), and of the copy's audit rows."""
    from kubetrail.sinks import sqlite as store

    lines = audit_lines_file(max(records, 100_000)).read_bytes().splitlines(keepends=True)[:records]
    lines = with_uids(lines, uids) if uids else lines
    blocks = [("audit", b"".join(lines[start : start + BATCH])) for start in range(0, len(lines), BATCH)]
    prefilled = prefilled_store(into, lines)
    prefilled_plain = prefilled_store(into, lines, compress=False)
    every = [*WRITER_VARIANTS, *WRITER_SETUPS]
    names = [name for name in every if not only or any(word in name for word in only)]
    work = Path(tempfile.mkdtemp(prefix="bench-store-writer-", dir=CACHE))
    results: dict[str, list[tuple[float, float, float, int]]] = {}
    try:
        for _ in range(rounds):
            for name in names:
                sql, body = WRITER_VARIANTS.get(name, ("", ""))
                setup = WRITER_SETUPS.get(name)
                db = work / "store.db"
                for stale in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}-clean")):
                    stale.unlink(missing_ok=True)
                plain = "compress off" in name
                if into:
                    shutil.copy(prefilled_plain if plain else prefilled, db)
                    if uids:  # the copy's audit rows too (the same rows each time), random as uids are
                        with sqlite3.connect(db) as conn:
                            conn.execute(
                                "UPDATE records SET uid = lower(hex(randomblob(16))) WHERE kind = 'audit'"
                                f" AND (id * 2654435761) % 1000 < {int(uids * 1000)}"
                            )
                        conn.close()
                    os.sync()
                w = store.StoreWriter(db, compress=not plain)
                w.open()
                assert w.conn is not None and w.native is not None, "the native writer is not built"
                if sql:
                    w.conn.executescript(sql)
                if body != "" or setup:
                    w.native.close()
                    w.native = store._StoreInserter(
                        str(db),
                        "FULL",
                        store.INSERT,
                        list(store._FLAT_KEYS),
                        insert_body=store.INSERT_BODY if setup else body,
                        setup=store._wal_settings() + (setup or ""),
                    )
                    w._use(w.compressor)  # the new inserter compresses as the store's did
                started, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
                written = _written_bytes()
                for start in range(0, len(blocks), group):
                    assert w.write_blocks(blocks[start : start + group]) is not None
                elapsed = time.perf_counter() - started
                run = (elapsed, time.process_time() - cpu, time.thread_time() - thread, _written_bytes() - written)
                results.setdefault(name, []).append(run)
                w.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"the writer alone: {records:,} audit records, {group} blocks of {BATCH} a transaction, "
        + f"into {_store_words(into)}"
        + f", {rounds} alternating rounds (medians; the writer thread's CPU of each round)"
    )
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        each = ", ".join(f"{r[2] / records * 1e6:.2f}" for r in runs)
        written = statistics.median(r[3] for r in runs) / records
        print(
            f"  {name:<40} writer thread {statistics.median(r[2] for r in runs) / records * 1e6:5.2f} us/record"
            f" ({each})   process CPU {cpu / records * 1e6:5.2f} us   wall {wall / records * 1e6:5.2f} us"
            f"   {records / wall:>9,.0f} records/s   {written:,.0f} bytes written to storage a record"
        )


def upgrade(records: int, group: int, into: int, rounds: int) -> None:
    """A store written before compression, upgraded in place: ``records`` audit lines written by
    the native writer into a copy of the cached store of ``into`` records with bodies as they
    came, its old bodies compressed in the background (``OldBodies``) or left as they are,
    alternating in each round: what that costs the new records. Then, on the last round's
    store, the background step alone, repeated until every old body is compressed: bodies a
    second, and the pages in use (what ``retention_size`` counts) against the store whose old
    bodies were left."""
    from kubetrail.sinks import sqlite as store

    lines = audit_lines_file(max(records, 100_000)).read_bytes().splitlines(keepends=True)[:records]
    blocks = [("audit", b"".join(lines[start : start + BATCH])) for start in range(0, len(lines), BATCH)]
    prefilled_plain = prefilled_store(into, lines, compress=False)
    work = Path(tempfile.mkdtemp(prefix="bench-store-upgrade-", dir=CACHE))
    results: dict[str, list[tuple[float, float, int]]] = {}
    used: dict[str, int] = {}
    names = ("old bodies compressed beside", "old bodies left as they are")
    try:
        for round_no in range(rounds):
            for name in names:
                db = work / f"{name.split()[2]}.db"
                for stale in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}-clean")):
                    stale.unlink(missing_ok=True)
                shutil.copy(prefilled_plain, db)
                os.sync()
                w = store.StoreWriter(db)
                w.open()
                assert w.native is not None, "the native writer is not built"
                used.setdefault("the store as it came", w.used_bytes())
                if "left" in name:
                    w._old_bodies = None
                started, cpu = time.perf_counter(), time.process_time()
                for start in range(0, len(blocks), group):
                    assert w.write_blocks(blocks[start : start + group]) is not None
                run = (time.perf_counter() - started, time.process_time() - cpu)
                old = w._old_bodies
                results.setdefault(name, []).append((*run, old.compressed if old else 0))
                if round_no == rounds - 1 and old is not None and w.compressor is not None:
                    started = time.perf_counter()
                    while not old.done:
                        old._next = 0.0
                        w._compress_old_bodies(old, w.compressor)
                    drained = time.perf_counter() - started
                    print(
                        f"  the background step alone: {old.compressed:,} old bodies in {drained:.1f} s,"
                        f" {old.compressed / drained:,.0f} a second"
                    )
                if round_no == rounds - 1:
                    used[name] = w.used_bytes()
                w.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"a store upgraded in place: {records:,} audit records into {_store_words(into)} with bodies as they came,"
        f" {rounds} alternating rounds (medians)"
    )
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(
            f"  {name:<30} {records / wall:>9,.0f} records/s   process CPU {cpu / records * 1e6:5.2f} us"
            f"   old bodies compressed meanwhile: {', '.join(f'{r[2]:,}' for r in runs)}"
        )
    for name, size in used.items():
        print(f"  in use, {name:<40} {size / 2**20:>8,.0f} MiB")


def sink_alone(records: int, group: int, into: int, compress: str = "zstd") -> None:
    """The ``sqlite`` output alone, in this fresh process (nothing timed before it, unlike
    ``ingest``'s rows): ``records`` audit lines as lazy blocks, ``group`` batches a
    ``write_group``, into a copy of the cached store of ``into`` records or an empty store; the
    process's user and system CPU apart (the system's share is the kernel writing the WAL and the
    checkpoints, which varies from run to run on this machine)."""
    lines = audit_lines_file(max(records, 100_000)).read_bytes().splitlines(keepends=True)[:records]
    prefilled = prefilled_store(into, lines, compress=compress != "off")
    work = Path(tempfile.mkdtemp(prefix="bench-store-sink-", dir=CACHE))
    try:
        if into:
            shutil.copy(prefilled, work / "store.db")
        os.sync()
        batches = audit_batches(lines)
        before = os.times()
        sink = build(SqliteSink, path=str(work / "store.db"), sync="full", compress=compress)
        elapsed, _ = asyncio.run(timed(sink, batches, group))
        after = os.times()
        # The same records again (every one present: nothing stored), into the same store.
        again = build(SqliteSink, path=str(work / "store.db"), sync="full", compress=compress)
        replay, replay_cpu = asyncio.run(timed(again, audit_batches(lines), group))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"the sqlite output alone (compress {compress}): {records:,} audit records into {_store_words(into)}"
        f": {records / elapsed:,.0f} records/s, CPU {(after.user - before.user) / records * 1e6:.2f} us user"
        f" + {(after.system - before.system) / records * 1e6:.2f} us system a record;"
        f" a replay of them: {records / replay:,.0f} records/s, CPU {replay_cpu / records * 1e6:.2f} us a record"
    )


def _written_bytes() -> int:
    """What this process has sent to storage so far (``/proc/self/io`` ``write_bytes``: the WAL
    and the checkpoints' pages, counted as they are dirtied), or 0 where the kernel keeps no count."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "what", choices=("ingest", "sink", "writer", "query", "compare", "who-layout", "pipeline", "migrate", "upgrade")
    )
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="pipeline: alternating rounds")
    parser.add_argument(
        "--into", type=int, default=0, help="ingest, pipeline: into a store of this many records (cached)"
    )
    parser.add_argument("--without", default="", help="ingest --into: drop this index first (records_object, ...)")
    parser.add_argument("--group", type=int, default=16, help="ingest: batches per write_group (1: one commit each)")
    parser.add_argument(
        "--pair", action="store_true", help="ingest: only file plain, sqlite sync full (and name-led), --rounds times"
    )
    parser.add_argument(
        "--variant", action="append", default=[], help="writer: only the variants whose name has this word"
    )
    parser.add_argument("--uids", type=float, default=0.0, help="writer: this share of the rows with a uid")
    parser.add_argument("--compress", choices=("zstd", "off"), default="zstd", help="sink: the output's compress")
    parser.add_argument(
        "--since-hours", type=float, default=0, help="compare: also history of the store's last hours (--since)"
    )
    parser.add_argument("--cold", action="store_true", help="query: the store out of the page cache for each query")
    parser.add_argument(
        "--store", type=Path, action="append", default=[], help="query, migrate: this store; compare: two or more"
    )
    args = parser.parse_args()
    if args.what == "ingest":
        ingest(args.records or 200_000, args.group, args.into, args.without, args.rounds if args.pair else 0)
    elif args.what == "sink":
        sink_alone(args.records or 1_000_000, args.group, args.into, args.compress)
    elif args.what == "writer":
        writer(args.records or 200_000, args.group, args.into, args.rounds, args.variant, args.uids)
    elif args.what == "pipeline":
        pipeline(args.records or 500_000, args.rounds, args.into)
    elif args.what == "upgrade":
        upgrade(args.records or 1_000_000, args.group, args.into or 2_000_000, args.rounds)
    elif args.what == "migrate":
        migrate(args.records or 2_000_000, args.store[0] if args.store else None)
    elif args.what == "who-layout":
        who_layout(args.records or 10_000_000, args.cold)
    elif args.what == "compare":
        compare(args.records or 10_000_000, args.cold, args.store, args.since_hours)
    else:
        query(args.records or 10_000_000, args.cold, args.store[0] if args.store else None)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
