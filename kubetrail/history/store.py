"""The history queries against the ``sqlite`` output's store (read-only; many readers at once).

Every query is an indexed range scan: a uid by ``uid``, a user's by ``(user, time)`` (schema 5:
the ``user_bodies`` table itself, bodies included: one range statement), a search by
time, and an object's records by ``(segment of ids, name, resource, namespace, time)`` (schema
6), one seek per segment, newest first, in groups of 1, 4, 16... segments a statement. The
segment leads the object index so that the writer's new keys land in a subtree that stays in its
cache (kubetrail/sinks/sqlite.py, "Steady state"). Segments are in the order records were
stored, not their time, so once ``limit`` rows are found the segments not yet read are read in
one more statement for rows newer than the Nth (:class:`Parts`): a record that came late is not
missed. A store of schema 3-5 (opened read-only, not migrated) has the object index led by the
time bucket (2^46 ns, 19.5 hours), whose buckets are in time order: its scan stops once
``limit`` rows are found, and ``--since``/``--until`` skip the buckets outside them. A store of
schema 2 or older has the name-led index: one scan. WAL mode lets these run while the agent
writes.

**Bodies are read apart from the index scan.** The scan yields row ids; the bodies are then
read in id order (the file order: rows are appended as they come), and for a long answer (a
``who`` of 1,000 records) by several read-only connections at once, each taking every Nth id
(runs of neighbouring ids instead, so that one connection reads a page once for all its rows:
measured 5-10% less CPU per cold ``who``, no better in wall time at load 9; not kept).
With the file out of the page cache a ``who`` reads ~1,000 pages at random places, and this
disk answers one read at a time in ~0.2 ms but many at once nearly as fast: measured on 10M
records, 189 ms by one connection in id order, 84 ms by 4, 67 ms by 16 (243 ms before,
unordered). ``BODY_READERS`` connections, in a thread pool of the backend (SQLite releases the
GIL while it reads). A row that retention deleted between the scan and the read is left out.

**Random reads, said so** (:func:`advise_random`). Each connection's file descriptors of the
store and its WAL get ``posix_fadvise(POSIX_FADV_RANDOM)``: a cold ``who`` is bound by the
disk's bandwidth (1,000 pages of 64 KiB: 62.5 MiB), and Linux's readahead adds to it whenever a
descriptor's reads go up the file (measured on the 10M-record store, cold ``who``: a connection
per run of neighbouring ids read 104-141 MiB from the device without it, 58 with it; every Nth
id per connection, as here, 57-62 MiB without, 58 with). SQLite does not say which descriptor is
its own: they are found in ``/proc/self/fd`` by inode.

**Schema 5 keeps the body of a row with a user apart** (``user_bodies``, keyed ``(user, time_ns,
id)``: kubetrail/sinks/sqlite.py, "A user's records together"). Every statement here that reads a
body reads :data:`~kubetrail.sinks.sqlite.BODY` of its ``records`` row (``self.body``: plain
``r.body`` in a store of an older schema), so no caller knows where a body is. ``who`` reads
the user's newest rows and their bodies from ``user_bodies`` by one backwards range scan: cold,
~30 neighbouring pages instead of ~1,000 scattered ones. A store migrated by a writer while a
reader (the UI) has it open is seen at the reader's next query (``_check_schema``). Schema 8
compresses bodies with the store's dictionaries (kubetrail/sinks/sqlite_bodies.py): every body
read passes through ``BodyReader.plain`` in ``_stored``, the one place rows become records.

**Alerts** come with the records that fired them: an object's or a user's audit records bring
the alerts of their auditIDs (one indexed lookup in the ``alerts`` table per few hundred
requests), whenever each was stored; alerts whose own columns (from the rule's output) name the
object or the user come with the range scan as any record. A store of schema 1 has no alerts.
An alert whose request is not in the answer gets it by identity (``triggers_of``): in a store of
schema 7 from the alert's time, the identity index's buckets being of about a second.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetrail.core.record import decode_body
from kubetrail.history.model import HistoryError, ObjectRef, StoredRecord, with_alerts
from kubetrail.sinks.sqlite import (
    BODY,
    BUCKET_BITS,
    BUCKET_KEY,
    OLD_OBJECT_INDEX,
    UID_INDEX_NAME,
    StoreError,
    audit_ident,
    ident_bucket_bits,
    ident_buckets,
    ident_key,
    open_reader,
    segment_bits,
)
from kubetrail.sinks.sqlite_bodies import BodyError, BodyReader

STAGES = ("RequestReceived", "ResponseStarted", "ResponseComplete", "Panic")
WORKLOADS = ("deployments", "replicasets", "statefulsets", "daemonsets", "jobs", "cronjobs")
MUTATING = ("create", "update", "patch", "delete", "deletecollection")
BODY_READERS = 8  # connections reading a long answer's bodies at once (see above)
PARALLEL_FROM = 64  # rows; fewer are read by the backend's own connection
IN_CHUNK = 500  # ids per "id IN (...)": well under SQLite's limit on parameters
MAX_BUCKETS = 1_000  # time buckets listed without looking (19.5 hours each: 2.2 years)
# An alert's request's stages are looked for in its time's identity bucket, one after it and this
# many before it (schema 7: 2^30 ns each, so at least 4.3 s before; triggers_of)
STAGES_BEFORE = 4


@dataclass
class Filters:
    """``kubetrail search``'s filters; None means any."""

    kind: str | None = None  # audit, event, log, alert
    user: str | None = None
    verb: str | None = None
    resource: str | None = None
    namespace: str | None = None
    name: str | None = None
    code: int | None = None
    reason: str | None = None
    writes_only: bool = False
    priority: str | None = None  # alerts of this priority or a more severe one (Falco's order)
    rule: str | None = None  # alerts of this rule

    def __post_init__(self) -> None:
        if self.priority is not None:
            from kubetrail.detect.rules import priority_level

            try:
                self.level: int | None = priority_level(self.priority)
            except ValueError as exc:
                raise HistoryError(str(exc)) from None
        else:
            self.level = None
        if (self.priority is not None or self.rule is not None) and self.kind not in (None, "alert"):
            raise HistoryError(f"--priority and --rule select alerts, not {self.kind} records")

    @property
    def alerts_only(self) -> bool:
        return self.kind == "alert" or self.priority is not None or self.rule is not None


@dataclass(frozen=True)
class Parts:
    """The parts of the object index to scan, newest first: ``key`` is the index's leading
    expression and ``values`` its values. Time buckets (schema 3-5) are in time order: every
    record of a bucket is newer than those of the buckets after it, so a scan for the newest N
    stops once it has N. Segments of ids (schema 6) are in the order records were stored: a
    record that came late (a replayed buffer, a node that was away) sits in a newer segment than
    records newer than it, so once N are found the segments not yet read are read once more,
    together, for records newer than the Nth."""

    key: str
    values: list[int]
    in_time_order: bool


def _time_clause(since: int | None, until: int | None, params: list[Any], table: str = "") -> str:
    clause = ""
    if since is not None:
        clause += f" AND {table}time_ns >= ?"
        params.append(since)
    if until is not None:
        clause += f" AND {table}time_ns <= ?"
        params.append(until)
    return clause


class StoreBackend:
    """Reads a store file; raises :class:`HistoryError` for a missing, corrupt or newer file."""

    name = "store"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.conn = open_reader(self.path)
        except StoreError as exc:
            raise HistoryError(str(exc)) from None
        advise_random(self.path)  # open_reader read the store: its and the WAL's descriptors are open
        self.has_alerts = self._has("table", "alerts")
        self._schema_seen = -1
        self.by_bucket = False  # schema 3-5: the object index led by the time bucket
        self.segment_bits: int | None = None  # schema 6: led by a segment of ids, this wide
        self.uid_bits: int | None = None  # schema 7: the uid index too
        self.ident_bits: int | None = None  # the identity index's buckets: 2^46 ns (schema 4-6), 2^30 (7)
        self.split = False  # schema 5: the bodies of the rows with a user in user_bodies
        self.body = "r.body"  # the body of a records row aliased r, in SQL
        self._check_schema()
        self.bodies = BodyReader(self.conn, self.path)  # a compressed body back as it came
        self._local = threading.local()  # a body reader's connection, one per pool thread
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _check_schema(self) -> bool:
        """Whether the store has schema 6's segment-led object index, or schema 3's bucket-led
        one, else the name-led one, schema 5's user_bodies, and the width of its identity
        buckets (schema 4 and 7); read again after a writer
        changed the schema (the UI outlives a migration). True when it changed."""
        try:
            seen = self.conn.execute("PRAGMA schema_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise HistoryError(f"cannot read store {self.path}: {exc}") from None
        if seen == self._schema_seen:
            return False
        self._schema_seen = seen
        self.segment_bits = segment_bits(self.conn)
        self.uid_bits = segment_bits(self.conn, UID_INDEX_NAME)
        self.ident_bits = ident_bucket_bits(self.conn)
        self.by_bucket = self.segment_bits is None and self._has("index", OLD_OBJECT_INDEX)
        self.split = self._has("table", "user_bodies")
        self.body = BODY if self.split else "r.body"
        return True

    def _stored(self, rows: list[tuple[Any, ...]], again: Callable[[], list[tuple[Any, ...]]]) -> list[StoredRecord]:
        """``(id, time_ns, kind, body)`` rows as records. An empty body is a row a writer moved
        to user_bodies (a migration to schema 5) after this reader last looked at the schema:
        the rows are read ``again`` once the schema is read anew."""
        if any(not row[3] for row in rows):
            if self._check_schema():
                rows = again()
            if any(not row[3] for row in rows):
                raise HistoryError(f"cannot read store {self.path}: a record without its body")
        plain = self.bodies.plain
        try:
            return [StoredRecord(row[0], row[1], row[2], decode_body(plain(row[3]))) for row in rows]
        except BodyError as exc:
            raise HistoryError(str(exc)) from None

    def _has(self, type_: str, name: str) -> bool:
        row = self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = ? AND name = ?", (type_, name)).fetchone()
        return row is not None

    def _ids(self, sql: str, params: list[Any]) -> list[int]:
        try:
            return [row[0] for row in self.conn.execute(sql, params)]
        except sqlite3.DatabaseError as exc:
            raise HistoryError(f"cannot read store {self.path}: {exc}") from None

    def buckets(self, since: int | None, until: int | None) -> list[int]:
        """The time buckets from the newest to the oldest record in ``[since, until]``, newest
        first: every one between when they are few (an empty one costs a seek that finds
        nothing), else those holding records, one seek of the time index each (a store with a
        stray time decades off would otherwise list thousands)."""
        newest = self.conn.execute(
            "SELECT max(time_ns) FROM records" + (" WHERE time_ns <= ?" if until is not None else ""),
            [] if until is None else [until],
        ).fetchone()[0]
        oldest = self.conn.execute(
            "SELECT min(time_ns) FROM records" + (" WHERE time_ns >= ?" if since is not None else ""),
            [] if since is None else [since],
        ).fetchone()[0]
        if newest is None or oldest is None or newest < oldest:
            return []
        if (newest >> BUCKET_BITS) - (oldest >> BUCKET_BITS) < MAX_BUCKETS:
            return list(range(newest >> BUCKET_BITS, (oldest >> BUCKET_BITS) - 1, -1))
        out: list[int] = []
        bound = until
        while True:
            sql = "SELECT max(time_ns) FROM records" + (" WHERE time_ns <= ?" if bound is not None else "")
            newest = self.conn.execute(sql, [] if bound is None else [bound]).fetchone()[0]
            if newest is None or (since is not None and newest < since):
                return out
            out.append(newest >> BUCKET_BITS)
            bound = (out[-1] << BUCKET_BITS) - 1

    def segments(self) -> list[int]:
        """Every segment of the object index's ids from the newest record's to the oldest's,
        newest first (schema 6; few: 38 for 10M records at 2^18)."""
        assert self.segment_bits is not None
        return self._segments(self.segment_bits)

    def _segments(self, bits: int) -> list[int]:
        # Two subqueries: SQLite reads max(id) or min(id) alone from the B-tree's edge, but
        # both in one SELECT by reading every row.
        newest, oldest = self.conn.execute(
            "SELECT (SELECT max(id) FROM records), (SELECT min(id) FROM records)"
        ).fetchone()
        if newest is None:
            return []
        return list(range(newest >> bits, (oldest >> bits) - 1, -1))

    def _parts(self, since: int | None, until: int | None) -> Parts | None:
        """The parts of the object index an object's scan reads, or None for a store whose object
        index is led by the name (schema 2 or older: one scan)."""
        if self.segment_bits is not None:
            return Parts(f"id >> {self.segment_bits}", self.segments(), in_time_order=False)
        if self.by_bucket:
            return Parts(BUCKET_KEY, self.buckets(since, until), in_time_order=True)
        return None

    def _newest_ids(
        self,
        where: str,
        params: list[Any],
        since: int | None,
        until: int | None,
        limit: int,
        parts: Parts | None = None,
    ) -> list[int]:
        """Ids of the newest ``limit`` records matching ``where``, newest first: part by part
        through the object index when ``parts`` (from :meth:`_parts`) is given (``where`` must
        then constrain ``name``), else one scan."""
        time_params: list[Any] = []
        clause = _time_clause(since, until, time_params)
        if parts is None:
            sql = f"SELECT id FROM records WHERE {where}{clause} ORDER BY time_ns DESC LIMIT ?"
            return self._ids(sql, [*params, *time_params, limit])
        # The newest bucket first, then 4, 16, 64... at a time, a statement each on this
        # connection: an object written every second stops after its last bucket or two, one
        # written once a week costs few statements. The groups were scanned by the body readers
        # at once until measured (cold, 10M records, load 7-8): as fast in wall time (p50 24.6
        # against 24.5 ms, 14.1 against 17.9 in another run), half the CPU (6-7 ms against
        # 14.5-15), and warm 2.0 against 8.7 ms (docs/benchmarks.md, "Cold queries").
        found: list[tuple[int, int]] = []  # (time_ns, id)

        def scan(group: list[int], extra: str, extra_params: list[Any], count: int) -> list[tuple[int, int]]:
            # The parts are integers from the store itself: written into the statement, so a
            # long list never meets SQLite's limit on parameters.
            sql = (
                f"SELECT time_ns, id FROM records WHERE {parts.key} IN ({','.join(map(str, group))})"
                f" AND {where}{clause}{extra} ORDER BY time_ns DESC LIMIT ?"
            )
            return [(row[0], row[1]) for row in self.conn.execute(sql, [*params, *time_params, *extra_params, count])]

        start, size = 0, 1
        try:
            while start < len(parts.values) and len(found) < limit:
                # Parts out of time order: the newest N of each group, as the first group's
                # could all be older than the second's.
                count = limit - len(found) if parts.in_time_order else limit
                found += scan(parts.values[start : start + size], "", [], count)
                start, size = start + size, size * 4
            if not parts.in_time_order:
                found.sort(reverse=True)
                del found[limit:]
                if len(found) == limit and start < len(parts.values):
                    # The parts not read yet may hold records newer than the Nth found (see Parts).
                    found += scan(parts.values[start:], " AND time_ns >= ?", [found[-1][0]], limit)
                    found.sort(reverse=True)
                    del found[limit:]
        except sqlite3.DatabaseError as exc:
            raise HistoryError(f"cannot read store {self.path}: {exc}") from None
        return [ident for _, ident in found]

    def _records(self, ids: list[int]) -> list[StoredRecord]:
        """The records of ``ids``, oldest first (ties by id), their bodies read in file order,
        a long list by several connections at once (see the module docstring)."""
        ordered = sorted(set(ids))

        def read() -> list[tuple[Any, ...]]:
            body = self.body
            try:
                if len(ordered) < PARALLEL_FROM:
                    return _bodies(self.conn, ordered, body)
                parts = [ordered[n::BODY_READERS] for n in range(BODY_READERS)]
                return [
                    row for part in self._map(lambda part: _bodies(self._reader(), part, body), parts) for row in part
                ]
            except sqlite3.DatabaseError as exc:
                raise HistoryError(f"cannot read store {self.path}: {exc}") from None

        records = self._stored(read(), read)
        records.sort(key=lambda r: (r.time_ns, r.id))
        return records

    def _map(self, work: Callable[[list[int]], list[Any]], parts: list[list[int]]) -> list[list[Any]]:
        """``work`` on each part at once, in the backend's pool of body readers."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(BODY_READERS, thread_name_prefix="store-reader")
        return list(self._pool.map(work, [part for part in parts if part]))

    def _reader(self) -> sqlite3.Connection:
        """This pool thread's own read-only connection."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # opens the WAL too
            advise_random(self.path)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def _rows(self, sql: str, params: list[Any]) -> list[StoredRecord]:
        """Rows of ``sql``, where ``{body}`` stands for ``self.body`` (put in again if the schema
        changed under it); one that ends ``ORDER BY time_ns DESC LIMIT ?`` (the
        newest N, which is what a long history needs first) comes back oldest first."""

        def read() -> list[tuple[Any, ...]]:
            text = sql.replace("{body}", self.body)
            try:
                rows = self.conn.execute(text, params).fetchall()
            except sqlite3.DatabaseError as exc:
                raise HistoryError(f"cannot read store {self.path}: {exc}") from None
            if "ORDER BY time_ns DESC" in text:
                rows.reverse()
            return rows

        return self._stored(read(), read)

    def resources(self) -> list[str]:
        rows = self.conn.execute("SELECT DISTINCT resource FROM records WHERE resource IS NOT NULL").fetchall()
        return sorted(r[0] for r in rows)

    def object_records(
        self, ref: ObjectRef, since: int | None, until: int | None, logs: bool, limit: int
    ) -> list[StoredRecord]:
        self._check_schema()
        parts = self._parts(since, until)
        params: list[Any] = [ref.name, ref.resource]
        where = "name = ? AND resource = ? AND kind != 'log'"
        if ref.namespace is not None:
            where += " AND namespace = ?"
            params.append(ref.namespace)
        records = self._records(self._newest_ids(where, params, since, until, limit, parts))
        extra = self._owned_events(ref, since, until, limit, parts)
        if logs:
            extra += self._log_records(ref, since, until, limit, parts)
        records = with_alerts(records, self.alerts_for)
        if extra:
            records.extend(extra)
            records.sort(key=lambda r: (r.time_ns, str(r.id)))
        return records[-limit:]

    def alerts_for(self, audit_ids: list[str]) -> list[StoredRecord]:
        """The alerts fired by these audit requests (any stage)."""
        if not self.has_alerts:
            return []
        out: list[StoredRecord] = []
        for start in range(0, len(audit_ids), 500):
            chunk = audit_ids[start : start + 500]
            out += self._rows(
                "SELECT r.id, r.time_ns, r.kind, {body} FROM alerts a JOIN records r ON r.id = a.id"
                f" WHERE a.audit_id IN ({','.join('?' * len(chunk))})",
                chunk,
            )
        return out

    def triggers_of(self, alerts: list[tuple[str, int]]) -> list[StoredRecord]:
        """The audit records of these alerts' requests (``(auditID, the alert's time)``): found by
        their identity ``(auditID, stage)``, the unique index every row has, so no column is
        needed for it. The identity index is led by a bucket of the audit event's time (schema
        4), which a lookup must name. Schema 4-6's buckets (19.5 hours) are few: every bucket the
        store holds is named (listed by a seek each), and every stage stored is found. Schema 7's
        are of about a second, too many to list: an alert's time is its audit event's
        (``stageTimestamp``, or the time its source gave the record, which the store kept too),
        so its request's stages are looked for in the buckets from :data:`STAGES_BEFORE` before
        it to one after, and, if none is there, among the records stored with its time exactly
        (the time index). A stage further away (a watch's ``ResponseStarted`` minutes before its
        end) is not found."""
        if not alerts:
            return []
        self._check_schema()
        bits = self.ident_bits
        if bits is not None and bits < BUCKET_BITS:
            return self._triggers_near(alerts, bits)
        ids = list(dict.fromkeys(audit_id for audit_id, _ in alerts))
        key = ident_key(bits) if bits is not None else ""
        buckets = ident_buckets(self.conn, key) if bits is not None else []
        in_buckets = f"{key} IN ({','.join(map(str, buckets))}) AND " if buckets else ""
        idents = [audit_ident(audit_id, stage) for audit_id in ids for stage in STAGES]
        out: list[StoredRecord] = []
        for start in range(0, len(idents), 400):
            chunk = idents[start : start + 400]
            out += self._rows(
                "SELECT r.id, r.time_ns, r.kind, {body} FROM records r"
                f" WHERE {in_buckets}ident IN ({','.join('?' * len(chunk))}) AND kind = 'audit'",
                chunk,
            )
        return out

    def _triggers_near(self, alerts: list[tuple[str, int]], bits: int) -> list[StoredRecord]:
        """:meth:`triggers_of` in a store of buckets of 2^bits ns: per alert, a seek for each
        stage of its request in each bucket near its time, else its time's records (see there)."""
        key = ident_key(bits)
        out: dict[int | str, StoredRecord] = {}
        for audit_id, time_ns in dict.fromkeys(alerts):
            idents = [audit_ident(audit_id, stage) for stage in STAGES]
            marks = ",".join("?" * len(idents))
            bucket = time_ns >> bits
            near = ",".join(map(str, range(bucket - STAGES_BEFORE, bucket + 2)))
            found = self._rows(
                f"SELECT r.id, r.time_ns, r.kind, {{body}} FROM records r WHERE {key} IN ({near})"
                f" AND ident IN ({marks}) AND kind = 'audit'",
                idents,
            )
            if not found:
                found = self._rows(
                    "SELECT r.id, r.time_ns, r.kind, {body} FROM records r"
                    f" WHERE time_ns = ? AND ident IN ({marks}) AND kind = 'audit'",
                    [time_ns, *idents],
                )
            out.update((record.id, record) for record in found)
        return list(out.values())

    def _owned_events(
        self, ref: ObjectRef, since: int | None, until: int | None, limit: int, parts: Parts | None
    ) -> list[StoredRecord]:
        """A workload's story goes on in its ReplicaSets' and pods' Events (an image that cannot
        be pulled is a Warning on the pod): those named after it (``web-<hash>[-<id>]``)."""
        if ref.resource not in WORKLOADS:
            return []
        where = "name >= ? AND name < ? AND resource IN ('replicasets', 'pods', 'jobs') AND kind = 'event'"
        params: list[Any] = [ref.name + "-", ref.name + "."]
        if ref.namespace is not None:
            where += " AND namespace = ?"
            params.append(ref.namespace)
        return self._records(self._newest_ids(where, params, since, until, limit, parts))

    def _log_records(
        self, ref: ObjectRef, since: int | None, until: int | None, limit: int, parts: Parts | None
    ) -> list[StoredRecord]:
        """A pod's lines, or those of a workload's pods (named after it: ``web-<hash>-<id>``)."""
        params: list[Any] = []
        if ref.resource == "pods":
            where = "name = ? AND resource = 'pods' AND kind = 'log'"
            params.append(ref.name)
        elif ref.resource in WORKLOADS:
            # '-' then '.' in byte order: the range holds exactly the names starting with "NAME-".
            where = "name >= ? AND name < ? AND resource = 'pods' AND kind = 'log'"
            params += [ref.name + "-", ref.name + "."]
        else:
            return []
        if ref.namespace is not None:
            where += " AND namespace = ?"
            params.append(ref.namespace)
        return self._records(self._newest_ids(where, params, since, until, limit, parts))

    def uid_ref(self, uid: str) -> ObjectRef | None:
        """The object a uid names, from the records that carry it (the oldest that is not a log
        line). Schema 7's uid index is led by the segment of ids, as the object index: a seek in
        each segment (named, else SQLite would scan the index); an older store's is on the uid."""
        self._check_schema()
        where = "uid = ? AND name IS NOT NULL"
        params: list[Any] = [uid]
        if self.uid_bits is not None:
            segments = self._segments(self.uid_bits)
            where = f"id >> {self.uid_bits} IN ({','.join(map(str, segments))}) AND {where}"
        row = self.conn.execute(
            f"SELECT resource, namespace, name FROM records WHERE {where} AND kind != 'log' ORDER BY time_ns LIMIT 1",
            params,
        ).fetchone()
        if row is None:
            row = self.conn.execute(
                f"SELECT resource, namespace, name FROM records WHERE {where} LIMIT 1", params
            ).fetchone()
        return ObjectRef(row[0], row[1], row[2]) if row else None

    def user_records(
        self, user: str, since: int | None, until: int | None, limit: int, writes_only: bool = False
    ) -> list[StoredRecord]:
        self._check_schema()
        params: list[Any] = [user]
        where = "user = ?"
        if writes_only:
            where += f" AND verb IN ({','.join('?' * len(MUTATING))})"
            params += MUTATING
        if self.split:
            # Schema 5: the user's rows and their bodies together, newest first, one range scan.
            sql = f"SELECT id, time_ns, kind, body FROM user_bodies WHERE {where}"
            sql += _time_clause(since, until, params) + " ORDER BY time_ns DESC, id DESC LIMIT ?"
            records = self._rows(sql, [*params, limit])
        else:
            records = self._records(self._newest_ids(where, params, since, until, limit))
        return with_alerts(records, self.alerts_for)[-limit:]

    def search(self, filters: Filters, since: int | None, until: int | None, limit: int) -> list[StoredRecord]:
        clauses = []
        params: list[Any] = []
        for key in ("kind", "user", "verb", "resource", "namespace", "name", "code", "reason"):
            value = getattr(filters, key)
            if value is not None:
                clauses.append(f"{key} = ?")
                params.append(value)
        if filters.writes_only:
            clauses.append(f"verb IN ({','.join('?' * len(MUTATING))})")
            params += MUTATING
        table = "records r"
        if filters.alerts_only:
            if not self.has_alerts:
                return []
            # Driven by the alerts table (few rows beside the records): a scan of the records'
            # time index could pass millions of records to find a few alerts.
            table = "alerts a CROSS JOIN records r ON r.id = a.id"
            if filters.rule is not None:
                clauses.append("rule = ?")
                params.append(filters.rule)
            if filters.level is not None:
                clauses.append("level <= ?")  # 0 is Emergency: at least as severe
                params.append(filters.level)
        where = " AND ".join(clauses) or "1"
        self._check_schema()
        parts = self._parts(since, until) if table == "records r" and filters.name is not None else None
        if parts is not None:
            # A name is what the object index finds, part by part (led by the segment or bucket).
            return self._records(self._newest_ids(where, params, since, until, limit, parts))
        if table == "records r" and filters.user is not None and self.split:
            # Schema 5 has no user index: user_bodies is one (user, time_ns, id), the rest of the
            # filters on each of the user's rows, newest first.
            where = " AND ".join(["b.user = ?"] + [f"r.{clause}" for clause in clauses])  # every clause names a column
            params = [filters.user, *params]
            sql = f"SELECT r.id FROM user_bodies b CROSS JOIN records r ON r.id = b.id WHERE {where}"
            sql += _time_clause(since, until, params, "b.") + " ORDER BY b.time_ns DESC, b.id DESC LIMIT ?"
            params.append(limit)
            return self._records(self._ids(sql, params))
        sql = f"SELECT r.id FROM {table} WHERE {where}" + _time_clause(since, until, params)
        sql += " ORDER BY time_ns DESC LIMIT ?"
        params.append(limit)
        return self._records(self._ids(sql, params))

    def newer(self, after_id: int, limit: int = 1000) -> list[tuple[StoredRecord, dict[str, Any]]]:
        """Records added after ``after_id`` (the UI's live follow), with their indexed columns."""
        self._check_schema()

        def read() -> list[tuple[Any, ...]]:
            return self.conn.execute(
                f"SELECT r.id, r.time_ns, r.kind, {self.body}, r.user, r.verb, r.resource, r.namespace, r.name,"
                " r.code, r.reason FROM records r WHERE r.id > ? ORDER BY r.id LIMIT ?",
                (after_id, limit),
            ).fetchall()

        rows = read()
        stored = self._stored(rows, read)
        if len(stored) != len(rows) or any(a.id != b[0] for a, b in zip(stored, rows, strict=False)):
            rows = read()  # read again after a migration: the columns of the same rows
        out = []
        for record, row in zip(stored, rows, strict=True):
            columns = dict(
                zip(
                    ("kind", "user", "verb", "resource", "namespace", "name", "code", "reason"),
                    (row[2], *row[4:]),
                    strict=True,
                )
            )
            out.append((record, columns))
        return out

    def last_id(self) -> int:
        row = self.conn.execute("SELECT max(id) FROM records").fetchone()
        return int(row[0] or 0)

    def near_names(self, ref: ObjectRef) -> list[str]:
        """Names of the same kind (in the namespace, if given), to suggest."""
        params: list[Any] = [ref.resource]
        sql = "SELECT DISTINCT namespace, name FROM records WHERE resource = ? AND name IS NOT NULL"
        if ref.namespace is not None:
            sql += " AND namespace = ?"
            params.append(ref.namespace)
        rows = self.conn.execute(sql + " LIMIT 100000", params).fetchall()
        return [f"{ns}/{name}" if ns else name for ns, name in rows]

    def users(self) -> list[str]:
        self._check_schema()
        if self.split:  # one seek of user_bodies' key per user (no user index in schema 5)
            rows = self.conn.execute(
                "WITH RECURSIVE u(name) AS (SELECT (SELECT min(user) FROM user_bodies) UNION ALL"
                " SELECT (SELECT user FROM user_bodies WHERE user > u.name ORDER BY user LIMIT 1) FROM u"
                " WHERE u.name IS NOT NULL LIMIT 100000) SELECT name FROM u WHERE name IS NOT NULL"
            ).fetchall()
        else:
            rows = self.conn.execute("SELECT DISTINCT user FROM records WHERE user IS NOT NULL LIMIT 100000").fetchall()
        return [r[0] for r in rows]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        for conn in self._readers:
            conn.close()
        self.conn.close()


def _bodies(conn: sqlite3.Connection, ids: list[int], body: str) -> list[tuple[Any, ...]]:
    """``(id, time_ns, kind, body)`` of the rows of ``ids`` (sorted: read in file order);
    ``body``: the SQL of a row's body (``StoreBackend.body``)."""
    rows: list[tuple[Any, ...]] = []
    for start in range(0, len(ids), IN_CHUNK):
        chunk = ids[start : start + IN_CHUNK]
        rows += conn.execute(
            f"SELECT r.id, r.time_ns, r.kind, {body} FROM records r"
            f" WHERE r.id IN ({','.join('?' * len(chunk))}) ORDER BY r.id",
            chunk,
        ).fetchall()
    return rows


def advise_random(path: Path) -> int:
    """``POSIX_FADV_RANDOM`` on every descriptor this process holds of the store file or its WAL
    (those of SQLite's connections: see the module docstring); how many. Nothing where the
    system has no ``posix_fadvise`` or no ``/proc``. Another descriptor of the store (the UI's
    writer in the same process) gets it too: harmless, its reads of pages are random as well."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    inodes = set()
    for name in (path, Path(f"{path}-wal")):
        try:
            info = os.stat(name)
        except OSError:
            continue
        inodes.add((info.st_dev, info.st_ino))
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return 0
    advised = 0
    for fd in fds:
        try:
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) in inodes:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                advised += 1
        except OSError:
            continue  # closed since the listing (the listing's own descriptor is one)
    return advised
