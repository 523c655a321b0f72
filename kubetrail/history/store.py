"""The history queries against the ``sqlite`` output's store (read-only; many readers at once).

Every query is one indexed range scan: an object's records by ``(name, resource, namespace,
time)``, a uid by ``uid``, a user's by ``(user, time)``, a search by time. WAL mode lets these
run while the agent writes.

**Alerts** come with the records that fired them: an object's or a user's audit records bring
the alerts of their auditIDs (one indexed lookup in the ``alerts`` table per few hundred
requests), whenever each was stored; alerts whose own columns (from the rule's output) name the
object or the user come with the range scan as any record. A store of schema 1 has no alerts.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from kubetrail.history.model import HistoryError, ObjectRef, StoredRecord, with_alerts
from kubetrail.sinks.sqlite import StoreError, open_reader

STAGES = ("RequestReceived", "ResponseStarted", "ResponseComplete", "Panic")
WORKLOADS = ("deployments", "replicasets", "statefulsets", "daemonsets", "jobs", "cronjobs")
MUTATING = ("create", "update", "patch", "delete", "deletecollection")


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


def _time_clause(since: int | None, until: int | None, params: list[Any]) -> str:
    clause = ""
    if since is not None:
        clause += " AND time_ns >= ?"
        params.append(since)
    if until is not None:
        clause += " AND time_ns <= ?"
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
        self.has_alerts = (
            self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alerts'").fetchone()
            is not None
        )

    def _rows(self, sql: str, params: list[Any]) -> list[StoredRecord]:
        """Rows of ``sql``; one that ends ``ORDER BY time_ns DESC LIMIT ?`` (the newest N, which
        is what a long history needs first) comes back oldest first."""
        try:
            rows = self.conn.execute(sql, params).fetchall()
            if "ORDER BY time_ns DESC" in sql:
                rows.reverse()
        except sqlite3.DatabaseError as exc:
            raise HistoryError(f"cannot read store {self.path}: {exc}") from None
        return [StoredRecord(row[0], row[1], row[2], orjson.loads(row[3])) for row in rows]

    def resources(self) -> list[str]:
        rows = self.conn.execute("SELECT DISTINCT resource FROM records WHERE resource IS NOT NULL").fetchall()
        return sorted(r[0] for r in rows)

    def object_records(
        self, ref: ObjectRef, since: int | None, until: int | None, logs: bool, limit: int
    ) -> list[StoredRecord]:
        params: list[Any] = [ref.name, ref.resource]
        sql = "SELECT id, time_ns, kind, body FROM records WHERE name = ? AND resource = ? AND kind != 'log'"
        if ref.namespace is not None:
            sql += " AND namespace = ?"
            params.append(ref.namespace)
        sql += _time_clause(since, until, params)
        sql += " ORDER BY time_ns DESC LIMIT ?"
        params.append(limit)
        records = self._rows(sql, params)
        extra = self._owned_events(ref, since, until, limit)
        if logs:
            extra += self._log_records(ref, since, until, limit)
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
                "SELECT r.id, r.time_ns, r.kind, r.body FROM alerts a JOIN records r ON r.id = a.id"
                f" WHERE a.audit_id IN ({','.join('?' * len(chunk))})",
                chunk,
            )
        return out

    def triggers_of(self, audit_ids: list[str]) -> list[StoredRecord]:
        """The audit records (every stage stored) of these auditIDs: found by their identity
        ``(auditID, stage)``, the unique index every row has, so no column is needed for it."""
        from kubetrail.core.record import Record, identity_key

        idents = [
            bytes.fromhex(identity_key(Record("", 0, None, b"{}", (audit_id, stage))) or "")
            for audit_id in audit_ids
            for stage in STAGES
        ]
        out: list[StoredRecord] = []
        for start in range(0, len(idents), 400):
            chunk = idents[start : start + 400]
            out += self._rows(
                f"SELECT id, time_ns, kind, body FROM records WHERE ident IN ({','.join('?' * len(chunk))})"
                " AND kind = 'audit'",
                chunk,
            )
        return out

    def _owned_events(self, ref: ObjectRef, since: int | None, until: int | None, limit: int) -> list[StoredRecord]:
        """A workload's story goes on in its ReplicaSets' and pods' Events (an image that cannot
        be pulled is a Warning on the pod): those named after it (``web-<hash>[-<id>]``)."""
        if ref.resource not in WORKLOADS:
            return []
        sql = (
            "SELECT id, time_ns, kind, body FROM records WHERE name >= ? AND name < ?"
            " AND resource IN ('replicasets', 'pods', 'jobs') AND kind = 'event'"
        )
        params: list[Any] = [ref.name + "-", ref.name + "."]
        if ref.namespace is not None:
            sql += " AND namespace = ?"
            params.append(ref.namespace)
        sql += _time_clause(since, until, params) + " ORDER BY time_ns DESC LIMIT ?"
        params.append(limit)
        return self._rows(sql, params)

    def _log_records(self, ref: ObjectRef, since: int | None, until: int | None, limit: int) -> list[StoredRecord]:
        """A pod's lines, or those of a workload's pods (named after it: ``web-<hash>-<id>``)."""
        params: list[Any] = []
        if ref.resource == "pods":
            sql = "SELECT id, time_ns, kind, body FROM records WHERE name = ? AND resource = 'pods' AND kind = 'log'"
            params.append(ref.name)
        elif ref.resource in WORKLOADS:
            # '-' then '.' in byte order: the range holds exactly the names starting with "NAME-".
            sql = (
                "SELECT id, time_ns, kind, body FROM records WHERE name >= ? AND name < ? AND resource = 'pods'"
                " AND kind = 'log'"
            )
            params += [ref.name + "-", ref.name + "."]
        else:
            return []
        if ref.namespace is not None:
            sql += " AND namespace = ?"
            params.append(ref.namespace)
        sql += _time_clause(since, until, params) + " ORDER BY time_ns DESC LIMIT ?"
        params.append(limit)
        return self._rows(sql, params)

    def uid_ref(self, uid: str) -> ObjectRef | None:
        row = self.conn.execute(
            "SELECT resource, namespace, name FROM records WHERE uid = ? AND name IS NOT NULL AND kind != 'log'"
            " ORDER BY time_ns LIMIT 1",
            (uid,),
        ).fetchone()
        if row is None:
            row = self.conn.execute(
                "SELECT resource, namespace, name FROM records WHERE uid = ? AND name IS NOT NULL LIMIT 1", (uid,)
            ).fetchone()
        return ObjectRef(row[0], row[1], row[2]) if row else None

    def user_records(
        self, user: str, since: int | None, until: int | None, limit: int, writes_only: bool = False
    ) -> list[StoredRecord]:
        params: list[Any] = [user]
        sql = "SELECT id, time_ns, kind, body FROM records WHERE user = ?"
        if writes_only:
            sql += f" AND verb IN ({','.join('?' * len(MUTATING))})"
            params += MUTATING
        sql += _time_clause(since, until, params) + " ORDER BY time_ns DESC LIMIT ?"
        params.append(limit)
        return with_alerts(self._rows(sql, params), self.alerts_for)[-limit:]

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
        sql = f"SELECT r.id, time_ns, kind, body FROM {table} WHERE {where}" + _time_clause(since, until, params)
        sql += " ORDER BY time_ns DESC LIMIT ?"
        params.append(limit)
        return self._rows(sql, params)

    def newer(self, after_id: int, limit: int = 1000) -> list[tuple[StoredRecord, dict[str, Any]]]:
        """Records added after ``after_id`` (the UI's live follow), with their indexed columns."""
        rows = self.conn.execute(
            "SELECT id, time_ns, kind, body, user, verb, resource, namespace, name, code, reason FROM records"
            " WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        out = []
        for row in rows:
            columns = dict(
                zip(
                    ("kind", "user", "verb", "resource", "namespace", "name", "code", "reason"),
                    (row[2], *row[4:]),
                    strict=True,
                )
            )
            out.append((StoredRecord(row[0], row[1], row[2], orjson.loads(row[3])), columns))
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
        rows = self.conn.execute("SELECT DISTINCT user FROM records WHERE user IS NOT NULL LIMIT 100000").fetchall()
        return [r[0] for r in rows]

    def close(self) -> None:
        self.conn.close()
