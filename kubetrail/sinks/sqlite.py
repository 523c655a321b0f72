"""The ``sqlite`` output: the embedded store that ``kubetrail history``, ``who``, ``search`` and
``kubetrail ui`` read.

One local SQLite file keeps audit records, Kubernetes Events and (optionally) container log
lines. Each record is one row: the fields people filter on as indexed columns (time, kind of
record, user, verb, resource, namespace, name, uid, response code, reason) and the whole record,
as the JSON bytes the pipeline delivered, beside them; an audit event without the members the
``kubernetes_audit`` filter copied in front of it (:func:`without_flat_prefix`: the event as the
API server wrote it, half the bytes; the columns hold what those copies were for).

Design decisions:

* **SQLite, not DuckDB**, measured on this machine (bench/bench_store.py; figures in
  docs/benchmarks.md): the same audit rows with the same identity and indexes went in at 28,000-45,000
  records/s here through Python's sqlite3 then (117,000-131,000 now, natively: see "Speed") and
  at 16,000/s into DuckDB 2.0 (bulk through Arrow: its PRIMARY KEY and
  ART indexes are kept row by row), and, decisive, a DuckDB file open for writing in one process
  cannot be opened by another ("Conflicting lock is held"), so ``kubetrail history`` could not
  read the store of a running agent. SQLite in WAL mode
  gives exactly "one writer, many readers" across processes, survives kill -9 (the WAL is
  replayed on the next open), needs no dependency (stdlib ``sqlite3``), and its B-tree indexes
  answer the point queries of ``history``/``who`` in milliseconds at 10M rows.
* **Idempotent by identity.** ``ident`` holds the record's identity key
  (:func:`~kubetrail.core.record.identity_key`: audit ``(auditID, stage)``, Events ``(uid,
  resourceVersion)``, log lines ``(file uid, offset)``) as 16 bytes under a UNIQUE index and
  rows go in with ``INSERT OR IGNORE``: a replay changes nothing. An audit event's is always its
  own ``(auditID, stage)``, whatever identity its record carries (:func:`audit_ident`). A record without identity gets
  a digest of its tag, time and bytes, so a replayed batch of those is absorbed too. The unique
  index is on ``(identity bucket, ident)`` (schema 4, "Identity index" below).
* **Acknowledged after commit.** Batches are written in a worker thread, several queued batches
  in one transaction (a group commit, as the ``file`` output does), and ``write`` returns only
  after ``COMMIT`` (``synchronous=FULL`` by default: the WAL is fsynced at each commit).
* **One writer, many readers.** The writer holds an ``flock`` on the database file for its whole
  life (Linux keeps ``flock`` and SQLite's POSIX locks apart): a second writer is refused with a
  clear message instead of interleaving retention with ours. Readers open the file read-only.
* **Full disk.** ``SQLITE_FULL`` (or any I/O error) rolls the transaction back and raises
  :class:`RetryableError`: nothing of the batch is acknowledged, the runtime retries with
  backoff, and the source holds its checkpoint, so nothing is lost.
* **Retention** by age (``retention_time``, on the record's time) and by size
  (``retention_size``, the pages in use): checked after a commit at most every
  ``retention_interval``; the oldest rows go first, in bounded chunks so a writer never holds
  the lock for long. Freed pages are reused by later inserts, so the file stops growing.
* **Steady state: the object index is led by a segment of ids** (schema 6; schema 3 led it by
  a time bucket). Schema 2's ``(name, resource, namespace, time_ns)`` took each new key at a
  random place of a B-tree that outgrows the cache: into a store of 2M records half of each
  insert's cost was that index (a commit of 16,000 rows dirties most of its leaf pages, all
  written to the WAL). Schema 3 put a time bucket in front, ``time_ns >> 46`` (19.5 hours), so
  new keys landed in the newest bucket's subtree; but a bucket holds whatever arrives in 19.5
  hours (70M records at 1,000/s), and once its subtree outgrew the writer's cache each commit
  rewrote most of its leaves again: a long ingest fell to ~55,000 records/s, 5.8 KB written a
  record. Schema 6's ``(id >> 18, name, resource, namespace, time_ns)`` (:data:`OBJECT_INDEX`,
  an index on an expression: no column, the INSERT unchanged) bounds the subtree by count
  instead of time: ids are given in the order rows are stored, so new keys land among the
  newest 262,144 rows' keys (~20 MiB), which stay in the cache whatever the rate. The price is
  on the reader's side: an object's history costs a seek per segment (38 for 10M records, as
  many as schema 3's buckets for a month; out of the page cache each is a disk read of a 64 KiB
  page) and ``--since``/``--until`` no longer skip segments (their times are checked inside
  each seek: the index ends with ``time_ns``); and segments are in the order records came, not
  their time: a record that came late sits after newer ones, so a query for the newest N reads
  the segments not yet read once more for anything newer than the Nth
  (``kubetrail.history.store``, ``Parts``). Figures: docs/benchmarks.md (issue 19, "Schema 6").
  A writer opening an older store builds the new index and drops the old in one transaction (a
  kill -9 midway leaves the old schema, migrated again next time); readers of an older store
  use its index. Schema 7 leads the uid index the same way, ``(id >> 18, uid)``
  (:data:`UID_INDEX`): a uid is random, and the index on the uid alone took each new key at a
  random place of a B-tree of the whole store; the bench's events carry none (level Metadata),
  but with half the rows carrying one (a RequestResponse policy: 25-46% of the rows of this
  repository's real clusters' audit logs) it halved the writer's rate into a 2M store
  (docs/benchmarks.md, "Schema 7"). A lookup by uid (``history UID``) seeks each segment.
* **Identity index** (schema 4; schema 7 its bucket). Schema 3's unique index on ``ident`` alone
  took each new key at a random place of a B-tree of the whole store (16-byte hashes; ~300 MiB
  at 10M records): into a store of 10M records it was what remained of the cost of an insert
  after the object index (14.5 us CPU per record against 9.4 without it). :data:`IDENT_INDEX` is
  unique on ``(IDENT_KEY, ident)``, led by the bucket of a time the identity itself determines,
  so new keys land in the newest bucket's subtree while uniqueness stays exact for all time: two
  rows of one identity always have one bucket (:func:`identity_bucket`). An audit event's
  ``(auditID, stage)`` has one ``stageTimestamp``, in the event's own bytes, whichever path
  brings it (the webhook's records, tail's, the native rows, a source that stamped the record
  with the time it read it); every other row (Events, log lines, alerts, records without
  identity, an audit event without an RFC 3339 ``stageTimestamp``) is in bucket 0, unique by
  identity alone as before, since its time is its source's and a replay may bring another (a
  tail without a time parser stamps the time it read; a time-keyed ``(time_ns, ident)`` index
  was rejected for that). ``ibucket`` is NULL for the native rows, where the key is the audit
  row's own time's bucket (its time is its ``stageTimestamp`` there); the Python path, whose
  record times are its source's, sets it. Schema 4-6's bucket was 2^46 ns (19.5 hours): the
  newest bucket's subtree grew with all that arrives in 19.5 hours, outgrew the writer's cache,
  and each commit rewrote most of its leaves (a long ingest: 10.9 us of the writer's thread a
  record into a 2M store, 6.9 without the index). Schema 7's is 2^30 ns (1.07 s: :data:`IDENT_BITS`),
  whose newest few subtrees stay in the cache at any rate (8.1 us; docs/benchmarks.md, "Schema
  7"). The price is on the reader's side: a lookup by identity must name the bucket, and
  seconds cannot be listed as schema 4-6's few buckets were (:func:`ident_buckets`). The one
  lookup by identity, an alert's audit records (``kubetrail.history.store``, ``triggers_of``),
  knows the alert's time, which is its audit event's (the ``detect`` filter gives the alert its
  record's time, the ``stageTimestamp`` or what its source stamped, the same the store keeps):
  the buckets near it, else the records stored at that time (cold on 10M records: 3 ms p50,
  against 32 ms for schema 6's list of every bucket).
* **A user's records together** (schema 5). The body of every row with a ``user`` (audit
  records; alerts whose rule prints ``ka.user.name``) lives in :data:`USER_BODIES`, a ``WITHOUT
  ROWID`` table keyed ``(user, time_ns, id)``, with the row's ``kind`` and ``verb``; the
  ``records`` row keeps its columns and an empty body (``x''``: the same one header byte as a
  NULL; the column keeps schema 4's ``NOT NULL``). Why: a cold
  ``who USER`` (newest 1,000) read each body from its own 64 KiB page of ``records``, ~1,000
  random pages (58 MiB) on the 10M-record store, p99 258-1,284 ms against a 200 ms target; from
  a table clustered by user the same answers are one range scan of ~16 pages: measured on the
  same 10M records, cold ``who`` p50 15-21 ms, p99 70-198 ms, 1.0 MiB read, against schema 4's
  88-94 / 175-258 ms, 58.6 MiB (docs/benchmarks.md, "Schema 5"). Nothing is stored twice, and the
  ``records_user (user, time_ns)`` index is gone: the table is that index, covering (``who``,
  ``search --user`` and the list of users read it), which also takes an index's keys written in
  the middle of a B-tree off each insert. The price: a second insert per row (a statement and a
  B-tree of ~1 KB cells), which costs more than the dropped index saved: 12.4-17.9 us of CPU
  per record into a 10M store (median 16.5) against 11.3-15.0 (12.5), 9.4-9.8 against 8.2-8.6
  into an empty one;
  +9-10% on disk (the table's pages are left ~90% full). Not where the bodies land: the same
  table keyed by time (every insert at its end, no place per user) measured the same CPU and
  size. And an audit body read by id (``history``, ``search``) is a second
  page, its ``(user, time_ns, id)`` in ``user_bodies`` (cold ``history`` p50 +3-11 ms, still
  far under its 200 ms target). Kept because the target it was for, cold ``who`` p99 under
  200 ms, was met by nothing else measured on the reader side. Readers get a body through
  :data:`BODY` (and the ``whole_records`` view for anyone reading the file with ``sqlite3``),
  so no caller knows about the split. Writers:
  the row goes in first (``INSERT OR IGNORE``: the identity index decides), and its body only
  when the row was new, with the row's id, in the same transaction, so a replay adds nothing to
  either table and a kill -9 leaves both or neither (the native writer does the same:
  ``StoreInserter``'s ``insert_body``). Retention deletes ``records`` rows; a trigger deletes
  their bodies. A writer migrates a schema 4 store in one transaction: the bodies copied into
  ``user_bodies`` sorted by its key, ``records`` copied into a new table without them (the same
  ids, its indexes built anew, ``records_user`` not), the old one dropped, so its pages become
  free pages, reused by later inserts and not counted by ``retention_size`` (10M records: 86 s,
  the file 4.72 -> 8.98 GiB of which 5.09 in use, the WAL ~10 GB until the commit's
  checkpoint; an UPDATE emptying the bodies in place took 190 s and left 7.14 GiB in use,
  which retention by size would have made up for by deleting old records).
* **Compressed bodies** (schema 8, ``compress zstd``, the default; :mod:`kubetrail.sinks.sqlite_bodies`
  says why and how). Once the store holds 10,000 records the writer trains a zstd dictionary on
  them, keeps it in ``dictionaries``, and stores every body after as one zstd frame made with it
  (the native writer in its decoding thread, the Python one with ``zstandard``), and a new
  dictionary when bodies compress more than twice as badly as its held-out samples did
  (``RatioWatch``); readers give
  each body back as it came (``kubetrail.history.store``). What a record costs the writer is
  mostly bytes written twice (the WAL, then the checkpoint): a ninth of the bodies' bytes for ~1 us
  of compression beside the thread running SQLite (docs/benchmarks.md, "Schema 8"). A row's
  columns, its identity and its time bucket come from the plain body, before compression. The
  bodies stored before the first dictionary are compressed in the background
  (``OldBodies``, ``_compress_old_bodies``), each row deleted and written again: the pages it
  leaves underfull are merged and freed, where an UPDATE would leave them as they were.
* **Bad files.** A file that is not SQLite, or not a kubetrail store, or a store written by a
  newer schema is never touched: the output fails with a message naming the file and what is
  wrong (retried like any start failure, so fixing the file resumes delivery). A corrupt store
  is found by ``PRAGMA quick_check`` when the writer opens it, which reads every page (3.6 s of
  CPU and the whole file from disk for 10M records): so it runs only when the last writer did
  not close the store cleanly (kill -9, a crash, a full disk at shutdown) or the file changed
  since. A clean close (also with readers open: it checkpoints every frame and empties the WAL
  they keep) leaves ``<store>-clean`` with the file's (inode, size, mtime) and the
  next writer, finding them unchanged, skips the check (damage that changes none of them, a
  bad disk block, is met by the first statement that reads it, as a reader meets it).
* **Alerts** (the ``detect`` filter's records, Falco's JSON output plus ``k8s.audit.id`` and
  ``k8s.audit.stage``) are rows of kind ``alert``: ``user``/``verb``/``resource``/``namespace``/
  ``name`` from the alert's ``output_fields`` (``ka.user.name``, ``ka.target.*``) where the rule
  prints them, and the rest in the ``alerts`` table beside (``rule``, ``priority`` and its level,
  ``tags``, ``output``, the triggering ``audit_id``/``stage``: the link to the audit record,
  whose row is found by its identity). Their identity is always ``(auditID, stage, rule)``, the
  filter's own, also for an alert read back from a file without it: a replay adds nothing.
  Schema 2 added the table; a schema-1 store gets it (empty) when a writer opens it.
* **Speed** (bench/bench_store.py; figures in docs/benchmarks.md). Where the time went, per
  audit event (~890 bytes), in CPU on this machine: building the row in Python (msgspec decode
  of the columns, the identity hash, the tuple) ~3 us, plus ~1 us to build the ``Record`` the
  tail had not built; binding the 13 values through Python's ``sqlite3`` ``executemany`` ~3.5
  us; SQLite itself (the row and its five B-trees) ~5.5 us (an ``INSERT ... SELECT`` of the same
  rows inside SQLite). So the hot path is native (``native/src/storerows.rs``): a batch still in
  its block form (``tail -> kubernetes_audit`` hands them on so, no record built) whose every
  line is an audit event goes as bytes to ``StoreInserter``, which decodes the columns and
  inserts the rows on a connection of its own, GIL released from the first line to the
  ``COMMIT`` (the event loop reads and filters on meanwhile). Same rows as :func:`row_of` (tests
  compare them): the time is the event's ``stageTimestamp``, which is what the ``k8s_audit``
  parser and the webhook give the record, and an audit event's identity is always its own
  ``(auditID, stage)``, whichever identity the record carries, so both paths agree on what a
  replay is. Anything else (a batch with records, a block with an Event, a log line, an alert,
  or a line the native decoder would read differently from msgspec) goes the Python way:
  :func:`row_of`, which stays the one place that decides a record's columns.
  Into a young store the native path takes 117,000-131,000 records/s here; into one holding 2M
  records it took 38,000-65,000 with schema 2's object index (see "Steady state").
  In the whole pipeline half the store's work was the filter's copies of the event's fields
  in each stored body (1,700 bytes instead of 890): they are left out (see above).
  The native writer is used only when it shares this process's SQLite library (see
  :func:`_one_sqlite_in_process`). Measured and not kept: ``sync normal`` (within the noise),
  a unique ``(time_ns, ident)`` index instead of ``ident`` + ``time_ns`` (-1 us of SQLite's
  5.5, but a replay whose source gave another time would then be stored twice), 16 KiB or 4 KiB
  pages (more CPU per row than 64 KiB: 7 and 10 us), ``workers 2`` (within the noise).
  Fifth pass (docs/benchmarks.md "Store ingest, fifth pass"; ``bench_store.py writer`` measures
  each part): the native writer binds a row's values in place (its strings and body are not
  copied into SQLite's buffers first: 0.8-1.1 us a row of the writer thread's 8-9, 1.4-3.0 of
  12-13 into 10M). What the thread running SQLite spends per row, ~7-7.5 us into an empty or a
  2M store at load 3-4 (~9.8 into 10M), is mostly the B-trees a row goes into beyond its table:
  the object index ~1.7-1.8 us, the identity index ~1.5-1.7, the bodies' table ~1.6 (each
  ~2.8-3.0 into 10M), the time index ~0.4-0.7; serial by SQLite's design, so 100,000
  records/s into a store holding records needs those cut (a schema change), not a setting.
  Measured there and not kept: WAL checkpoints in a thread of their own (little or no CPU taken
  off the writer's thread, 1-2 us more process CPU into a 10M store), no checkpoints while
  writing, 64 blocks a commit instead of 16, 32 or 16 KiB pages, ``mmap_size``, bodies cut to
  250 bytes (-0.8-0.9 us: the most a compression could save, before its own CPU and a schema
  change). Sixth pass: checkpoints every :data:`WAL_CHECKPOINT_PAGES` (fewer bytes written).
  A long ingest (1M records into one time bucket) fell to ~55,000 records/s: the object and
  identity indexes, random inside the newest bucket, outgrew the page cache and each commit
  rewrote most of their leaves (docs/benchmarks.md, "Store ingest, sixth pass"); schema 6's
  object index took that part away ("Steady state" above); the identity index's remains.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import orjson
import zstandard

from kubetrail.core.component import ComponentContext, Sink
from kubetrail.core.errors import RetryableError
from kubetrail.core.kinds import resource_of_kind
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record, identity_key
from kubetrail.core.secrets import file_stamp
from kubetrail.parsers.timefmt import TimeParser
from kubetrail.sinks import sqlite_bodies
from kubetrail.sinks.sqlite_bodies import (
    DICTIONARIES,
    TRAIN_AFTER_ROWS,
    BodyCompressor,
    BodyError,
    OldBodies,
    RatioWatch,
    needs_compressing,
    newest_dictionary,
    train_dictionary,
)
from kubetrail.transforms.kubernetes_audit import _Flat  # the filter's flat members, to find them

try:  # optional (built from native/): a block's audit rows without the GIL (see "Speed" above)
    from kubetrail_native import StoreInserter as _StoreInserter
    from kubetrail_native import audit_store_rows as _native_audit_rows
except ImportError:  # pragma: no cover - depends on the installation
    _native_audit_rows = None
    _StoreInserter = None

# 'ktr1': marks a kubetrail store, so a reader never mistakes another SQLite file for one.
APPLICATION_ID = 0x6B747231
# Schema 2 (issue 21 item 6) added the alerts table: ALERTS_SCHEMA, _AlertProbe/_alert_row,
# alert_columns and the INSERT_ALERT lines in StoreWriter._write are that part. Schema 3 replaced
# the object index (name, resource, namespace, time_ns) by OBJECT_INDEX, led by the record's time
# bucket (see "Steady state" above). Schema 4 replaced the unique index on ident by IDENT_INDEX,
# led by the bucket of a time the identity determines (see "Identity index" above), with the
# column ibucket for the rows whose bucket is not the default; check_store keeps the 1 -> 2 -> 3
# -> 4 steps. Schema 5 moved the bodies of the rows with a user into USER_BODIES (see "A user's
# records together" above) and dropped records_user. Schema 6 leads the object index by the
# segment of ids instead of the time bucket (see "Steady state" above). Schema 7 leads the
# identity index by a bucket of about a second instead of the time bucket (see "Identity index"),
# and the uid index by the segment of ids (UID_INDEX). Schema 8 adds the compression dictionaries
# (kubetrail.sinks.sqlite_bodies: a body is its JSON or a zstd frame made with one of them).
# The native writer (native/src/storerows.rs, StoreInserter) runs INSERT below with the 13 values
# of an audit row in this order, and INSERT_BODY with 6 for a new row with a user: a change of
# their columns changes it too. It writes audit
# rows only (their ibucket NULL: IDENT_KEY's default, the stageTimestamp's bucket); every other
# kind (alert included) is decided by row_of, here, and written by INSERT_ROW with its ibucket.
SCHEMA_VERSION = 8
# A time bucket, 2^46 ns (19.5 hours; a shift floors in SQLite and Python alike, negative times
# included), as an expression: no column to fill, the INSERT unchanged. It led schema 3-5's object
# index (OLD_OBJECT_INDEX) and schema 4-6's identity index (OLD_IDENT_INDEX_NAME), which readers
# of such a store still use. A query must spell it exactly so for SQLite to use the index.
BUCKET_BITS = 46
BUCKET_KEY = f"time_ns >> {BUCKET_BITS}"
OLD_OBJECT_INDEX = "records_object_bucket"
# Schema 6: the object index led by a segment of 2^SEGMENT_BITS consecutive ids (see "Steady
# state" above); schema 7 the uid index too (a uid is random: schema 6's index on the uid alone took
# each new key at a random place of a B-tree of the whole store). Readers take the width from the
# index's own SQL (segment_bits), so a store built with another width is read right.
SEGMENT_BITS = 18
OBJECT_INDEX_NAME = "records_object_segment"
OBJECT_INDEX = (
    f"CREATE INDEX IF NOT EXISTS {OBJECT_INDEX_NAME} ON records (id >> {SEGMENT_BITS}, name, resource, namespace,"
    " time_ns) WHERE name IS NOT NULL"
)
# The identity index's leading key: the bucket of a time the identity determines, so that new
# keys land in the newest bucket's subtree instead of all over a B-tree of the whole store (see
# "Identity index" above). ``ibucket`` when the writer set it (the Python path always does,
# identity_bucket); NULL (the native rows) means: an audit row's own time's bucket (its time is
# its stageTimestamp there), 0 for every other kind. Schema 7's bucket is 2^IDENT_BITS ns (about a
# second); schema 4-6's was the time bucket (2^46 ns, OLD_IDENT_INDEX_NAME, which readers of such
# a store still use). Lookups by identity must name the bucket; readers take its width from the
# index's own SQL (ident_bucket_bits).
IDENT_BITS = 30
IDENT_INDEX_NAME = "records_ident_second"
OLD_IDENT_INDEX_NAME = "records_ident_bucket"


def ident_key(bits: int) -> str:
    """The identity index's leading key for buckets of 2^bits ns, spelt as the index spells it."""
    return f"ifnull(ibucket, CASE WHEN kind = 'audit' THEN time_ns >> {bits} ELSE 0 END)"


IDENT_KEY = ident_key(IDENT_BITS)
IDENT_INDEX = f"CREATE UNIQUE INDEX IF NOT EXISTS {IDENT_INDEX_NAME} ON records ({IDENT_KEY}, ident)"
UID_INDEX_NAME = "records_uid_segment"
UID_INDEX = f"CREATE INDEX IF NOT EXISTS {UID_INDEX_NAME} ON records (id >> {SEGMENT_BITS}, uid) WHERE uid IS NOT NULL"
RETENTION_CHUNK = 20_000  # rows deleted per statement: keeps each write lock short
# A WAL checkpoint after every 4,000 pages (256 MiB of 64 KiB pages) instead of SQLite's 1,000: an
# index leaf written by many commits is copied into the database file once per checkpoint, so
# fewer checkpoints write fewer bytes (into a 2M store 3.0 instead of 3.6 KB a record, ~4% more
# records/s: docs/benchmarks.md, "Store ingest, sixth pass"). The WAL file keeps its high-water
# mark while the writer runs (removed at a clean close). A reader holding an old snapshot keeps
# checkpoints from finishing and the WAL grows past it; WAL_LIMIT_BYTES is what the file is cut
# back to when the WAL starts anew (SQLite's journal_size_limit), so that growth does not stay
# on disk. Both settings are per connection: the Python writer's and the native one's.
WAL_CHECKPOINT_PAGES = 4000
WAL_LIMIT_BYTES = 512 * 2**20


def _wal_settings() -> str:
    """The WAL's settings above, as statements for a writer connection (read when it opens)."""
    return f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}; PRAGMA journal_size_limit={WAL_LIMIT_BYTES};"


RECORDS_TABLE = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    ident BLOB NOT NULL,
    time_ns INTEGER NOT NULL,
    kind TEXT NOT NULL,
    user TEXT,
    verb TEXT,
    resource TEXT,
    namespace TEXT,
    name TEXT,
    uid TEXT,
    code INTEGER,
    reason TEXT,
    tag TEXT NOT NULL,
    body BLOB NOT NULL,
    ibucket INTEGER
);"""
COLUMNS = "id, ident, time_ns, kind, user, verb, resource, namespace, name, uid, code, reason, tag, body, ibucket"
SCHEMA = f"""{RECORDS_TABLE}
{IDENT_INDEX};
CREATE INDEX IF NOT EXISTS records_time ON records (time_ns);
{OBJECT_INDEX};
{UID_INDEX};
"""
# Schema 5: the bodies of the rows with a user, together by user (see "A user's records together").
# A records row with a user has an empty body; BODY is the body of a records row aliased ``r``.
BODY = (
    "CASE WHEN r.user IS NULL THEN r.body ELSE (SELECT b.body FROM user_bodies b"
    " WHERE b.user = r.user AND b.time_ns = r.time_ns AND b.id = r.id) END"
)
USER_BODIES_TABLE = """
CREATE TABLE IF NOT EXISTS user_bodies (
    user TEXT NOT NULL,
    time_ns INTEGER NOT NULL,
    id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    verb TEXT,
    body BLOB NOT NULL,
    PRIMARY KEY (user, time_ns, id)
) WITHOUT ROWID;"""
USER_BODIES = f"""{USER_BODIES_TABLE}
CREATE TRIGGER IF NOT EXISTS user_bodies_retention AFTER DELETE ON records WHEN old.user IS NOT NULL
BEGIN DELETE FROM user_bodies WHERE user = old.user AND time_ns = old.time_ns AND id = old.id; END;
CREATE VIEW IF NOT EXISTS whole_records AS SELECT id, ident, time_ns, kind, user, verb, resource, namespace,
    name, uid, code, reason, tag, {BODY} AS body, ibucket FROM records r;
"""
# The detect filter's alerts: what a search filters them by, and the link to the audit record.
ALERTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,
    audit_id TEXT,
    stage TEXT,
    rule TEXT NOT NULL,
    priority TEXT,
    level INTEGER,
    tags TEXT,
    output TEXT
);
CREATE INDEX IF NOT EXISTS alerts_audit ON alerts (audit_id);
CREATE INDEX IF NOT EXISTS alerts_rule ON alerts (rule);
CREATE TRIGGER IF NOT EXISTS alerts_retention AFTER DELETE ON records WHEN old.kind = 'alert'
BEGIN DELETE FROM alerts WHERE id = old.id; END;
"""
INSERT_ALERT = (
    "INSERT OR IGNORE INTO alerts (id, audit_id, stage, rule, priority, level, tags, output)"
    f" SELECT id, ?, ?, ?, ?, ?, ?, ? FROM records WHERE {IDENT_KEY} = 0 AND ident = ? AND kind = 'alert'"
)
INSERT = (
    "INSERT OR IGNORE INTO records (ident, time_ns, kind, user, verb, resource, namespace, name, uid, code, reason,"
    " tag, body) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
# A new row's body when it has a user (schema 5): user, time_ns, the row's id, kind, verb, body.
INSERT_BODY = "INSERT INTO user_bodies (user, time_ns, id, kind, verb, body) VALUES (?,?,?,?,?,?)"
# An old body compressed (OldBodies): its row deleted and written again, as an UPDATE would not
# do: SQLite merges the pages a delete leaves underfull, never those a smaller cell does (an
# UPDATE left a store's pages in use as they were; this frees ~80% of user_bodies' pages).
UPDATE_ROW_BODY = "UPDATE records SET body = ? WHERE id = ?"  # an alert's (its trigger)
DELETE_ROW = "DELETE FROM records WHERE id = ?"
INSERT_ROW_AGAIN = f"INSERT INTO records ({COLUMNS}) VALUES ({', '.join('?' * len(COLUMNS.split(',')))})"
DELETE_USER_BODY = "DELETE FROM user_bodies WHERE user = ? AND time_ns = ? AND id = ?"
_BODY_AT = [name.strip() for name in COLUMNS.split(",")].index("body")
# The Python path's rows: a Row and its identity bucket (identity_bucket).
INSERT_ROW = (
    "INSERT OR IGNORE INTO records (ident, time_ns, kind, user, verb, resource, namespace, name, uid, code, reason,"
    " tag, body, ibucket) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


class StoreError(Exception):
    """A store file that cannot be used as it is (corrupt, not ours, newer schema, in use)."""


# -- picking the indexed columns out of a record ------------------------------------------------


class _User(msgspec.Struct):
    username: str | None = None


class _Ref(msgspec.Struct):
    resource: str | None = None
    namespace: str | None = None
    name: str | None = None
    uid: str | None = None
    subresource: str | None = None


class _Status(msgspec.Struct):
    code: int | None = None


class _Involved(msgspec.Struct):
    kind: str | None = None
    namespace: str | None = None
    name: str | None = None
    uid: str | None = None


class _Kube(msgspec.Struct):
    pod_name: str | None = None
    namespace_name: str | None = None
    pod_id: str | None = None
    container_name: str | None = None


class _Meta(msgspec.Struct):
    name: str | None = None
    namespace: str | None = None
    uid: str | None = None


class _ResponseObject(msgspec.Struct):
    metadata: _Meta | None = None


class _Probe(msgspec.Struct):
    """The members of an audit Event, a Kubernetes Event or a container log record that become
    columns; everything else in the JSON is skipped by the decoder without being built."""

    auditID: str | None = None
    stage: str | None = None
    verb: str | None = None
    user: _User | None = None
    objectRef: _Ref | None = None
    responseStatus: _Status | None = None
    responseObject: _ResponseObject | msgspec.Raw | None = None
    kind: str | msgspec.Raw | None = None
    involvedObject: _Involved | None = None
    regarding: _Involved | None = None
    reason: str | msgspec.Raw | None = None
    reportingController: str | None = None
    kubernetes: _Kube | None = None


class _AlertProbe(msgspec.Struct):
    """The members of a ``detect`` alert that become columns (Falco's JSON output + identity)."""

    rule: str
    priority: str | None = None
    tags: list[str] | None = None
    output: str | None = None
    output_fields: dict[str, str | None] | None = None
    audit_id: str | None = msgspec.field(default=None, name="k8s.audit.id")
    stage: str | None = msgspec.field(default=None, name="k8s.audit.stage")


_DECODER = msgspec.json.Decoder(_Probe)
_ALERT_DECODER = msgspec.json.Decoder(_AlertProbe)
Row = tuple[
    bytes,
    int,
    str,
    str | None,
    str | None,
    str | None,
    str | None,
    str | None,
    str | None,
    int | None,
    str | None,
    str,
    bytes,
]


def _probe(record: Record, data: bytes) -> _Probe | None:
    try:
        return _DECODER.decode(data)
    except msgspec.ValidationError:
        # A member of an unexpected type (a log line whose "kubernetes" is a string): the
        # record is still stored whole, without columns.
        return None


def _ident(record: Record, data: bytes) -> bytes:
    key = identity_key(record)
    if key is not None:
        return bytes.fromhex(key)
    return hashlib.blake2b(
        record.tag.encode() + b"\0" + str(record.time_ns).encode() + b"\0" + data, digest_size=16
    ).digest()


# The members the kubernetes_audit filter puts in front of an event's own (see that module): copies
# of the event's fields, compact JSON. They are found by this pattern: the longest run of such
# members at the start of the object, each with its comma (so a line flattened twice loses both
# runs); the native module scans for the same by hand, given the keys (tests compare the two).
_FLAT_KEYS = tuple(_Flat.__struct_encode_fields__)
_JSON_STRING = r'"[^"\\]*(?:\\.[^"\\]*)*"'  # unrolled: 3x faster in Python's re than (?:[^"\\]|\\.)*
_FLAT_VALUE = rf"(?:{_JSON_STRING}|-?[0-9]+|true|false|\[(?:{_JSON_STRING}(?:,{_JSON_STRING})*)?\])"
FLAT_PREFIX = r'\A\{(?:"(?:' + "|".join(re.escape(key) for key in _FLAT_KEYS) + rf')":{_FLAT_VALUE},)+'
_FLAT_RE = re.compile(FLAT_PREFIX.encode())


def without_flat_prefix(data: bytes) -> bytes:
    """An audit event's bytes without the members ``kubernetes_audit`` copied in front of them
    (about as many bytes again, all already in the event): the event as the API server wrote
    it. Kept whole when the filter marked it ``k8s.audit.redacted`` (the one member that is not
    a copy), or when the run of such members has no ``k8s.audit.id`` or is not followed by
    another member. ``without_flat_prefix`` in native/src/storerows.rs does the same."""
    match = _FLAT_RE.match(data)
    if match is None or data[match.end() : match.end() + 1] != b'"':
        return data
    prefix = match.group()
    if b'"k8s.audit.id":' not in prefix or b'"k8s.audit.redacted":' in prefix:
        return data
    return b"{" + data[match.end() :]


def audit_ident(audit_id: str, stage: str) -> bytes:
    """An audit event's identity: :func:`identity_key` of ``(auditID, stage)`` as 16 bytes,
    taken from the event itself whatever identity its record carries (the ``kubernetes_audit``
    filter gives that one; ``tail`` alone gives ``(file, offset)``), so the native block path and
    this one always agree and the same event from two sources is stored once."""
    return hashlib.blake2b(f"{audit_id}\x1f{stage}".encode(), digest_size=16).digest()


class _Stamp(msgspec.Struct):
    stageTimestamp: str | None = None


_STAMP_DECODER = msgspec.json.Decoder(_Stamp)


def identity_bucket(kind: str, body: bytes, times: TimeParser | None = None, bits: int = IDENT_BITS) -> int:
    """The identity index's bucket of a stored row (the ``ibucket`` of :data:`IDENT_KEY`): what
    every replay of the same identity, by whichever path, gives again, so that "a replay changes
    nothing" holds for all time. An audit event's ``(auditID, stage)`` has one
    ``stageTimestamp``, in the event the API server wrote (its webhook and its log give the same
    text; the native rows' time is the same parse of it): that time's bucket. Every other row
    gets 0, where the identity alone decides: an Event's ``(uid, resourceVersion)``, a log line's
    ``(file, offset)``, an alert's ``(auditID, stage, rule)`` have times their source gives, which a
    replay may give otherwise (a tail without a time parser stamps the time it read); so does an
    audit event without a ``stageTimestamp`` in RFC 3339. ``times``: a parser to reuse (not
    thread-safe: one per writer); ``bits``: the bucket's width (2^bits ns), schema 4-6's
    :data:`BUCKET_BITS` for their migrations."""
    if kind != "audit":
        return 0
    try:
        stamp = _STAMP_DECODER.decode(body).stageTimestamp
        if stamp is None:
            return 0
        return (times or TimeParser()).parse_ns(stamp) >> bits
    except (msgspec.DecodeError, ValueError, OverflowError):
        return 0


def row_of(record: Record) -> Row:
    """The row for ``record``: identity, time, kind and the indexed columns, and its bytes.

    The one place that decides a record's columns, by kind (audit, event, log, other): a new
    kind of record (alerts, say) gets its branch here, and ``audit_store_rows`` in
    ``native/src/storerows.rs`` must keep giving what the audit branch gives.
    """
    data = record.json_bytes()
    p = _probe(record, data)
    if p is not None:
        if p.auditID is not None and p.stage is not None:
            ident = audit_ident(p.auditID, p.stage)
            ref = p.objectRef or _Ref()
            resource = ref.resource  # a subresource (scale, status, exec) stays in the body
            uid = ref.uid
            name = ref.name
            response = p.responseObject
            if isinstance(response, _ResponseObject) and response.metadata is not None:
                meta = response.metadata
                if name is None and p.verb == "create":
                    name = meta.name  # a create with generateName: the name is in the answer only
                if uid is None and meta.name == name:
                    uid = meta.uid
            user = p.user.username if p.user is not None else None
            code = p.responseStatus.code if p.responseStatus is not None else None
            return (
                ident,
                record.time_ns,
                "audit",
                user,
                p.verb,
                resource,
                ref.namespace,
                name,
                uid,
                code,
                None,
                record.tag,
                without_flat_prefix(data),
            )
        involved = p.involvedObject or p.regarding
        if involved is not None and (p.kind == "Event" or p.kind is None):
            reason = p.reason if isinstance(p.reason, str) else None
            resource = resource_of_kind(involved.kind) if involved.kind else None
            return (
                _ident(record, data),
                record.time_ns,
                "event",
                None,
                None,
                resource,
                involved.namespace,
                involved.name,
                involved.uid,
                None,
                reason,
                record.tag,
                data,
            )
        kube = p.kubernetes
        if kube is not None and kube.pod_name is not None:
            return (
                _ident(record, data),
                record.time_ns,
                "log",
                None,
                None,
                "pods",
                kube.namespace_name,
                kube.pod_name,
                kube.pod_id,
                None,
                kube.container_name,
                record.tag,
                data,
            )
    if b'"k8s.audit.id"' in data:  # only rows that would be "other" pay for this look
        alert = _alert_probe(data)
        if alert is not None:
            return _alert_row(alert, record, data)
    return (
        _ident(record, data),
        record.time_ns,
        "other",
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        record.tag,
        data,
    )


def _block_of(batch: Batch) -> bytes | None:
    """A batch still in its block form (tail -> kubernetes_audit gives these: no record built
    yet), for the native rows; None for one with records (their times and identities are the
    records' own: those rows are built by :func:`row_of`)."""
    if _native_audit_rows is None or batch.is_materialized:
        return None
    block = batch.raw_block
    return None if batch.is_materialized else block  # validation failed: now its source's records


def native_rows(tag: str, block: bytes) -> list[Row] | None:
    """The rows of a block of audit event lines, built natively without the GIL; None when a
    line is not an audit event the native decoder takes (then :func:`row_of` decides)."""
    if _native_audit_rows is None:
        return None
    return _native_audit_rows(tag, block, list(_FLAT_KEYS))  # type: ignore[no-any-return]


def _alert_probe(data: bytes) -> _AlertProbe | None:
    try:
        return _ALERT_DECODER.decode(data)
    except msgspec.ValidationError:
        return None  # a record that only looks like an alert: stored as "other"


def alert_ident(audit_id: str | None, stage: str | None, rule: str) -> bytes:
    """The identity the detect filter gives an alert, ``(auditID, stage, "detect", rule)``, as
    :func:`~kubetrail.core.record.identity_key` makes it: the same bytes with or without the
    record's identity (an alert read back from a file has none)."""
    text = "\x1f".join(("" if audit_id is None else audit_id, "" if stage is None else stage, "detect", rule))
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _alert_row(alert: _AlertProbe, record: Record, data: bytes) -> Row:
    fields = alert.output_fields or {}
    code_text = fields.get("ka.response.code")
    code = int(code_text) if code_text is not None and code_text.isdigit() else None
    return (
        alert_ident(alert.audit_id, alert.stage, alert.rule),
        record.time_ns,
        "alert",
        fields.get("ka.user.name"),
        fields.get("ka.verb"),
        fields.get("ka.target.resource"),
        fields.get("ka.target.namespace"),
        fields.get("ka.target.name"),
        None,
        code,
        None,
        record.tag,
        data,
    )


def alert_columns(row: Row) -> tuple[Any, ...]:
    """The ``alerts`` table's values for an alert row, for INSERT_ALERT."""
    from kubetrail.detect.rules import priority_level  # only a store that holds alerts needs it

    alert = _alert_probe(row[12])
    assert alert is not None  # the row was made from it
    try:
        level: int | None = priority_level(alert.priority)
    except ValueError:
        level = None  # an unknown priority is kept as written, matched by no --priority
    tags = orjson.dumps(alert.tags).decode() if alert.tags is not None else None
    return (alert.audit_id, alert.stage, alert.rule, alert.priority, level, tags, alert.output, row[0])


# -- opening a store ----------------------------------------------------------------------------


def check_store(conn: sqlite3.Connection, path: Path, *, writable: bool) -> None:
    """Refuse a file that is not a kubetrail store of a schema this version reads, and create
    the schema in a new (empty) one when ``writable``. Nothing is changed in a refused file."""
    try:
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path} is not a usable kubetrail store: {exc} (the file is corrupt or not SQLite)") from None
    if application_id == 0 and version == 0 and tables == 0:
        if not writable:
            raise StoreError(f"{path} is an empty store: nothing was recorded into it yet")
        try:
            # 64 KiB pages (set before the first table): records of about 1 KB and random index
            # inserts touch fewer pages per commit; measured 25% faster ingest and 20% smaller.
            conn.execute("PRAGMA page_size=65536")
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.executescript(SCHEMA + ALERTS_SCHEMA + USER_BODIES + DICTIONARIES)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot create the store schema in {path}: {exc}") from None
        return
    if application_id != APPLICATION_ID:
        raise StoreError(
            f"{path} is an SQLite file but not a kubetrail store (application_id {application_id:#x}); "
            "it was not changed"
        )
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} was written by a newer kubetrail (store schema {version}; this version reads up to "
            f"{SCHEMA_VERSION}); it was not changed: upgrade kubetrail to read it"
        )
    if version < 1:
        raise StoreError(f"{path} has no store schema version; it was not changed")
    if version < SCHEMA_VERSION and writable:
        # Schema 2 only adds the alerts table (readers of a schema-1 store find no alerts); 3
        # builds the bucket-led object index and drops the old one (readers of an older store query
        # the old one: kubetrail.history.store); 4 adds ibucket (no row rewritten: NULL, the
        # default bucket), sets it on the audit rows whose stageTimestamp's bucket is not their
        # time's (a source that stamped them otherwise; none from tail's k8s_audit parser, the
        # webhook or the native rows), builds the bucket-led identity index and drops the global
        # one. One transaction: a kill -9 during the index builds (seconds per million records)
        # leaves the old schema, built again next time. 5 (after 4's step, which reads the audit
        # bodies) copies the bodies of the rows with a user into user_bodies (sorted by its key:
        # appended in order) and records into a new table without them (the same ids; its
        # indexes built anew, records_user not), then drops the old one: its pages become free
        # pages, reused by later inserts and not counted by retention_size (an UPDATE emptying
        # the bodies in place left them in use, ~35% of a migrated store that retention by size
        # would have made up for by deleting old records). 6 builds the segment-led object index
        # and drops the bucket-led one (seconds per million records, in the same transaction). 7
        # sets every audit row's identity bucket anew at its width (a NULL where its time's own,
        # the body decoded for it: rows a source stamped otherwise, or set by the Python path at
        # schema 4-6's width, are written), builds the identity index and drops the old one; the
        # new buckets are found before the transaction (_changed_identity_buckets: reads only).
        # It also builds the segment-led uid index and drops the one on the uid alone. 8 adds the
        # dictionaries table (no body rewritten here: the writer compresses the bodies before it in
        # the background, OldBodies).
        try:
            steps = _steps_to_7(conn, version) if version < 7 else ""
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot migrate {path} from store schema {version} to {SCHEMA_VERSION}: {exc}") from None
        steps += DICTIONARIES
        try:
            conn.executescript(f"BEGIN; {steps} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        except sqlite3.DatabaseError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"cannot migrate {path} from store schema {version} to {SCHEMA_VERSION}: {exc}") from None
        finally:
            conn.execute("DROP TABLE IF EXISTS temp.new_buckets")


def _steps_to_7(conn: sqlite3.Connection, version: int) -> str:
    """The SQL of the migration from schema ``version`` to 7 (see check_store), after its reading
    part (_changed_identity_buckets, which fills ``temp.new_buckets``)."""
    steps = (ALERTS_SCHEMA if version < 2 else "") + (
        f"{OBJECT_INDEX}; DROP INDEX IF EXISTS records_object; DROP INDEX IF EXISTS {OLD_OBJECT_INDEX};"
    )
    columns = {row[1] for row in conn.execute("PRAGMA table_info(records)")}
    if "ibucket" not in columns:
        steps += "ALTER TABLE records ADD COLUMN ibucket INTEGER;"
    _changed_identity_buckets(conn, version, "ibucket" in columns)
    steps += (
        "DROP INDEX IF EXISTS records_uid; DROP INDEX IF EXISTS records_ident;"
        f"DROP INDEX IF EXISTS {OLD_IDENT_INDEX_NAME};"
        "UPDATE records SET ibucket = (SELECT n.bucket FROM temp.new_buckets n WHERE n.id = records.id)"
        " WHERE id IN (SELECT id FROM temp.new_buckets);"
        + (f"{IDENT_INDEX}; {UID_INDEX};" if version >= 5 else "")  # else in the table the next step builds
    )
    if version < 5:
        kept = COLUMNS.replace("body", "CASE WHEN user IS NULL THEN body ELSE x'' END")
        steps += (
            USER_BODIES_TABLE + "INSERT INTO user_bodies (user, time_ns, id, kind, verb, body)"
            " SELECT user, time_ns, id, kind, verb, body FROM records NOT INDEXED WHERE user IS NOT NULL"
            " ORDER BY user, time_ns, id;"
            + RECORDS_TABLE.replace("EXISTS records (", "EXISTS records_v5 (", 1)
            + f"INSERT INTO records_v5 ({COLUMNS}) SELECT {kept} FROM records ORDER BY id;"
            "DROP TABLE records; ALTER TABLE records_v5 RENAME TO records;" + SCHEMA + ALERTS_SCHEMA + USER_BODIES
        )
    return steps


def _changed_identity_buckets(conn: sqlite3.Connection, version: int, has_ibucket: bool) -> None:
    """Schema 7's migration, its reading part: every audit row's identity bucket at
    :data:`IDENT_BITS` (:func:`identity_bucket` of its body; NULL where it is its time's own),
    and the rows whose ``ibucket`` that changes into ``temp.new_buckets (id, bucket)``, which
    the migration's transaction applies. Each body is parsed once here; an UPDATE with the same
    function in SQL calls it twice for each row it changes, which is every audit row the Python
    path wrote (the webhook's): as fast where no row changes (8 s for 2M records), 2x where all do."""
    conn.execute("DROP TABLE IF EXISTS temp.new_buckets")
    conn.execute("CREATE TEMP TABLE new_buckets (id INTEGER PRIMARY KEY, bucket INTEGER)")
    body = "r.body" if version < 5 else BODY
    old = "r.ibucket" if has_ibucket else "NULL"
    times = TimeParser()
    changed: list[tuple[int, int | None]] = []
    for row_id, time_ns, was, data in conn.execute(
        f"SELECT r.id, r.time_ns, {old}, {body} FROM records r WHERE r.kind = 'audit'"
    ):
        bucket = identity_bucket("audit", data, times)
        now = None if bucket == time_ns >> IDENT_BITS else bucket
        if now != was:
            changed.append((row_id, now))
            if len(changed) >= 100_000:
                conn.executemany("INSERT INTO temp.new_buckets VALUES (?, ?)", changed)
                changed.clear()
    conn.executemany("INSERT INTO temp.new_buckets VALUES (?, ?)", changed)


def segment_bits(conn: sqlite3.Connection, index: str = OBJECT_INDEX_NAME) -> int | None:
    """The segment width of a store's index led by the segment of ids (the object index since
    schema 6, the uid index since 7), read from the index's SQL; None for a store without that
    index (the object index led by the time bucket or the name, the uid index by the uid)."""
    sql = "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?"
    row = conn.execute(sql, (index,)).fetchone()
    found = re.search(r"\(id >> (\d+),", row[0]) if row else None
    return int(found.group(1)) if found else None


def ident_bucket_bits(conn: sqlite3.Connection) -> int | None:
    """The width of a store's identity buckets (2^bits ns), read from its identity index's SQL:
    :data:`IDENT_BITS` for schema 7, :data:`BUCKET_BITS` for schema 4-6; None for a store of
    schema 3 or older (unique on ``ident`` alone)."""
    sql = "SELECT sql FROM sqlite_master WHERE type = 'index' AND name IN (?, ?)"
    row = conn.execute(sql, (IDENT_INDEX_NAME, OLD_IDENT_INDEX_NAME)).fetchone()
    found = re.search(r"time_ns >> (\d+)", row[0]) if row else None
    return int(found.group(1)) if found else None


def ident_buckets(conn: sqlite3.Connection, key: str) -> list[int]:
    """Every identity bucket a store holds (``key``: its :func:`ident_key`), for a lookup by
    identity that knows no time (``WHERE key IN (...) AND ident IN (...)``): one seek of the
    identity index per bucket, a few dozen for a month of records in schema 4-6's buckets of
    19.5 hours (schema 7's, a second each, are looked up around a time instead)."""
    found: list[int] = []
    after = -(1 << 62)
    while True:
        row = conn.execute(f"SELECT {key} FROM records WHERE {key} > ? ORDER BY {key} LIMIT 1", (after,)).fetchone()
        if row is None:
            return found
        after = row[0]
        found.append(after)


def _clean_mark(path: Path) -> Path:
    return path.with_name(path.name + "-clean")


def _mark_clean(path: Path) -> None:
    """After a clean close (the WAL checkpointed into the file and gone): remember the file as
    it was left, so that the next writer can skip reading all of it (see :func:`_left_clean`).

    The marker must be newer than the file's last change by at least one tick of the clock the
    kernel stamps files with (a few ms): a stray write to the store in the same tick as the
    marker would otherwise leave the stamp unchanged."""
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        return  # frames a reader kept from the checkpoint: the next open checks
    mark = _clean_mark(path)
    stamp = file_stamp(str(path))  # (inode, mtime, size), as credential files are watched
    if stamp is None:
        return
    for _ in range(50):
        mark.write_bytes(orjson.dumps(stamp))
        if os.stat(mark).st_mtime_ns > stamp[1]:
            return
        time.sleep(0.005)
    mark.unlink(missing_ok=True)


def _left_clean(path: Path) -> bool:
    """Whether ``path`` is exactly as a clean close left it (the marker's stamp), taking the marker
    away in any case: from here on this writer changes the file, and a crash must not leave a
    marker behind."""
    mark = _clean_mark(path)
    try:
        stamp = orjson.loads(mark.read_bytes())
        marked = os.stat(mark).st_mtime_ns
        mark.unlink()
    except (OSError, ValueError):
        mark.unlink(missing_ok=True)
        return False
    current = file_stamp(str(path))
    wal = Path(f"{path}-wal")
    unchanged = current is not None and stamp == list(current) and current[1] < marked
    return unchanged and not (wal.exists() and wal.stat().st_size > 0)


def _quick_check(conn: sqlite3.Connection, path: Path) -> None:
    try:
        result = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path} is corrupt: {exc}; it was not changed (move it aside to start a new store)") from None
    if result != "ok":
        raise StoreError(f"{path} is corrupt ({result}); it was not changed (move it aside to start a new store)")


def open_reader(path: str | Path) -> sqlite3.Connection:
    """A read-only connection to an existing store (``kubetrail history`` and the UI)."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"no store at {path} (write one with the sqlite output, e.g. `scripts/run`)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open store {path}: {exc}") from None
    conn.execute("PRAGMA busy_timeout=5000")
    check_store(conn, path, writable=False)
    return conn


def _one_sqlite_in_process() -> bool:
    """Whether the native writer's SQLite is the very library Python's sqlite3 module uses.

    Two SQLite libraries in one process would each keep their own table of the POSIX locks they
    hold, and closing a file in one drops the other's locks: the UI's readers (Python) and the
    native writer must share one. The native module links the system's libsqlite3 dynamically;
    so does Python's ``_sqlite3`` here when its file names that library, and then the loader maps
    it once: exactly one libsqlite3 mapped, of the same version."""
    if _StoreInserter is None:
        return False
    try:
        import _sqlite3

        if b"libsqlite3.so" not in Path(_sqlite3.__file__).read_bytes():
            return False  # a Python with SQLite built in
        with open("/proc/self/maps") as maps:
            libraries = {line.split()[-1] for line in maps if "libsqlite3" in line}
    except (OSError, AttributeError):
        return False
    return len(libraries) == 1 and _StoreInserter.sqlite_version() == sqlite3.sqlite_version


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction on the writer's connection: committed, or rolled back and raised."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class StoreWriter:
    """The single writer of a store file: schema, pragmas, the writer lock, inserts, retention.
    Synchronous; the sink calls it from a worker thread.

    ``native``: blocks of audit events are decoded and inserted by the native module's
    ``StoreInserter`` (a second connection of this process, used only for those inserts) when
    it is built and shares this process's SQLite; ``False`` keeps every insert in Python.
    ``compress``: bodies are compressed with the store's dictionary, trained once the store holds
    enough records (:mod:`kubetrail.sinks.sqlite_bodies`)."""

    def __init__(
        self,
        path: str | Path,
        *,
        sync: str = "full",
        retention_time: float = 0.0,
        retention_size: int = 0,
        retention_interval: float = 60.0,
        native: bool = True,
        compress: bool = True,
        train_after: int = TRAIN_AFTER_ROWS,
        log: logging.Logger | None = None,
    ) -> None:
        self.path = Path(path)
        self.sync = sync
        self.use_native = native
        self.compress = compress
        self.log = log or logging.getLogger(__name__)
        self.compressor: BodyCompressor | None = None  # the store's newest dictionary, once it has one
        self._ratio: RatioWatch | None = None  # how well the bodies compress with it
        self._retired = (0, 0)  # bytes compressed by this writer's earlier Python compressors
        # The bodies stored before the store's first dictionary, compressed in the background.
        self._old_bodies = OldBodies(BODY) if compress else None
        self.train_after = train_after  # the records a store holds when its dictionary is trained
        self._train_at = train_after
        self.native: Any = None  # the StoreInserter, once open
        self.retention_time = retention_time
        self.retention_size = retention_size
        self.retention_interval = retention_interval
        self._next_retention = 0.0
        self.deleted = 0
        self._lock_fd: int | None = None
        self._write_lock = threading.Lock()
        self._times = TimeParser()  # identity_bucket's, used under the write lock
        self.conn: sqlite3.Connection | None = None

    def open(self) -> None:
        existed = self.path.exists() and self.path.stat().st_size > 0
        if not existed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"{self.path} is in use by another writer (one writer per store; readers are fine)"
            ) from None
        conn = None
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            # 64 MiB (SQLite's default is 2 MiB, 31 pages of 64 KiB): the identity index is written at
            # random places, and a migration reads the bodies by index (10x slower with the default).
            conn.execute("PRAGMA cache_size=-65536")
            if existed and not _left_clean(self.path):
                # Every page read once (3.6 s of CPU for 10M records): only when the store was not
                # closed cleanly by the last writer, or changed since (see _mark_clean).
                _quick_check(conn, self.path)
            check_store(conn, self.path, writable=True)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.sync.upper()}")
            conn.execute("PRAGMA busy_timeout=10000")
            conn.executescript(_wal_settings())
        except (StoreError, sqlite3.Error) as exc:
            if conn is not None:
                conn.close()
            os.close(fd)
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot open store {self.path}: {exc}") from None
        if self.use_native and _one_sqlite_in_process():
            try:
                self.native = _StoreInserter(
                    str(self.path),
                    self.sync.upper(),
                    INSERT,
                    list(_FLAT_KEYS),
                    insert_body=INSERT_BODY,
                    setup=_wal_settings(),
                )
            except TypeError:  # a native module older than this file: every row goes the Python way
                self.native = None
            except RuntimeError as exc:
                conn.close()
                os.close(fd)
                raise StoreError(f"cannot open store {self.path}: {exc}") from None
            if self.native is not None and not hasattr(self.native, "compressed_bytes"):
                self.native = None  # older than compression: the Python way compresses
        self.conn = conn
        self._lock_fd = fd
        if self.compress:
            self._use(newest_dictionary(conn))

    def _use(self, compressor: BodyCompressor | None, trained: bool = False) -> None:
        """Compress with ``compressor`` from the next write on; ``trained``: it was just trained
        here (the next may not be before RETRAIN_INTERVAL; a store's dictionary found at the open
        may be replaced at the first window that compresses badly)."""
        if self.compressor is not None and compressor is not self.compressor:
            plain, stored = self._retired
            self._retired = (plain + self.compressor.plain_bytes, stored + self.compressor.stored_bytes)
        self.compressor = compressor
        if compressor is None:
            self._ratio = None
            return
        if self.native is not None:
            self.native.use_dictionary(compressor.dictionary, compressor.level)
        not_before = time.monotonic() + sqlite_bodies.RETRAIN_INTERVAL if trained else 0.0
        self._ratio = RatioWatch(compressor.ratio, *self.compressed_bytes(), not_before=not_before)

    def compressed_bytes(self) -> tuple[int, int]:
        """Bytes of the bodies this writer compressed so far, before and after (a replay's too,
        except where the native writer saw it was one: kubetrail_native's ``StoreInserter``)."""
        plain, stored = self._retired
        if self.compressor is not None:
            plain, stored = plain + self.compressor.plain_bytes, stored + self.compressor.stored_bytes
        if self.native is not None:
            native_plain, native_stored = self.native.compressed_bytes()
            plain, stored = plain + native_plain, stored + native_stored
        return plain, stored

    def write_blocks(self, blocks: list[tuple[str, bytes]]) -> int | None:
        """Insert the rows of blocks of audit event lines (``(tag, block)``) in one transaction,
        built without the GIL; returns how many were new, or None, with nothing written, when a
        line is not an audit event the native decoder takes (then the caller gives records to
        :meth:`write`). Raises ``sqlite3.Error`` with the transaction rolled back."""
        with self._write_lock:
            if self.native is None:
                built = [native_rows(tag, block) for tag, block in blocks]
                if any(rows is None for rows in built):
                    return None
                return self._write([row for rows in built for row in rows])  # type: ignore[union-attr]
            try:
                added: int | None = self.native.write(blocks)
            except RuntimeError as exc:  # SQLite's error, rolled back (a full disk, an I/O error)
                raise sqlite3.OperationalError(str(exc)) from None
            if added is not None:
                self._after_commit()
            return added

    def write(self, rows: list[Row]) -> int:
        """Insert ``rows`` in one transaction; returns how many were new (the rest were replays).
        Raises ``sqlite3.Error`` with the transaction rolled back. Thread-safe: with ``workers
        2`` one worker's rows are built while the other's commit runs (one connection, taken in
        turn)."""
        with self._write_lock:
            return self._write(rows)

    def _write(self, rows: list[Row]) -> int:
        conn = self.conn
        assert conn is not None
        times = self._times
        with _transaction(conn):
            added = 0
            cursor = conn.cursor()
            compress = self.compressor.compress if self.compressor is not None else None
            for row in rows:
                user = row[3]
                body = compress(row[12]) if compress is not None else row[12]
                if user is None:
                    cursor.execute(INSERT_ROW, (*row[:12], body, identity_bucket(row[2], row[12], times)))
                    added += cursor.rowcount
                    continue
                # A user's row: its body goes beside its user's other rows (schema 5), only when
                # the row is new (the identity index decided), with its id.
                cursor.execute(INSERT_ROW, (*row[:12], b"", identity_bucket(row[2], row[12], times)))
                if cursor.rowcount == 1:
                    cursor.execute(INSERT_BODY, (user, row[1], cursor.lastrowid, row[2], row[4], body))
                    added += 1
            alerts = [row for row in rows if row[2] == "alert"]  # few: the detect filter's
            if alerts:
                conn.executemany(INSERT_ALERT, [alert_columns(row) for row in alerts])
        self._after_commit()
        return added

    def _after_commit(self) -> None:
        if self.compress and self.compressor is None:
            assert self.conn is not None
            held = self.conn.execute("SELECT max(id) FROM records").fetchone()[0] or 0
            if held >= self._train_at:
                self._train(held)
        elif self._ratio is not None and self._ratio.worse(*self.compressed_bytes()):
            self._train(None)
        if self.compressor is not None and self._old_bodies is not None and not self._old_bodies.done:
            self._compress_old_bodies(self._old_bodies, self.compressor)
        if (self.retention_time or self.retention_size) and time.monotonic() >= self._next_retention:
            self._next_retention = time.monotonic() + self.retention_interval
            self.apply_retention()

    def _compress_old_bodies(self, old: OldBodies, compressor: BodyCompressor) -> None:
        """A step of the bodies stored before compression (see OldBodies), in a transaction of its own."""
        conn = self.conn
        assert conn is not None
        if not old.due():
            return
        try:
            rows = old.chunk(conn)
            plain = [row for row in rows if needs_compressing(row[5])]
            beside_users = [
                (user, time_ns, row_id, kind, verb, compressor.compress_old(body))
                for row_id, user, time_ns, kind, verb, body in plain
                if user is not None
            ]
            alerts = [(compressor.compress_old(r[5]), r[0]) for r in plain if r[1] is None and r[3] == "alert"]
            in_rows = {r[0]: r[5] for r in plain if r[1] is None and r[3] != "alert"}
            with _transaction(conn):
                conn.executemany(DELETE_USER_BODY, [row[:3] for row in beside_users])
                conn.executemany(INSERT_BODY, beside_users)
                conn.executemany(UPDATE_ROW_BODY, alerts)  # a delete would take its alerts row along
                if in_rows:
                    marks = ",".join("?" * len(in_rows))
                    whole = conn.execute(f"SELECT {COLUMNS} FROM records WHERE id IN ({marks})", list(in_rows))
                    again = [
                        (*row[:_BODY_AT], compressor.compress_old(in_rows[row[0]]), *row[_BODY_AT + 1 :])
                        for row in whole.fetchall()
                    ]
                    conn.executemany(DELETE_ROW, [(row[0],) for row in again])
                    conn.executemany(INSERT_ROW_AGAIN, again)
            old.advance(rows, len(plain))
        except sqlite3.Error as exc:  # a full disk, say: what was written is safe, tried again later
            self.log.warning("store %s: old bodies not compressed this time (%s); trying again later", self.path, exc)
            return
        if old.done and old.compressed:
            self.log.info(
                "store %s: the bodies stored before compression are all compressed now (%d by this writer)",
                self.path,
                old.compressed,
            )

    def _train(self, held: int | None) -> None:
        """A dictionary trained on the store's newest records (see sqlite_bodies): its first once it
        holds enough (``held``: how many), or a new one when the bodies compress much worse than
        the last did on its held-out samples (``held`` None)."""
        assert self.conn is not None
        old, watch = self.compressor, self._ratio
        try:
            compressor = train_dictionary(self.conn, BODY, self.path)
        except (zstandard.ZstdError, sqlite3.Error, BodyError) as exc:
            # Too few distinct samples, or a full disk: tried again later, not at every commit.
            self.log.warning("store %s: no new compression dictionary (%s); trying again later", self.path, exc)
            if held is not None:
                self._train_at = held + self.train_after  # bodies stay as they came meanwhile
            else:
                self._use(old, trained=True)  # after RETRAIN_INTERVAL
            return
        if old is None or watch is None:
            self.log.info(
                "store %s: bodies compressed with dictionary %d from now on (to %.0f%% on its samples)",
                self.path,
                compressor.dictionary_id,
                100 * compressor.ratio,
            )
        else:
            self.log.info(
                "store %s: records compress to %.0f%% with dictionary %d (%.0f%% when it was trained):"
                " dictionary %d (%.0f%%) from now on",
                self.path,
                100 * (watch.last_ratio or 0.0),
                old.dictionary_id,
                100 * watch.yardstick,
                compressor.dictionary_id,
                100 * compressor.ratio,
            )
        self._use(compressor, trained=True)

    def apply_retention(self, now_ns: int | None = None) -> int:
        """Delete rows older than ``retention_time`` and the oldest rows while the pages in use
        exceed ``retention_size``. Returns the number of rows deleted."""
        conn = self.conn
        assert conn is not None
        deleted = 0
        if self.retention_time:
            cutoff = (now_ns if now_ns is not None else time.time_ns()) - int(self.retention_time * 1e9)
            while True:
                cursor = conn.execute(
                    "DELETE FROM records WHERE id IN"
                    " (SELECT id FROM records WHERE time_ns < ? ORDER BY time_ns LIMIT ?)",
                    (cutoff, RETENTION_CHUNK),
                )
                deleted += cursor.rowcount
                if cursor.rowcount < RETENTION_CHUNK:
                    break
        if self.retention_size:
            while True:
                used = self.used_bytes()
                if used <= self.retention_size:
                    break
                rows = conn.execute("SELECT count(*) FROM records").fetchone()[0]
                if rows == 0:
                    break
                # Remove the excess share of rows (a little more, so the loop ends in few rounds).
                share = (used - self.retention_size) / used
                count = min(RETENTION_CHUNK, max(1, int(rows * share * 1.1) + 1))
                cursor = conn.execute(
                    "DELETE FROM records WHERE id IN (SELECT id FROM records ORDER BY time_ns LIMIT ?)", (count,)
                )
                deleted += cursor.rowcount
        self.deleted += deleted
        return deleted

    def used_bytes(self) -> int:
        """Bytes of the pages holding data (the file's size less its free pages)."""
        conn = self.conn
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def close(self) -> None:
        if self.native is not None:
            plain, stored = self._retired  # its counts outlive it (compressed_bytes only grows)
            native_plain, native_stored = self.native.compressed_bytes()
            self._retired = (plain + native_plain, stored + native_stored)
            self.native.close()
            self.native = None
        if self.conn is not None:
            try:
                self.conn.execute("PRAGMA optimize")
                # The last connection to close checkpoints the WAL and deletes it; a reader still
                # open (the UI in this process, `kubetrail history` in another) would keep it, and
                # the next writer would read the whole store through (_left_clean). So: every
                # frame into the file and the WAL emptied now, unless a reader is in the middle of
                # a read (busy: not waited for, the WAL stays and the next open checks).
                self.conn.execute("PRAGMA busy_timeout=0")
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error:
                pass  # a full disk at shutdown: the data is committed already
            self.conn.close()
            self.conn = None
            try:
                _mark_clean(self.path)
            except OSError:
                pass  # no marker: the next open checks every page
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


class SqliteSink(Sink):
    plugin_name = "sqlite"
    description = "Keeps audit records, Events and log lines in a local SQLite store for kubetrail history / ui"
    options = (
        Option("path", required=True, help="The store file (created with its directory if missing)"),
        Option(
            "sync",
            "choice",
            "full",
            choices=("full", "normal"),
            help="full: the WAL is fsynced at every commit (safe against power loss); normal: safe against kill -9",
        ),
        Option("retention_time", "duration", 0.0, help="Delete records older than this (0: keep)"),
        Option("retention_size", "size", 0, help="Delete the oldest records while the store holds more (0: no limit)"),
        Option("retention_interval", "duration", 60.0, help="How often retention is checked"),
        Option(
            "compress",
            "choice",
            "zstd",
            choices=("zstd", "off"),
            help="zstd: bodies compressed with a dictionary the store trains on its first records (3x smaller,"
            " faster writes); off: bodies kept as JSON (readable with the sqlite3 shell)",
        ),
    )

    def __init__(self, ctx: ComponentContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.writer = StoreWriter(
            config["path"],
            sync=config["sync"],
            retention_time=config["retention_time"],
            retention_size=config["retention_size"],
            retention_interval=config["retention_interval"],
            compress=config["compress"] == "zstd",
            log=self.log,
        )
        self.m_new = self.metrics.counter("kubetrail_store_records_added", "Records added to the store")
        self.m_replayed = self.metrics.counter(
            "kubetrail_store_records_replayed", "Records the store already held (replays)"
        )
        # rate(stored) / rate(plain): how well the store's dictionary fits the records coming in.
        body_bytes = self.metrics.counter(
            "kubetrail_store_body_bytes",
            "Bytes of record bodies the store compressed (retried batches included), before"
            " (state=plain) and after"
            " (state=stored) compression",
            "state",
        )
        self.m_plain_bytes, self.m_stored_bytes = body_bytes.labels("plain"), body_bytes.labels("stored")
        self._counted = (0, 0)  # the writer's compressed bytes already counted

    async def start(self) -> None:
        if self.writer.conn is None:
            try:
                await asyncio.to_thread(self.writer.open)
            except StoreError as exc:
                raise RetryableError(str(exc)) from None

    async def write(self, batch: Batch) -> None:
        await self.write_group([batch])

    def group_key(self, batch: Batch) -> object | None:
        return "store"  # every batch goes to the one file: queued batches share a commit

    async def write_group(self, batches: list[Batch]) -> None:
        # Blocks are read here, on the event loop (a lazy batch is validated on first need); their
        # rows are decoded and inserted in the writer's thread, without the GIL, while the loop
        # reads on. A batch with records, or a block with a line that is not an audit event, is
        # written the Python way, from its records.
        blocks = [_block_of(batch) for batch in batches]
        total = sum(len(batch) for batch in batches)
        try:
            added = None
            if all(block is not None for block in blocks):
                pairs = [(batch.tag, block) for batch, block in zip(batches, blocks, strict=True)]
                added = await asyncio.to_thread(self.writer.write_blocks, pairs)  # type: ignore[arg-type]
            if added is None:
                rows: list[Row] = []
                for batch, block in zip(batches, blocks, strict=True):
                    native = native_rows(batch.tag, block) if block is not None else None
                    rows.extend(native if native is not None else [row_of(r) for r in batch.records])
                added = await asyncio.to_thread(self.writer.write, rows)
        except sqlite3.Error as exc:
            # SQLITE_FULL, an I/O error, a lock held too long: rolled back, nothing acknowledged.
            raise RetryableError(f"cannot write store {self.writer.path}: {exc}") from None
        self.m_new.inc(added)
        self.m_replayed.inc(total - added)
        plain, stored = self.writer.compressed_bytes()
        self.m_plain_bytes.inc(max(0, plain - self._counted[0]))
        self.m_stored_bytes.inc(max(0, stored - self._counted[1]))
        self._counted = (plain, stored)

    async def close(self) -> None:
        await asyncio.to_thread(self.writer.close)
