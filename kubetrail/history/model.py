"""What the history commands share whatever the backend: references, kinds, times, timelines.

A timeline is a list of *entries*, plain dicts (so ``--json`` and the web UI show the same thing),
oldest first. An audit request is one entry even when the store holds several of its stages
(``RequestReceived`` and ``ResponseComplete`` have different identities): the most complete
stage is kept. **What changed** is computed along the object's own timeline: each audit
record that carries the object (``responseObject``, or the ``requestObject`` of a create or
update, at level Request/RequestResponse) becomes the known state; an update is diffed
against the state before it with ``jsonpatch.make_patch`` (RFC 6902 operations, compact and
standard), a patch request shows its own operations with the old values from the known state.
Fields that change on every write (resourceVersion, managedFields, generation, status) are left
out. **Secrets are redacted here too**, whatever the pipeline did: values under ``data`` and
``stringData`` of a Secret (and ``status.token`` of a TokenRequest) are shown as ``[REDACTED]``,
in the diff and in the full record, so a store written without the ``kubernetes_audit`` filter
still leaks nothing through these commands.

**Alerts** (the ``detect`` filter's records) are entries of kind ``alert`` (rule, priority, tags,
output, the triggering ``audit_id``/``stage``) placed **right after the audit entry that fired
them** (matched by auditID, whichever stage the timeline kept), whenever they were stored, before
or after their record; an alert whose record is not in the timeline stays at its own time. It
takes its object and user from that record when its rule's output did not print them, and
``trigger_id`` names the record's entry. An output field holding an object (``%jevt.obj``, the
whole audit event; a Secret) is redacted like the record, in ``output_fields`` and in
``output``; a rule printing a single Secret value by its path is not recognised.
"""

from __future__ import annotations

import copy
import difflib
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jsonpatch
import orjson

from kubetrail.core.kinds import resource_of_kind
from kubetrail.core.values import parse_duration
from kubetrail.parsers.timefmt import TimeParser

REDACTED = "[REDACTED]"
UID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
STAGE_RANK = {"RequestReceived": 0, "ResponseStarted": 1, "Panic": 2, "ResponseComplete": 3}
# Paths that change on every write and say nothing about what the user did.
NOISE = (
    "/metadata/resourceVersion",
    "/metadata/managedFields",
    "/metadata/generation",
    "/metadata/creationTimestamp",
    "/metadata/uid",
    "/metadata/selfLink",
    "/status",
    "/metadata/annotations/kubectl.kubernetes.io~1last-applied-configuration",
    "/metadata/annotations/deployment.kubernetes.io~1revision",
)
MAX_CREATE_FIELDS = 12

# Short names and singulars kubectl accepts, to the resource the audit log names.
_BUILTIN = {
    "pods": ("po", "pod"),
    "services": ("svc", "service"),
    "deployments": ("deploy", "deployment"),
    "replicasets": ("rs", "replicaset"),
    "statefulsets": ("sts", "statefulset"),
    "daemonsets": ("ds", "daemonset"),
    "jobs": ("job",),
    "cronjobs": ("cj", "cronjob"),
    "configmaps": ("cm", "configmap"),
    "secrets": ("secret",),
    "serviceaccounts": ("sa", "serviceaccount"),
    "namespaces": ("ns", "namespace"),
    "nodes": ("no", "node"),
    "events": ("ev", "event"),
    "persistentvolumeclaims": ("pvc", "persistentvolumeclaim"),
    "persistentvolumes": ("pv", "persistentvolume"),
    "ingresses": ("ing", "ingress"),
    "endpoints": ("ep",),
    "endpointslices": ("endpointslice",),
    "roles": ("role",),
    "rolebindings": ("rolebinding",),
    "clusterroles": ("clusterrole",),
    "clusterrolebindings": ("clusterrolebinding",),
    "leases": ("lease",),
    "networkpolicies": ("netpol", "networkpolicy"),
    "horizontalpodautoscalers": ("hpa", "horizontalpodautoscaler"),
    "poddisruptionbudgets": ("pdb", "poddisruptionbudget"),
    "customresourcedefinitions": ("crd", "crds", "customresourcedefinition"),
    "storageclasses": ("sc", "storageclass"),
    "priorityclasses": ("pc", "priorityclass"),
}
ALIASES: dict[str, str] = {}
for _resource, _names in _BUILTIN.items():
    ALIASES[_resource] = _resource
    for _name in _names:
        ALIASES[_name] = _resource

_TIMES = TimeParser()


class HistoryError(Exception):
    """A query that cannot be answered as asked (unknown kind, no records, bad store...)."""


@dataclass(frozen=True)
class ObjectRef:
    resource: str
    namespace: str | None  # None: any namespace (or a cluster-scoped object)
    name: str

    def __str__(self) -> str:
        return f"{self.resource}/{self.namespace}/{self.name}" if self.namespace else f"{self.resource}/{self.name}"


@dataclass
class StoredRecord:
    """One record as a backend returns it: its position (for following), time, kind, body."""

    id: int | str
    time_ns: int
    kind: str  # audit, event, log, other
    body: dict[str, Any]


def resolve_kind(text: str, known: Iterable[str] = ()) -> str:
    """``deploy``, ``Deployment``, ``deployments`` -> ``deployments``; also any resource the data
    holds (custom resources). Unknown: an error naming the nearest kinds."""
    lower = text.lower()
    if "." in lower:  # deployments.apps: the group is not needed to find the object
        lower = lower.split(".", 1)[0]
    known_set = set(known)
    if lower in ALIASES:
        return ALIASES[lower]
    if lower in known_set:
        return lower
    plural = resource_of_kind(lower)
    if plural in known_set:
        return plural
    candidates = sorted(set(ALIASES) | known_set)
    near = difflib.get_close_matches(lower, candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise HistoryError(f"unknown kind {text!r}{hint}")


def parse_ref(text: str, known: Iterable[str] = ()) -> ObjectRef | str:
    """``KIND/NAME``, ``KIND/NAMESPACE/NAME``, or a uid (returned as a str)."""
    if UID_RE.match(text.lower()):
        return text.lower()
    parts = text.split("/")
    if len(parts) == 2 and all(parts):
        return ObjectRef(resolve_kind(parts[0], known), None, parts[1])
    if len(parts) == 3 and all(parts):
        return ObjectRef(resolve_kind(parts[0], known), parts[1], parts[2])
    raise HistoryError(f"expected KIND/NAME, KIND/NAMESPACE/NAME or a uid, got {text!r}")


def parse_time(text: str | None, now_ns: int | None = None) -> int | None:
    """``--since``/``--until``: a duration back from now (``90m``, ``2h``, ``7d``) or a time
    (``2026-12-05T10:00:00Z``). None stays None."""
    if text is None or text == "":
        return None
    now = time.time_ns() if now_ns is None else now_ns
    try:
        return now - int(parse_duration(text) * 1e9)
    except ValueError:
        pass
    try:
        return _TIMES.parse_ns(text)
    except (ValueError, TypeError):
        raise HistoryError(
            f"expected a duration (90m, 2h, 7d) or a time (2026-12-05T10:00:00Z), got {text!r}"
        ) from None


def iso(time_ns: int) -> str:
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos // 1_000_000:03d}Z"


# -- redaction ------------------------------------------------------------------------------


def _is_secretish(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("kind") in ("Secret", "SecretList", "TokenRequest")


def _redact_object(obj: Any, force: bool = False) -> Any:
    """``force``: the object belongs to a Secret request even without a kind (a merge patch)."""
    if isinstance(obj, dict):
        kind = obj.get("kind")
        if kind == "SecretList":
            return {**obj, "items": [_redact_object(item, True) for item in obj.get("items") or []]}
        if kind == "TokenRequest":
            status = obj.get("status")
            return {**obj, "status": {**status, "token": REDACTED}} if isinstance(status, dict) else obj
        if force or kind == "Secret":
            out = dict(obj)
            for key in ("data", "stringData"):
                if isinstance(out.get(key), dict):
                    out[key] = dict.fromkeys(out[key], REDACTED)
            meta = out.get("metadata")
            if isinstance(meta, dict) and isinstance(meta.get("annotations"), dict):
                annotations = dict(meta["annotations"])
                if "kubectl.kubernetes.io/last-applied-configuration" in annotations:
                    annotations["kubectl.kubernetes.io/last-applied-configuration"] = REDACTED
                out["metadata"] = {**meta, "annotations": annotations}
            return out
        return obj
    if isinstance(obj, list) and force:
        # A JSON patch sent to a Secret: every value may be secret.
        return [{**op, "value": REDACTED} if isinstance(op, dict) and "value" in op else op for op in obj]
    return obj


def redact_record(body: dict[str, Any]) -> dict[str, Any]:
    """The record with Secret values and tokens replaced (keys kept: which key changed is useful)."""
    ref = body.get("objectRef") or {}
    secret = ref.get("resource") == "secrets" and not ref.get("subresource")
    out = body
    for key in ("requestObject", "responseObject"):
        value = body.get(key)
        if value is None or not (secret or _is_secretish(value)):
            continue
        new = _redact_object(value, force=secret)
        if new is not value:
            if out is body:
                out = dict(body)
            out[key] = new
    return out


# -- timelines ------------------------------------------------------------------------------


def _drop_noise(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [op for op in ops if not any(op["path"] == p or op["path"].startswith(p + "/") for p in NOISE)]


def _pointer_get(doc: Any, path: str) -> Any:
    try:
        return jsonpatch.JsonPointer(path).resolve(doc)
    except (jsonpatch.JsonPointerException, KeyError, IndexError, TypeError):
        return None


def _flatten(value: Any, prefix: str, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}/{str(key).replace('~', '~0').replace('/', '~1')}", out)
    elif isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        for index, item in enumerate(value):
            _flatten(item, f"{prefix}/{index}", out)
    else:
        out.append((prefix, value))


def _change(op: str, path: str, old: Any, new: Any) -> dict[str, Any]:
    change: dict[str, Any] = {"op": op, "path": path}
    if op != "add":
        change["old"] = old
    if op != "remove":
        change["new"] = new
    return change


def _without_noise(obj: dict[str, Any]) -> dict[str, Any]:
    """The object less what changes on every write (a copy; annotations emptied by it go too)."""
    out = copy.deepcopy(obj)
    out.pop("status", None)
    meta = out.get("metadata")
    if isinstance(meta, dict):
        for key in ("resourceVersion", "managedFields", "generation", "creationTimestamp", "uid", "selfLink"):
            meta.pop(key, None)
        annotations = meta.get("annotations")
        if isinstance(annotations, dict):
            for key in ("kubectl.kubernetes.io/last-applied-configuration", "deployment.kubernetes.io/revision"):
                annotations.pop(key, None)
            if not annotations:
                meta.pop("annotations")
    return out


def _diff(before: dict[str, Any] | None, after: dict[str, Any]) -> list[dict[str, Any]]:
    if before is None:
        return []
    before, after = _without_noise(before), _without_noise(after)
    ops = _drop_noise(jsonpatch.make_patch(before, after).patch)
    changes = []
    for op in ops:
        if op["op"] in ("move", "copy"):
            changes.append(
                _change("replace", op["path"], _pointer_get(before, op["path"]), _pointer_get(after, op["path"]))
            )
        else:
            changes.append(_change(op["op"], op["path"], _pointer_get(before, op["path"]), op.get("value")))
    return changes


def _patch_changes(patch: Any, before: dict[str, Any] | None) -> list[dict[str, Any]]:
    """What a patch request changes: a JSON patch's operations, or a merge patch's leaves."""
    if isinstance(patch, list):
        ops = _drop_noise([op for op in patch if isinstance(op, dict) and isinstance(op.get("path"), str)])
        return [_change(str(op.get("op")), op["path"], _pointer_get(before, op["path"]), op.get("value")) for op in ops]
    if isinstance(patch, dict):
        leaves: list[tuple[str, Any]] = []
        _flatten({k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}, "", leaves)
        changes = []
        for path, value in leaves:
            if any(path == p or path.startswith(p + "/") for p in NOISE):
                continue
            old = _pointer_get(before, path) if before is not None else None
            if value is None:
                changes.append(_change("remove", path, old, None))
            elif value != old:
                changes.append(_change("replace" if old is not None else "add", path, old, value))
        return changes
    return []


def _object_of(obj: Any) -> dict[str, Any] | None:
    """The object in a request/response body, if it is one (not a Status, not a patch)."""
    if isinstance(obj, dict) and obj.get("kind") not in (None, "Status", "DeleteOptions") and "metadata" in obj:
        return obj
    return None


def _created_name(body: dict[str, Any]) -> str | None:
    """A create with generateName names its object only in the answer."""
    response = body.get("responseObject")
    if body.get("verb") == "create" and isinstance(response, dict):
        name = (response.get("metadata") or {}).get("name")
        return name if isinstance(name, str) else None
    return None


def _audit_entry(record: StoredRecord) -> dict[str, Any]:
    body = record.body
    ref = body.get("objectRef") or {}
    user = body.get("user") or {}
    status = body.get("responseStatus") or {}
    impersonated = (body.get("impersonatedUser") or {}).get("username")
    ips = body.get("sourceIPs") or []
    annotations = body.get("annotations") or {}
    entry: dict[str, Any] = {
        "kind": "audit",
        "user": user.get("username"),
        "verb": body.get("verb"),
        "resource": ref.get("resource"),
        "subresource": ref.get("subresource"),
        "namespace": ref.get("namespace"),
        "name": ref.get("name") or _created_name(body),
        "code": status.get("code"),
        "source_ip": ips[0] if ips else None,
        "user_agent": body.get("userAgent"),
        "audit_id": body.get("auditID"),
        "stage": body.get("stage"),
    }
    if impersonated:
        entry["impersonated_user"] = impersonated
    if status.get("code") is not None and status["code"] >= 400:
        entry["message"] = (
            status.get("message") or status.get("reason") or annotations.get("authorization.k8s.io/reason")
        )
    if annotations.get("authorization.k8s.io/decision") == "forbid":
        entry["message"] = entry.get("message") or annotations.get("authorization.k8s.io/reason") or "forbidden"
    return entry


def _event_entry(record: StoredRecord) -> dict[str, Any]:
    body = record.body
    involved = body.get("involvedObject") or body.get("regarding") or {}
    source = body.get("source") or {}
    series = body.get("series") or {}
    count = body.get("count") or body.get("deprecatedCount") or series.get("count") or 1
    return {
        "kind": "event",
        "type": body.get("type"),
        "reason": body.get("reason"),
        "message": body.get("message") or body.get("note"),
        "count": count,
        "source": body.get("reportingController") or body.get("reportingComponent") or source.get("component"),
        "resource": resource_of_kind(involved["kind"]) if involved.get("kind") else None,
        "namespace": involved.get("namespace"),
        "name": involved.get("name"),
    }


def _log_entry(record: StoredRecord) -> dict[str, Any]:
    body = record.body
    kube = body.get("kubernetes") or {}
    message = body.get("log") if "log" in body else body.get("message")
    return {
        "kind": "log",
        "namespace": kube.get("namespace_name"),
        "name": kube.get("pod_name"),
        "resource": "pods",
        "container": kube.get("container_name"),
        "stream": body.get("stream"),
        "message": message.rstrip("\n") if isinstance(message, str) else message,
    }


_FALCO_PREFIX = re.compile(r"^\d\d:\d\d:\d\d(?:\.\d+)?: \w+ ")  # "06:31:35.123456789: Warning "


def redact_alert(body: dict[str, Any]) -> dict[str, Any]:
    """The alert with any Secret an output field printed (``%jevt.obj``, ``%ka.req...``) redacted,
    in ``output_fields`` and where ``output`` shows it."""
    fields = body.get("output_fields")
    if not isinstance(fields, dict):
        return body
    secret_target = fields.get("ka.target.resource") == "secrets"
    out = body
    for key, value in fields.items():
        if not isinstance(value, str) or not value.startswith(("{", "[")):
            continue
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            continue
        if isinstance(parsed, dict) and "auditID" in parsed:  # %jevt.obj: the whole audit event
            new = redact_record(parsed)
        elif secret_target or _is_secretish(parsed):
            new = _redact_object(parsed, force=secret_target)
        else:
            continue
        if new is parsed:
            continue
        # As Falco prints an object (two-space indent) when the original was so printed.
        text = orjson.dumps(new, option=orjson.OPT_INDENT_2 if "\n" in value else 0).decode()
        if out is body:
            out = {**body, "output_fields": dict(fields)}
        out["output_fields"][key] = text
        if isinstance(out.get("output"), str):
            out["output"] = out["output"].replace(value, text)
    return out


def _alert_entry(record: StoredRecord) -> dict[str, Any]:
    body = record.body
    fields = body.get("output_fields") or {}
    output = body.get("output")
    return {
        "kind": "alert",
        "rule": body.get("rule"),
        "priority": body.get("priority"),
        "tags": body.get("tags") or [],
        "output": output,
        "message": _FALCO_PREFIX.sub("", output) if isinstance(output, str) else output,
        "audit_id": body.get("k8s.audit.id"),
        "stage": body.get("k8s.audit.stage"),
        "user": fields.get("ka.user.name"),
        "verb": fields.get("ka.verb"),
        "resource": fields.get("ka.target.resource"),
        "namespace": fields.get("ka.target.namespace"),
        "name": fields.get("ka.target.name"),
    }


def _place_alerts(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each alert right after the audit entry of its auditID (in the order they fired, by rule
    within one request); the others where their time puts them."""
    audits = {e["audit_id"]: e for e in entries if e["kind"] == "audit" and e.get("audit_id")}
    attached: dict[str, list[dict[str, Any]]] = {}
    out: list[dict[str, Any]] = []
    for entry in entries:
        trigger = audits.get(entry.get("audit_id")) if entry["kind"] == "alert" else None
        if trigger is None:
            out.append(entry)
            continue
        entry["trigger_id"] = trigger["id"]
        for key in ("user", "verb", "resource", "namespace", "name"):
            if entry.get(key) is None:
                entry[key] = trigger.get(key)
        attached.setdefault(entry["audit_id"], []).append(entry)
    if not attached:
        return out
    placed: list[dict[str, Any]] = []
    for entry in out:
        placed.append(entry)
        if entry["kind"] == "audit" and entry.get("audit_id") in attached:
            placed.extend(sorted(attached.pop(entry["audit_id"]), key=lambda e: (e["time_ns"], e["rule"] or "")))
    return placed


def collapse_stages(records: list[StoredRecord]) -> list[StoredRecord]:
    """One record per audit request (its most complete stage), others as they are, by time."""
    best: dict[str, StoredRecord] = {}
    out: list[StoredRecord] = []
    for record in records:
        audit_id = record.body.get("auditID") if record.kind == "audit" else None
        if audit_id is None:
            out.append(record)
            continue
        kept = best.get(audit_id)
        if kept is None or STAGE_RANK.get(record.body.get("stage", ""), -1) > STAGE_RANK.get(
            kept.body.get("stage", ""), -1
        ):
            best[audit_id] = record
    out.extend(best.values())
    # Alerts of one request share its time: by rule, so every backend gives the same order.
    out.sort(key=lambda r: (r.time_ns, str(r.body.get("rule")) if r.kind == "alert" else "", str(r.id)))
    return out


def with_alerts(
    records: list[StoredRecord], alerts_for: Callable[[list[str]], list[StoredRecord]]
) -> list[StoredRecord]:
    """``records`` and the alerts their audit records fired (not already among them), by time.
    ``alerts_for`` is the backend's lookup by auditID; the alerts are looked up whatever their
    own time, since one may be stored before its record."""
    audit_ids = list({r.body["auditID"] for r in records if r.kind == "audit" and "auditID" in r.body})
    if not audit_ids:
        return records
    seen = {r.id for r in records}
    found = [r for r in alerts_for(audit_ids) if r.id not in seen]
    if not found:
        return records
    return sorted(records + found, key=lambda r: (r.time_ns, str(r.id)))


def timeline(records: list[StoredRecord], *, track_changes: bool = True) -> list[dict[str, Any]]:
    """Entries oldest first, with what each audit request changed (``changes``), redacted.

    ``track_changes``: the records are one object's history, so each write can be diffed
    against the state before it; for a user's or a search's records (many objects) the state
    is tracked per object all the same, keyed by resource/namespace/name."""
    states: dict[tuple[Any, ...], dict[str, Any]] = {}
    entries: list[dict[str, Any]] = []
    for record in collapse_stages(records):
        if record.kind == "audit":
            body = redact_record(record.body)
        elif record.kind == "alert":
            body = redact_alert(record.body)
        else:
            body = record.body
        view = StoredRecord(record.id, record.time_ns, record.kind, body)
        if record.kind == "audit":
            entry = _audit_entry(view)
        elif record.kind == "alert":
            entry = _alert_entry(view)
        elif record.kind == "event":
            entry = _event_entry(view)
        elif record.kind == "log":
            entry = _log_entry(view)
        else:
            entry = {"kind": record.kind}
        entry = {"time": iso(record.time_ns), "time_ns": record.time_ns, "id": record.id, **entry}
        if record.kind == "audit" and track_changes:
            _add_changes(entry, body, states)
        entry["record"] = body
        entries.append(entry)
    return _place_alerts(entries)


def _add_changes(entry: dict[str, Any], body: dict[str, Any], states: dict[tuple[Any, ...], dict[str, Any]]) -> None:
    if entry.get("subresource") not in (None, "scale"):
        return
    key = (entry.get("resource"), entry.get("namespace"), entry.get("name"))
    verb = entry.get("verb")
    code = entry.get("code")
    ok = code is None or 200 <= code < 300
    request = body.get("requestObject")
    response = _object_of(body.get("responseObject"))
    before = states.get(key)
    changes: list[dict[str, Any]] = []
    if verb == "create" and ok:
        created = response or _object_of(request)
        if created is not None:
            leaves: list[tuple[str, Any]] = []
            _flatten(
                created.get("spec") or created.get("data") or {}, "/spec" if "spec" in created else "/data", leaves
            )
            changes = [_change("add", path, None, value) for path, value in leaves[:MAX_CREATE_FIELDS]]
            if len(leaves) > MAX_CREATE_FIELDS:
                entry["changes_omitted"] = len(leaves) - MAX_CREATE_FIELDS
    elif verb == "update" and ok:
        after = response or _object_of(request)
        if entry.get("subresource") == "scale" and isinstance(request, dict):
            replicas = (request.get("spec") or {}).get("replicas")
            old = _pointer_get(before, "/spec/replicas") if before is not None else None
            changes = [_change("replace", "/spec/replicas", old, replicas)]
        elif after is not None:
            changes = _diff(before, after)
    elif verb == "patch" and ok:
        # The result beside the state before it says exactly what the patch did (a strategic
        # merge patch's list keys included); without both, the patch's own operations.
        after = response if entry.get("subresource") is None else None
        changes = _diff(before, after) if before is not None and after is not None else _patch_changes(request, before)
    if changes:
        entry["changes"] = changes
    if ok and verb in ("create", "update", "patch", "get") and entry.get("subresource") is None:
        state = response or (_object_of(request) if verb in ("create", "update") else None)
        if state is not None:
            states[key] = copy.deepcopy(state)
        elif verb == "patch" and before is not None and isinstance(request, list):
            try:
                states[key] = jsonpatch.apply_patch(before, request)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
                pass  # the next full object brings the state back
    if ok and entry.get("subresource") == "scale" and before is not None and changes:
        # The scale subresource changed the object's replicas: the next diff starts from there.
        spec = before.setdefault("spec", {})
        if isinstance(spec, dict):
            spec["replicas"] = changes[-1].get("new")
    if verb == "delete" and ok:
        states.pop(key, None)


def summary(entry: dict[str, Any]) -> str:
    """One line describing an entry (text output and the UI's collapsed rows)."""
    kind = entry["kind"]
    if kind == "audit":
        target = "/".join(str(p) for p in (entry.get("resource"), entry.get("namespace"), entry.get("name")) if p)
        if entry.get("subresource"):
            target += f"/{entry['subresource']}"
        who = entry.get("user") or "?"
        if entry.get("impersonated_user"):
            who += f" as {entry['impersonated_user']}"
        where = f" from {entry['source_ip']}" if entry.get("source_ip") else ""
        agent = entry.get("user_agent")
        agent_text = f" ({agent.split(' ')[0]})" if agent else ""
        message = f": {entry['message']}" if entry.get("message") else ""
        return f"{entry.get('verb')} {target} by {who}{where}{agent_text} -> {entry.get('code')}{message}"
    if kind == "event":
        target = "/".join(str(p) for p in (entry.get("resource"), entry.get("namespace"), entry.get("name")) if p)
        count = f" (x{entry['count']})" if entry.get("count", 1) != 1 else ""
        head = f"{entry.get('type') or ''} {entry.get('reason')}".strip()
        return f"{head} {target}: {entry.get('message')}{count} [{entry.get('source')}]"
    if kind == "log":
        return f"{entry.get('name')}/{entry.get('container')}: {entry.get('message')}"
    if kind == "alert":
        return f"{entry.get('priority')} {entry.get('rule')}: {entry.get('message')}"
    return str(entry.get("record"))[:200]


def change_text(change: dict[str, Any]) -> str:
    path = change["path"]
    if change["op"] == "add":
        return f"+ {path}: {_short(change.get('new'))}"
    if change["op"] == "remove":
        return f"- {path} (was {_short(change.get('old'))})"
    return f"~ {path}: {_short(change.get('old'))} -> {_short(change.get('new'))}"


def _short(value: Any, limit: int = 120) -> str:
    import orjson

    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."
