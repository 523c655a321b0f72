"""``history``, ``who`` and ``search`` on any backend (the store or Elasticsearch/OpenSearch).

A backend answers a few narrow questions (an object's records, a uid's object, a user's records,
a filtered search, the names and users it knows); what a timeline means, stage collapsing,
diffs, redaction and the "did you mean" answers are here, once for both.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Protocol

from kubetrail.history.model import (
    HistoryError,
    ObjectRef,
    StoredRecord,
    iso,
    parse_ref,
    resolve_kind,
    summary,
    timeline,
)
from kubetrail.history.store import Filters

DEFAULT_LIMIT = 1_000  # the newest; --limit or --since/--until for more


class Backend(Protocol):
    name: str

    def resources(self) -> list[str]: ...

    def object_records(
        self, ref: ObjectRef, since: int | None, until: int | None, logs: bool, limit: int
    ) -> list[StoredRecord]: ...

    def uid_ref(self, uid: str) -> ObjectRef | None: ...

    def user_records(
        self, user: str, since: int | None, until: int | None, limit: int, writes_only: bool = False
    ) -> list[StoredRecord]: ...

    def search(self, filters: Filters, since: int | None, until: int | None, limit: int) -> list[StoredRecord]: ...

    def triggers_of(self, alerts: list[tuple[str, int]]) -> list[StoredRecord]:
        """The audit records of alerts' requests, given as ``(auditID, the alert's time)``."""
        ...

    def near_names(self, ref: ObjectRef) -> list[str]: ...

    def users(self) -> list[str]: ...

    def close(self) -> None: ...


@dataclass
class Result:
    title: str
    entries: list[dict[str, Any]]
    truncated: bool = False


def history(
    backend: Backend,
    target: str,
    *,
    since: int | None = None,
    until: int | None = None,
    logs: bool = False,
    status: bool = False,
    limit: int = DEFAULT_LIMIT,
) -> Result:
    """The timeline of ``KIND[/NAMESPACE]/NAME`` or a uid; an error with near matches if empty.

    ``status``: also the controllers' writes to the ``status`` subresource (many, and they
    say what the object's state became, not who changed it), left out by default."""
    ref = _ref(backend, target)
    records = backend.object_records(ref, since, until, logs, limit)
    if not records:
        raise HistoryError(_nothing_about(backend, ref, since, until))
    entries = _linked(backend, timeline(records))
    if not status:
        entries = [e for e in entries if e.get("subresource") != "status"]
    return Result(str(ref), entries, len(records) >= limit)


def _linked(backend: Backend, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Alerts whose audit record is not in the timeline (a search for alerts, or the record
    outside the time range) get ``trigger``: that record's entry, in short, when the backend has
    it, and the object and user from it where the rule's output did not print them."""
    loose = [e for e in entries if e["kind"] == "alert" and "trigger_id" not in e and e.get("audit_id")]
    if not loose:
        return entries
    triggers = {e["audit_id"]: e for e in timeline(backend.triggers_of([(e["audit_id"], e["time_ns"]) for e in loose]))}
    for alert in loose:
        trigger = triggers.get(alert["audit_id"])
        if trigger is None:
            continue
        alert["trigger"] = {
            key: trigger.get(key) for key in ("id", "time", "stage", "verb", "user", "resource", "namespace", "name")
        }
        alert["trigger"]["summary"] = summary(trigger)
        for key in ("user", "verb", "resource", "namespace", "name"):
            if alert.get(key) is None:
                alert[key] = trigger.get(key)
    return entries


def _ref(backend: Backend, target: str) -> ObjectRef:
    try:
        ref = parse_ref(target)
    except HistoryError:
        # Not a built-in kind: perhaps a custom resource the data knows (or a typo, then the
        # error lists the near kinds among both).
        ref = parse_ref(target, backend.resources())
    if isinstance(ref, str):
        found = backend.uid_ref(ref)
        if found is None:
            raise HistoryError(f"no records carry uid {ref}")
        return found
    return ref


def _nothing_about(backend: Backend, ref: ObjectRef, since: int | None, until: int | None) -> str:
    if since is not None or until is not None:
        # The object may have records outside the range: say when (one seek of the object
        # index) instead of listing near names, which reads every record of the kind (1.3 s
        # cold on 10M records: docs/benchmarks.md, "Schema 6").
        newest = backend.object_records(ref, None, None, False, 1)
        if newest:
            return f"no records about {ref} in that time range; its newest record is at {iso(newest[-1].time_ns)}"
    when = " in that time range" if since is not None or until is not None else ""
    message = f"no records about {ref}{when}"
    names = backend.near_names(ref)
    by_name: dict[str, list[str]] = {}
    for full in names:  # "NAMESPACE/NAME" (the store) or "NAME" (Elasticsearch)
        by_name.setdefault(full.rsplit("/", 1)[-1], []).append(full)
    close = difflib.get_close_matches(ref.name, list(by_name), n=5, cutoff=0.5)
    near = [full for name in close for full in by_name[name]]
    if not near and ref.namespace is not None:
        # The right name in another namespace is the commonest slip.
        near = [n for n in backend.near_names(ObjectRef(ref.resource, None, ref.name)) if n.endswith("/" + ref.name)]
    if near:
        message += f"; {ref.resource} with records: {', '.join(near)}"
    elif not names:
        kinds = backend.resources()
        message += f"; no {ref.resource} at all" + (f" (kinds with records: {', '.join(kinds[:20])})" if kinds else "")
    return message


def who(
    backend: Backend,
    user: str,
    *,
    since: int | None = None,
    until: int | None = None,
    writes_only: bool = False,
    limit: int = DEFAULT_LIMIT,
) -> Result:
    """What ``user`` (a user name or ``system:serviceaccount:NS:NAME``) did, oldest first."""
    records = backend.user_records(user, since, until, limit, writes_only)
    if not records:
        near = difflib.get_close_matches(user, backend.users(), n=5, cutoff=0.5)
        hint = f"; users with records: {', '.join(near)}" if near else ""
        raise HistoryError(f"no records of user {user!r}" + hint)
    return Result(f"user {user}", _linked(backend, timeline(records)), len(records) >= limit)


def search(
    backend: Backend,
    filters: Filters,
    *,
    since: int | None = None,
    until: int | None = None,
    limit: int = DEFAULT_LIMIT,
) -> Result:
    if filters.resource is not None:
        filters.resource = resolve_kind(filters.resource, backend.resources())
    records = backend.search(filters, since, until, limit)
    return Result("search", _linked(backend, timeline(records)), len(records) >= limit)
