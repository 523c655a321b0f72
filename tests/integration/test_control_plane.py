"""The local control plane is real: these tests would fail against a fake or a broken setup.

They pin down the behaviour kubetrail's later tests rely on: both Event APIs over one
storage, controller-generated Events, audit log content and rotation, audit webhook batches
and retries, least-privilege RBAC for the collector, 410 Gone after compaction, Event TTL
expiry, and surviving an API-server restart.
"""

from __future__ import annotations

import gzip
import json
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from localcluster import ApiResponse, AuditSink, KubeAPI, LocalCluster
from tests import timing

pytestmark = pytest.mark.cluster

T = TypeVar("T")


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.25) -> T:
    """:func:`tests.timing.wait_for` with this module's argument order."""
    return timing.wait_for(fn, timeout, what, interval)  # type: ignore[return-value]


def core_event(namespace: str, name: str, message: str = "hello", reason: str = "KubetrailTest") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": namespace},
        "involvedObject": {"kind": "Pod", "name": "some-pod", "namespace": namespace, "apiVersion": "v1"},
        "reason": reason,
        "message": message,
        "type": "Normal",
        "source": {"component": "kubetrail-test"},
        "count": 1,
    }


def new_event(namespace: str, name: str, note: str = "hello") -> dict[str, Any]:
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": namespace},
        "eventTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "reportingController": "kubetrail.io/test",
        "reportingInstance": "test-1",
        "action": "Testing",
        "reason": "KubetrailTest",
        "regarding": {"kind": "Pod", "name": "some-pod", "namespace": namespace, "apiVersion": "v1"},
        "note": note,
        "type": "Normal",
    }


def core_events(ns: str) -> str:
    return f"/api/v1/namespaces/{ns}/events"


def new_events(ns: str) -> str:
    return f"/apis/events.k8s.io/v1/namespaces/{ns}/events"


def created(resp: ApiResponse) -> dict[str, Any]:
    assert resp.status == 201, resp
    obj: dict[str, Any] = resp.json()
    return obj


def list_rv(api: KubeAPI, path: str) -> str:
    resp = api.get(path)
    assert resp.status == 200, resp
    rv: str = resp.json()["metadata"]["resourceVersion"]
    return rv


# --- Events: two APIs, one storage ---------------------------------------------------------


def test_event_visible_and_watched_through_both_event_apis(admin: KubeAPI, namespace: str) -> None:
    rv = list_rv(admin, core_events(namespace))
    with (
        admin.watch(core_events(namespace), resourceVersion=rv, timeoutSeconds=30) as w_core,
        admin.watch(new_events(namespace), resourceVersion=rv, timeoutSeconds=30) as w_new,
    ):
        old = created(admin.post(core_events(namespace), core_event(namespace, "via-core", "core message")))
        new = created(admin.post(new_events(namespace), new_event(namespace, "via-events-k8s-io", "new note")))
        seen: dict[str, dict[str, dict[str, Any]]] = {"core": {}, "new": {}}
        for label, stream in (("core", w_core), ("new", w_new)):
            while len(seen[label]) < 2:
                event = stream.next(timeout=10)
                assert event is not None, f"{label} watch ended early"
                assert event["type"] == "ADDED", event
                seen[label][event["object"]["metadata"]["name"]] = event["object"]

    for name, obj in (("via-core", old), ("via-events-k8s-io", new)):
        uid = obj["metadata"]["uid"]
        assert seen["core"][name]["metadata"]["uid"] == uid
        assert seen["new"][name]["metadata"]["uid"] == uid
        assert seen["core"][name]["metadata"]["resourceVersion"] == seen["new"][name]["metadata"]["resourceVersion"]
    # The same fields under the other API's names.
    assert seen["new"]["via-core"]["note"] == "core message"
    assert seen["new"]["via-core"]["regarding"]["name"] == "some-pod"
    assert seen["core"]["via-events-k8s-io"]["message"] == "new note"
    assert seen["core"]["via-events-k8s-io"]["involvedObject"]["name"] == "some-pod"
    assert seen["core"]["via-events-k8s-io"]["reportingComponent"] == "kubetrail.io/test"
    # Both lists hold exactly these two objects.
    for path in (core_events(namespace), new_events(namespace)):
        items = admin.get(path).json()["items"]
        assert sorted(i["metadata"]["name"] for i in items) == ["via-core", "via-events-k8s-io"]
    got = admin.get(f"{new_events(namespace)}/via-core")
    assert got.status == 200 and got.json()["metadata"]["uid"] == old["metadata"]["uid"]


def test_deployment_produces_controller_and_scheduler_events(admin: KubeAPI, namespace: str) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "registry.invalid/web:1"}]},
            },
        },
    }
    created(admin.post(f"/apis/apps/v1/namespaces/{namespace}/deployments", deployment))

    def events_by_reason() -> dict[str, list[dict[str, Any]]] | None:
        by_reason: dict[str, list[dict[str, Any]]] = {}
        for item in admin.get(core_events(namespace)).json()["items"]:
            by_reason.setdefault(item["reason"], []).append(item)
        failed_pods = {e["involvedObject"]["name"] for e in by_reason.get("FailedScheduling", [])}
        done = len(by_reason.get("SuccessfulCreate", [])) == 2 and len(failed_pods) == 2
        return by_reason if done and "ScalingReplicaSet" in by_reason else None

    events = wait_for("ScalingReplicaSet, 2x SuccessfulCreate, FailedScheduling for 2 pods", events_by_reason, 60)

    (scaling,) = events["ScalingReplicaSet"]
    assert scaling["involvedObject"]["kind"] == "Deployment"
    assert re.match(r"Scaled up replica set web-\w+ from 0 to 2", scaling["message"]), scaling["message"]
    assert scaling["source"]["component"] == "deployment-controller"
    creates = events["SuccessfulCreate"]
    assert {e["involvedObject"]["kind"] for e in creates} == {"ReplicaSet"}
    created_pods = {e["message"].removeprefix("Created pod: ") for e in creates}
    pods = {p["metadata"]["name"] for p in admin.get(f"/api/v1/namespaces/{namespace}/pods").json()["items"]}
    assert created_pods == pods and len(pods) == 2
    for failed in events["FailedScheduling"]:
        assert failed["type"] == "Warning"
        assert failed["involvedObject"]["name"] in pods
        assert failed["reportingComponent"] == "default-scheduler"
        assert "no nodes available" in failed["message"]
    # The scheduler writes through events.k8s.io/v1: eventTime set, no core-style count.
    new_style = [e for e in admin.get(new_events(namespace)).json()["items"] if e["reason"] == "FailedScheduling"]
    assert new_style and all(e["eventTime"] and e["reportingController"] == "default-scheduler" for e in new_style)


# --- Audit log -------------------------------------------------------------------------------


def audit_files(cluster: LocalCluster) -> list[Path]:
    return sorted(cluster.audit_log_path.parent.iterdir())


def read_audit(cluster: LocalCluster) -> list[dict[str, Any]]:
    """Every audit record in the active log and all (gzipped or not) backups."""
    records = []
    for path in audit_files(cluster):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as fh:
            for line in fh:
                if line.strip():
                    records.append(json.loads(line))
    return records


def test_audit_log_records_policy_levels(local_cluster: LocalCluster, admin: KubeAPI, namespace: str) -> None:
    event_resp = admin.post(core_events(namespace), core_event(namespace, "audited"))
    created(event_resp)
    secret = {"metadata": {"name": "s"}, "stringData": {"password": "hunter2"}}
    secret_resp = admin.post(f"/api/v1/namespaces/{namespace}/secrets", secret)
    created(secret_resp)
    collector_resp = local_cluster.client("collector").get(core_events(namespace))
    assert collector_resp.status == 200
    ids = {r.audit_id for r in (event_resp, secret_resp, collector_resp)}
    assert None not in ids

    def records() -> dict[str, list[dict[str, Any]]] | None:
        found: dict[str, list[dict[str, Any]]] = {}
        for rec in read_audit(local_cluster):
            if rec["auditID"] in ids:
                found.setdefault(rec["auditID"], []).append(rec)
        complete = all(any(r["stage"] == "ResponseComplete" for r in found.get(str(i), [])) for i in ids)
        return found if complete else None

    found = wait_for("ResponseComplete audit records", records, 15)
    event_recs = found[str(event_resp.audit_id)]
    assert [r["stage"] for r in event_recs] == ["RequestReceived", "ResponseComplete"]
    final = event_recs[-1]
    assert final["level"] == "RequestResponse"
    assert final["verb"] == "create" and final["user"]["username"] == "admin"
    assert final["objectRef"] == {**final["objectRef"], "resource": "events", "namespace": namespace}
    assert final["requestObject"]["metadata"]["name"] == "audited"
    assert final["responseObject"]["metadata"]["uid"] == created(event_resp)["metadata"]["uid"]
    assert final["responseStatus"]["code"] == 201

    secret_final = found[str(secret_resp.audit_id)][-1]
    assert secret_final["level"] == "Metadata"
    assert "requestObject" not in secret_final and "responseObject" not in secret_final
    assert "hunter2" not in json.dumps(found[str(secret_resp.audit_id)])

    collector_final = found[str(collector_resp.audit_id)][-1]
    assert collector_final["user"]["username"] == "kubetrail-collector"
    assert collector_final["verb"] == "list"
    assert collector_final["responseObject"]["kind"] == "EventList"


BACKUP_NAME = re.compile(r"^audit-(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}\.\d{3})\.log\.gz$")


def test_audit_log_rotates_into_gzipped_backups(local_cluster: LocalCluster, admin: KubeAPI, namespace: str) -> None:
    assert local_cluster.options.audit_log_maxsize == 1 and local_cluster.options.audit_log_compress
    before = {p.name for p in audit_files(local_cluster)}
    filler = "x" * 1000
    for i in range(40):
        created(admin.post(core_events(namespace), core_event(namespace, f"filler-{i}", filler)))
    # Each list is logged with its ~50 KB response body (RequestResponse for events).
    list_ids = []
    for _ in range(30):
        resp = admin.get(core_events(namespace))
        assert resp.status == 200
        list_ids.append(resp.audit_id)

    def new_backups() -> list[str] | None:
        names = [p.name for p in audit_files(local_cluster)]
        fresh = [n for n in names if n not in before and n != "audit.log"]
        # lumberjack renames first and gzips in the background: wait until no plain backup is left
        settled = all(BACKUP_NAME.match(n) for n in names if n != "audit.log")
        return fresh if fresh and settled else None

    fresh = wait_for("a new gzipped audit log backup", new_backups, 30)
    assert len(fresh) >= 1
    names = [p.name for p in audit_files(local_cluster)]
    backups = [n for n in names if n != "audit.log"]
    assert "audit.log" in names
    assert all(BACKUP_NAME.match(n) for n in backups), backups
    assert len(backups) <= local_cluster.options.audit_log_maxbackup
    stamps = [datetime.strptime(BACKUP_NAME.match(n).group(1), "%Y-%m-%dT%H-%M-%S.%f") for n in backups]  # type: ignore[union-attr]
    assert stamps == sorted(stamps)
    for name in fresh:
        path = local_cluster.audit_log_path.parent / name
        with gzip.open(path, "rt") as fh:
            lines = fh.read().splitlines()
        assert lines and all(json.loads(line)["kind"] == "Event" for line in lines)
        # Rotation happens before the file would exceed maxsize (1 MiB, uncompressed).
        assert sum(len(line) + 1 for line in lines) <= 1024 * 1024
    # Nothing lost across the rotation: both stages of every list request are somewhere.
    stages: dict[str, set[str]] = {}
    for rec in read_audit(local_cluster):
        stages.setdefault(rec["auditID"], set()).add(rec["stage"])
    assert all(stages.get(str(i)) == {"RequestReceived", "ResponseComplete"} for i in list_ids)


# --- Audit webhook -----------------------------------------------------------------------------


def test_audit_webhook_receives_event_lists(local_cluster: LocalCluster, audit_sink: AuditSink, namespace: str) -> None:
    admin = local_cluster.client("admin")
    resp = admin.post(core_events(namespace), core_event(namespace, "webhooked"))
    created(resp)
    deliveries = audit_sink.wait_for(
        lambda ds: any(resp.audit_id in d.audit_ids and d.status == 200 for d in ds), timeout=20
    )
    assert all(d.authenticated and d.path.startswith("/audit?") for d in deliveries)
    assert all(d.body["kind"] == "EventList" and d.body["apiVersion"] == "audit.k8s.io/v1" for d in deliveries)
    mine = [i for i in audit_sink.accepted_events() if i["auditID"] == resp.audit_id]
    assert sorted(i["stage"] for i in mine) == ["RequestReceived", "ResponseComplete"]
    assert mine[-1]["requestObject"]["metadata"]["name"] == "webhooked"


def test_audit_webhook_is_retried_after_5xx(local_cluster: LocalCluster, audit_sink: AuditSink, namespace: str) -> None:
    admin = local_cluster.client("admin")
    audit_sink.wait_for(lambda ds: bool(ds), timeout=20)  # the webhook is flowing
    start = len(audit_sink.deliveries())
    audit_sink.fail_next(2, status=500)
    resp = admin.post(core_events(namespace), core_event(namespace, "retried"))
    created(resp)

    def retried(ds: list[Any]) -> bool:
        failed = [d for d in ds[start:] if d.status == 500]
        later_ok_ids = {i for d in ds[start:] if d.status == 200 for i in d.audit_ids}
        return len(failed) == 2 and all(set(d.audit_ids) <= later_ok_ids for d in failed)

    deliveries = audit_sink.wait_for(retried, timeout=30)[start:]
    failed = [d for d in deliveries if d.status == 500]
    assert all(d.items for d in failed)
    # The retried batch is the same batch: same auditIDs and stages, re-sent after the backoff.
    first = failed[0]
    key = sorted((i["auditID"], i["stage"]) for i in first.items)
    resent = [
        d
        for d in deliveries
        if d.received_at > first.received_at and sorted((i["auditID"], i["stage"]) for i in d.items) == key
    ]
    assert resent, "the failed batch was never re-sent unchanged"
    assert resent[0].received_at - first.received_at >= 0.9  # --audit-webhook-initial-backoff=1s
    accepted = audit_sink.accepted_events()
    assert any(i["auditID"] == resp.audit_id and i["stage"] == "ResponseComplete" for i in accepted)


# --- RBAC ----------------------------------------------------------------------------------------


def _lease(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name},
        "spec": {"holderIdentity": "test", "leaseDurationSeconds": 15},
    }


def test_collector_rbac_is_exactly_what_it_needs(local_cluster: LocalCluster, namespace: str) -> None:
    collector = local_cluster.client("collector")
    leases = "/apis/coordination.k8s.io/v1/namespaces/kubetrail/leases"
    lease_name = f"lease-{uuid.uuid4().hex[:8]}"
    allowed = {
        "list core events": collector.get(core_events(namespace)),
        "list events.k8s.io": collector.get(new_events(namespace)),
        "list all events": collector.get("/api/v1/events"),
        "list pods": collector.get("/api/v1/pods"),
        "get namespace": collector.get(f"/api/v1/namespaces/{namespace}"),
        "list namespaces": collector.get("/api/v1/namespaces"),
        "create lease": collector.post(leases, _lease(lease_name)),
    }
    got = collector.get(f"{leases}/{lease_name}")
    allowed["get lease"] = got
    if got.ok:
        allowed["update lease"] = collector.put(f"{leases}/{lease_name}", got.json())
    assert {k: r.status for k, r in allowed.items()} == {k: (201 if k == "create lease" else 200) for k in allowed}
    with collector.watch(new_events(namespace), timeoutSeconds=1) as w:
        assert w.status == 200

    denied = {
        "list secrets": collector.get(f"/api/v1/namespaces/{namespace}/secrets"),
        "create core event": collector.post(core_events(namespace), core_event(namespace, "nope")),
        "create new event": collector.post(new_events(namespace), new_event(namespace, "nope")),
        "delete event": collector.delete(f"{core_events(namespace)}/anything"),
        "list deployments": collector.get(f"/apis/apps/v1/namespaces/{namespace}/deployments"),
        "list leases": collector.get(leases),
        "delete lease": collector.delete(f"{leases}/{lease_name}"),
        "lease elsewhere": collector.post(f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases", _lease("x")),
        "list configmaps": collector.get("/api/v1/configmaps"),
    }
    assert {k: r.status for k, r in denied.items()} == dict.fromkeys(denied, 403)


def _rules(api: KubeAPI, namespace: str) -> set[tuple[str, str, str]]:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectRulesReview",
        "spec": {"namespace": namespace},
    }
    resp = api.post("/apis/authorization.k8s.io/v1/selfsubjectrulesreviews", review)
    assert resp.status == 201, resp
    status = resp.json()["status"]
    assert not status.get("incomplete"), status
    return {
        (g, r, v)
        for rule in status["resourceRules"]
        for g in rule.get("apiGroups", [""])
        for r in rule.get("resources", [])
        for v in rule["verbs"]
    }


def test_collector_has_no_extra_permissions(local_cluster: LocalCluster) -> None:
    """Everything the collector may do beyond what any authenticated user may do."""
    collector, norbac = local_cluster.client("collector"), local_cluster.client("norbac")
    read = {"get", "list", "watch"}
    in_kubetrail = _rules(collector, "kubetrail") - _rules(norbac, "kubetrail")
    assert in_kubetrail == (
        {("", "events", v) for v in read}
        | {("events.k8s.io", "events", v) for v in read}
        | {("", "pods", v) for v in read}
        | {("", "namespaces", v) for v in read}
        | {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}
    )
    in_default = _rules(collector, "default") - _rules(norbac, "default")
    assert in_default == {t for t in in_kubetrail if t[0] != "coordination.k8s.io"}


def test_norbac_user_is_forbidden_everywhere_and_bad_token_unauthorized(
    local_cluster: LocalCluster, namespace: str
) -> None:
    norbac = local_cluster.client("norbac")
    statuses = [
        norbac.get(core_events(namespace)).status,
        norbac.get(new_events(namespace)).status,
        norbac.get("/api/v1/events").status,
        norbac.get("/api/v1/pods").status,
        norbac.get("/api/v1/namespaces").status,
        norbac.get(f"/api/v1/namespaces/{namespace}").status,
        norbac.post(core_events(namespace), core_event(namespace, "nope")).status,
        norbac.get("/apis/coordination.k8s.io/v1/namespaces/kubetrail/leases/x").status,
    ]
    assert statuses == [403] * len(statuses)
    bad = KubeAPI(local_cluster.url, local_cluster.ca_file, token="not-a-valid-token")
    assert bad.get(core_events(namespace)).status == 401


# --- Compaction and 410 Gone -----------------------------------------------------------------


def _expect_expired(api: KubeAPI, path: str, rv: str) -> None:
    listed = api.get(path, resourceVersion=rv, resourceVersionMatch="Exact")
    assert listed.status == 410, listed
    assert listed.json()["reason"] == "Expired"
    with api.watch(path, resourceVersion=rv, timeoutSeconds=10) as w:
        event = w.next(timeout=10)
    assert event is not None and event["type"] == "ERROR", event
    assert event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"


def test_compaction_makes_old_resource_version_gone(
    local_cluster: LocalCluster, admin: KubeAPI, namespace: str
) -> None:
    old_rv = list_rv(admin, core_events(namespace))
    for i in range(3):
        created(admin.post(core_events(namespace), core_event(namespace, f"before-compaction-{i}")))
    # Before compaction the old RV still answers.
    assert admin.get(core_events(namespace), resourceVersion=old_rv, resourceVersionMatch="Exact").status == 200
    revision = local_cluster.compact_now()
    assert revision > int(old_rv)
    _expect_expired(admin, core_events(namespace), old_rv)
    _expect_expired(admin, new_events(namespace), old_rv)
    # Relisting gives a fresh RV that watches fine: the recovery path a collector takes.
    fresh = list_rv(admin, core_events(namespace))
    with admin.watch(core_events(namespace), resourceVersion=fresh, timeoutSeconds=10) as w:
        created(admin.post(core_events(namespace), core_event(namespace, "after-compaction")))
        event = w.next(timeout=10)
    assert event is not None and event["type"] == "ADDED"
    assert event["object"]["metadata"]["name"] == "after-compaction"


def test_apiserver_periodic_compaction_expires_old_resource_versions(
    compacting_cluster: LocalCluster,
) -> None:
    api = compacting_cluster.client("admin")
    ns = "default"
    old_rv = list_rv(api, core_events(ns))
    for i in range(3):
        created(api.post(core_events(ns), core_event(ns, f"c-{uuid.uuid4().hex[:6]}-{i}")))

    def gone() -> bool:
        return api.get(core_events(ns), resourceVersion=old_rv, resourceVersionMatch="Exact").status == 410

    # --etcd-compaction-interval=2s compacts to the revision seen one tick earlier.
    wait_for("the apiserver's compactor to pass the old resourceVersion", gone, 30)
    _expect_expired(api, core_events(ns), old_rv)


def test_event_ttl_expiry_reaches_watchers_as_deleted(compacting_cluster: LocalCluster) -> None:
    api = compacting_cluster.client("admin")
    ns = "default"
    rv = list_rv(api, core_events(ns))
    name = f"short-lived-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    with api.watch(core_events(ns), resourceVersion=rv, timeoutSeconds=60, fieldSelector=f"metadata.name={name}") as w:
        created(api.post(core_events(ns), core_event(ns, name)))
        types = []
        while "DELETED" not in types:
            event = w.next(timeout=40)
            assert event is not None, "watch ended before the event expired"
            types.append(event["type"])
    elapsed = time.monotonic() - started
    assert types == ["ADDED", "DELETED"]
    assert 4 <= elapsed < 40, elapsed  # --event-ttl=5s plus lease granularity and etcd's expiry sweep
    assert api.get(f"{core_events(ns)}/{name}").status == 404


@pytest.mark.parametrize("graceful", [True, False], ids=["sigterm", "sigkill"])
def test_restart_apiserver_keeps_url_and_data(compacting_cluster: LocalCluster, graceful: bool) -> None:
    api = compacting_cluster.client("admin")
    name = f"survivor-{uuid.uuid4().hex[:6]}"
    created(api.post("/api/v1/namespaces/default/configmaps", {"metadata": {"name": name}, "data": {"k": "v"}}))
    apiserver = compacting_cluster.components["kube-apiserver"]
    old_pid = apiserver.pid
    starts = apiserver.log_path.read_text().count("=== localcluster: starting kube-apiserver")
    rv = list_rv(api, "/api/v1/namespaces/default/configmaps")
    with api.watch("/api/v1/namespaces/default/configmaps", resourceVersion=rv, timeoutSeconds=60) as w:
        started = time.monotonic()
        ready_after = compacting_cluster.restart_apiserver(graceful=graceful)
        elapsed = time.monotonic() - started
        try:
            ended_cleanly = w.next(timeout=5) is None
        except OSError:
            ended_cleanly = False  # connection reset
    if graceful:
        assert ended_cleanly, "a graceful restart should end open watches cleanly"
    assert elapsed < 30, f"restart took {elapsed:.1f}s"
    assert ready_after < elapsed
    assert apiserver.pid != old_pid
    assert compacting_cluster.url == f"https://127.0.0.1:{compacting_cluster.ports['kube-apiserver']}"
    assert api.get("/readyz").status == 200
    got = api.get(f"/api/v1/namespaces/default/configmaps/{name}")
    assert got.status == 200 and got.json()["data"] == {"k": "v"}
    log = apiserver.log_path.read_text()
    assert log.count("=== localcluster: starting kube-apiserver") == starts + 1
