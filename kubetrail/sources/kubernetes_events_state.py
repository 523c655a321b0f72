"""What the ``kubernetes_events`` input remembers: where to resume and what it delivered.

Two things, per *scope* (API group + namespace + field selector):

* the **checkpoint** resourceVersion: every event up to it has been delivered, so a restart
  resumes the watch there (no replay, no gap while the server still has that history);
* the **delivered keys** ``(uid, resourceVersion)`` within ``kube_retention_time``: after a 410
  forces a re-list, the list's items are compared with them and only new occurrences go out.

Both are written only from acknowledgement callbacks, i.e. after every sink has the data. Without
``db`` the state lives in memory for the life of the process.
"""

from __future__ import annotations

import time

from kubetrail.core.state import StateDB

_SCHEMA = """
CREATE TABLE IF NOT EXISTS k8s_events_checkpoint (
    scope TEXT PRIMARY KEY,
    resource_version TEXT NOT NULL,
    updated INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS k8s_events_delivered (
    scope TEXT NOT NULL,
    uid TEXT NOT NULL,
    resource_version TEXT NOT NULL,
    delivered_at INTEGER NOT NULL,
    PRIMARY KEY (scope, uid, resource_version)
);
CREATE INDEX IF NOT EXISTS k8s_events_delivered_age ON k8s_events_delivered (delivered_at);
"""

Key = tuple[str, str]


class EventsState:
    def __init__(self, db: StateDB | None, scope: str, retention: float) -> None:
        self.db = db
        self.scope = scope
        self.retention = retention
        self.delivered: dict[Key, float] = {}
        self.in_flight: set[Key] = set()
        self.checkpoint: str | None = None
        # Set when the checkpoint came from the Lease of a previous leader elsewhere, whose
        # delivered keys this replica does not have (see KubernetesEventsSource._relist).
        self.adopted_from_lease = False
        self._last_prune = time.monotonic()
        if db is not None:
            db.conn.executescript(_SCHEMA)
            row = db.execute("SELECT resource_version FROM k8s_events_checkpoint WHERE scope=?", (scope,)).fetchone()
            self.checkpoint = row[0] if row else None
            cutoff = time.time() - retention
            for uid, rv, at in db.execute(
                "SELECT uid, resource_version, delivered_at FROM k8s_events_delivered"
                " WHERE scope=? AND delivered_at>=?",
                (scope, cutoff),
            ):
                self.delivered[(uid, rv)] = at

    def seen(self, key: Key) -> bool:
        return key in self.delivered or key in self.in_flight

    def mark_delivered(self, keys: list[Key]) -> None:
        now = time.time()
        for key in keys:
            self.in_flight.discard(key)
            self.delivered[key] = now
        if self.db is not None and keys:
            self.db.conn.executemany(
                "INSERT OR REPLACE INTO k8s_events_delivered (scope, uid, resource_version, delivered_at)"
                " VALUES (?, ?, ?, ?)",
                [(self.scope, uid, rv, int(now)) for uid, rv in keys],
            )
        self._prune_now_and_then()

    def forget_in_flight(self, keys: list[Key]) -> None:
        """A batch that will never be acknowledged (dropped): allow it to be emitted again."""
        for key in keys:
            self.in_flight.discard(key)

    def set_checkpoint(self, resource_version: str) -> None:
        self.checkpoint = resource_version
        if self.db is not None:
            self.db.execute(
                "INSERT OR REPLACE INTO k8s_events_checkpoint (scope, resource_version, updated) VALUES (?, ?, ?)",
                (self.scope, resource_version, int(time.time())),
            )

    def _prune_now_and_then(self) -> None:
        if time.monotonic() - self._last_prune < 60:
            return
        self._last_prune = time.monotonic()
        cutoff = time.time() - self.retention
        self.delivered = {k: at for k, at in self.delivered.items() if at >= cutoff}
        if self.db is not None:
            self.db.execute(
                "DELETE FROM k8s_events_delivered WHERE scope=? AND delivered_at<?", (self.scope, int(cutoff))
            )
