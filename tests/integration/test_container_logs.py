"""tail (cri) + the ``kubernetes`` filter against the real control plane.

Pods are created with ``spec.nodeName`` set to a node that does not exist: without a kubelet
they stay Pending, but their metadata (uid, labels, annotations, owners, node) is real, and the
filter's per-node watch (``fieldSelector=spec.nodeName``) sees exactly them. Log files are
written by the test in the ``/var/log/containers`` naming scheme.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from localcluster import KubeAPI, LocalCluster
from tests.integration.kubetrail_proc import KubetrailProcess, file_output, read_records, wait_for

pytestmark = pytest.mark.cluster


def _config(cluster: LocalCluster, logs: Path, out: Path, node: str, extra: str = "") -> str:
    return f"""
[SERVICE]
    log_level debug
    grace 5
[INPUT]
    name              tail
    path              {logs}/*.log
    tag               kube.*
    read_from_head    on
    refresh_interval  1
    multiline.parser  cri
    db                {out}/tail.db
[FILTER]
    name                  kubernetes
    match                 kube.*
    kube_url              {cluster.url}
    kube_ca_file          {cluster.ca_file}
    kube_token_file       {cluster.collector_token_file}
    kube_tag_prefix       kube{str(logs).replace("/", ".")}.
    node_name             {node}
    namespace_labels      on
    owner_references      on
    merge_log             on
    k8s-logging.exclude   on
    k8s-logging.parser    on
{extra}
{file_output(out)}"""


def _pod(api: KubeAPI, namespace: str, name: str, node: str, **meta: Any) -> dict[str, Any]:
    body = {
        "metadata": {"name": name, **meta},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "example.com/app:1.2"}]},
    }
    resp = api.post(f"/api/v1/namespaces/{namespace}/pods", body)
    assert resp.status == 201, resp
    return resp.json()  # type: ignore[no-any-return]


def _log_file(logs: Path, pod: str, namespace: str, lines: list[str], container: str = "app") -> Path:
    cid = uuid.uuid4().hex * 2
    path = logs / f"{pod}_{namespace}_{container}-{cid}.log"
    stamp = "2024-05-01T12:00:00.000000000Z"
    path.write_text("".join(f"{stamp} stdout F {line}\n" for line in lines))
    return path


def test_metadata_from_real_pods_and_namespaces(local_cluster: LocalCluster, admin: KubeAPI, tmp_path: Path) -> None:
    node = f"kt-node-{uuid.uuid4().hex[:8]}"
    ns = f"ktlogs-{uuid.uuid4().hex[:8]}"
    resp = admin.post("/api/v1/namespaces", {"metadata": {"name": ns, "labels": {"team": "shop"}}})
    assert resp.status == 201, resp
    owner = admin.post(f"/api/v1/namespaces/{ns}/configmaps", {"metadata": {"name": "owner"}}).json()
    owner_ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    web = _pod(admin, ns, "web-1", node, labels={"app": "web"}, ownerReferences=[owner_ref])
    _pod(admin, ns, "quiet", node, annotations={"fluentbit.io/exclude": "true"})
    _pod(admin, ns, "klogger", node, annotations={"kubetrail.io/parser": "klog"})
    gone = _pod(admin, ns, "gone", node, labels={"app": "gone"})
    _pod(admin, ns, "elsewhere", node + "-other")  # another node: never in this node's watch

    logs, out = tmp_path / "containers", tmp_path / "out"
    logs.mkdir()
    proc = KubetrailProcess(tmp_path, _config(local_cluster, logs, out, node)).start()
    try:
        wait_for(lambda: "pod metadata synced" in proc.log(), 30, "the filter's first list")
        # Deleted after the watch saw it, before its lines are read: it keeps its metadata.
        resp = admin.delete(f"/api/v1/namespaces/{ns}/pods/gone", gracePeriodSeconds=0)
        assert resp.status == 200, resp
        time.sleep(1.0)
        _log_file(logs, "web-1", ns, ["plain line", '{"level":"info","msg":"structured"}'])
        _log_file(logs, "quiet", ns, ["excluded"])
        _log_file(logs, "klogger", ns, ['I0501 12:00:00.123456    7 main.go:42] "Started" port="8080"'])
        _log_file(logs, "gone", ns, ["last words"])
        _log_file(logs, "never-existed", ns, ["orphan"])
        _log_file(logs, "elsewhere", ns, ["wrong node"])
        wait_for(lambda: len(read_records(out / "out.jsonl")) >= 6, 30, "6 records delivered")
    finally:
        assert proc.stop() == 0
    records = read_records(out / "out.jsonl")
    by_log = {r.get("log", r.get("msg")): r for r in records}
    assert "excluded" not in by_log
    assert len(records) == 6, records

    plain = by_log["plain line"]["kubernetes"]
    assert plain["pod_name"] == "web-1" and plain["namespace_name"] == ns
    assert plain["pod_id"] == web["metadata"]["uid"]
    assert plain["labels"] == {"app": "web"}
    assert plain["host"] == node
    assert plain["container_name"] == "app" and plain["container_image"] == "example.com/app:1.2"
    assert plain["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
    assert by_log["plain line"]["kubernetes_namespace"]["labels"]["team"] == "shop"

    structured = next(r for r in records if r.get("msg") == "structured")
    assert structured["level"] == "info" and structured["kubernetes"]["pod_name"] == "web-1"

    klog = next(r for r in records if r.get("msg") == "Started")
    assert klog["port"] == "8080" and klog["severity"] == "info" and klog["source"] == "main.go:42"

    last = by_log["last words"]["kubernetes"]
    assert last["pod_id"] == gone["metadata"]["uid"] and last["labels"] == {"app": "gone"}

    orphan = by_log["orphan"]["kubernetes"]
    assert orphan == {k: orphan[k] for k in ("pod_name", "namespace_name", "container_name", "docker_id")}
    assert orphan["pod_name"] == "never-existed"
    assert "pod_id" not in by_log["wrong node"]["kubernetes"]  # another node's pod is not watched
    assert "Traceback" not in proc.log()


def test_watch_count_is_constant_for_many_pods(local_cluster: LocalCluster, admin: KubeAPI, tmp_path: Path) -> None:
    """50 pods with lines: the filter's requests stay at one list + one watch per resource."""
    node = f"kt-node-{uuid.uuid4().hex[:8]}"
    ns = f"ktmany-{uuid.uuid4().hex[:8]}"
    assert admin.post("/api/v1/namespaces", {"metadata": {"name": ns}}).status == 201
    for i in range(50):
        _pod(admin, ns, f"p{i}", node)
    logs, out = tmp_path / "containers", tmp_path / "out"
    logs.mkdir()
    for i in range(50):
        _log_file(logs, f"p{i}", ns, [f"pod {i} line {j}" for j in range(5)])
    proc = KubetrailProcess(tmp_path, _config(local_cluster, logs, out, node)).start()
    try:
        wait_for(lambda: len(read_records(out / "out.jsonl")) >= 250, 30, "250 records")
    finally:
        assert proc.stop() == 0
    records = read_records(out / "out.jsonl")
    assert len(records) == 250
    assert all("pod_id" in r["kubernetes"] for r in records)
    # Requests are logged by the API server's audit log: the collector's user made only
    # list/watch calls on pods and namespaces, and no get.
    audit = _collector_requests(local_cluster)
    pod_gets = [a for a in audit if a["verb"] == "get" and a.get("objectRef", {}).get("resource") == "pods"]
    assert not pod_gets
    mine = [a for a in audit if node in a["requestURI"].replace("%3D", "=")]
    verbs = sorted(a["verb"] for a in mine)
    assert verbs.count("list") == 1 and 1 <= verbs.count("watch") <= 2, verbs


def _collector_requests(cluster: LocalCluster) -> list[dict[str, Any]]:
    import gzip
    import json

    events: list[dict[str, Any]] = []
    audit = Path(cluster.audit_log_path)
    for path in sorted(audit.parent.glob(audit.name + "*")) + sorted(audit.parent.glob(audit.stem + "-*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as handle:  # type: ignore[operator]
            for line in handle:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                user = (event.get("user") or {}).get("username", "")
                # Exactly kubetrail's user: kube-controller-manager's generic-garbage-collector
                # (which GETs pods when other tests delete Deployments) also has "collector" in it.
                if user == "kubetrail-collector" and event.get("stage") in ("ResponseComplete", "ResponseStarted"):
                    events.append(event)
    return events
