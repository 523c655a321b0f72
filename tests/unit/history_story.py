"""A small story as kubetrail records it, for the store, history, Elasticsearch and UI tests.

Audit events are shaped as the API server writes them at level RequestResponse (the fields and
nesting of audit.k8s.io/v1), Events as core/v1 Events, log lines as tail + cri + the kubernetes
filter make them; each record carries the identity its source gives it. The recorded dataset
from the real control plane is in examples/history/ (see scripts/record-example); this one is
small and fixed so the tests can state exact timelines.

The story: alice creates Deployment shop/web (nginx:1.27, 1 replica); the controller scales its
ReplicaSet (Events); alice scales it to 3 (scale subresource); bob sets the image to nginx:1.28
(strategic merge patch); carol deletes a pod; the default service account of ci reads Secret
shop/db; mallory is forbidden to delete the Deployment; the pods log a few lines.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from kubetrail.core.record import Record

T0 = 1_764_900_000_000_000_000  # 2025-12-05T02:00:00Z
UID_WEB = "5b0e6f0a-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
UID_POD = "7c1f2a3b-4d5e-4f60-9a1b-2c3d4e5f6a7b"
SA_CI = "system:serviceaccount:ci:default"
SECRET_VALUE = "c3VwZXItc2VjcmV0"  # must never appear in any output


def _ts(offset_s: float) -> str:
    ns = T0 + int(offset_s * 1e9)
    seconds, rest = divmod(ns, 1_000_000_000)
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest // 1000:06d}Z"


def deployment(replicas: int, image: str, rv: str) -> dict[str, Any]:
    return {
        "kind": "Deployment",
        "apiVersion": "apps/v1",
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "uid": UID_WEB,
            "resourceVersion": rv,
            "generation": int(rv) - 99,
            "creationTimestamp": _ts(0),
            "labels": {"app": "web"},
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "app", "image": image}]},
            },
        },
        "status": {"replicas": replicas},
    }


def audit(
    offset_s: float,
    audit_id: str,
    verb: str,
    user: str,
    resource: str,
    name: str,
    *,
    namespace: str = "shop",
    code: int = 200,
    subresource: str | None = None,
    request: Any = None,
    response: Any = None,
    stage: str = "ResponseComplete",
    decision: str = "allow",
    ip: str = "10.1.2.3",
) -> Record:
    ref: dict[str, Any] = {"resource": resource, "namespace": namespace, "name": name, "apiVersion": "v1"}
    if resource == "deployments":
        ref["apiGroup"] = "apps"
    if subresource:
        ref["subresource"] = subresource
    body: dict[str, Any] = {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": "RequestResponse",
        "auditID": audit_id,
        "stage": stage,
        "requestURI": f"/apis/apps/v1/namespaces/{namespace}/{resource}/{name}",
        "verb": verb,
        "user": {"username": user, "groups": ["system:authenticated"]},
        "sourceIPs": [ip],
        "userAgent": "kubectl/v1.36.3 (linux/amd64) kubernetes/abcdef",
        "objectRef": ref,
        "responseStatus": {"metadata": {}, "code": code},
        "requestReceivedTimestamp": _ts(offset_s),
        "stageTimestamp": _ts(offset_s + 0.002),
        "annotations": {"authorization.k8s.io/decision": decision, "authorization.k8s.io/reason": ""},
    }
    if code >= 400:
        body["responseStatus"] = {
            "metadata": {},
            "status": "Failure",
            "message": f'{resource} "{name}" is forbidden: User "{user}" cannot {verb} resource "{resource}"',
            "reason": "Forbidden",
            "code": code,
        }
    if request is not None:
        body["requestObject"] = request
    if response is not None:
        body["responseObject"] = response
    return Record("kube.audit", T0 + int(offset_s * 1e9), body, identity=(audit_id, stage))


def event(offset_s: float, uid: str, rv: str, kind: str, name: str, reason: str, message: str, **extra: Any) -> Record:
    body = {
        "kind": "Event",
        "apiVersion": "v1",
        "metadata": {"name": f"{name}.{uid[:8]}", "namespace": "shop", "uid": uid, "resourceVersion": rv},
        "involvedObject": {"kind": kind, "namespace": "shop", "name": name, "apiVersion": "apps/v1"},
        "reason": reason,
        "message": message,
        "source": {"component": "deployment-controller"},
        "firstTimestamp": _ts(offset_s),
        "lastTimestamp": _ts(offset_s),
        "count": 1,
        "type": "Normal",
        **extra,
    }
    return Record("kube.events", T0 + int(offset_s * 1e9), body, identity=(uid, rv))


def log(offset_s: float, pod: str, message: str, offset: int, file_uid: str = "file-uid-1") -> Record:
    body = {
        "time": _ts(offset_s),
        "stream": "stdout",
        "_p": "F",
        "log": message,
        "kubernetes": {"pod_name": pod, "namespace_name": "shop", "pod_id": UID_POD, "container_name": "app"},
    }
    return Record("kube.var.log.containers.app", T0 + int(offset_s * 1e9), body, identity=(file_uid, offset))


def story() -> list[Record]:
    created = deployment(1, "nginx:1.27", "100")
    scaled = deployment(3, "nginx:1.27", "101")
    patched = deployment(3, "nginx:1.28", "102")
    request_create = copy.deepcopy(created)
    for key in ("uid", "resourceVersion", "generation", "creationTimestamp"):
        request_create["metadata"].pop(key)
    request_create.pop("status")
    scale = {"kind": "Scale", "apiVersion": "autoscaling/v1", "metadata": {"name": "web"}, "spec": {"replicas": 3}}
    secret = {
        "kind": "Secret",
        "apiVersion": "v1",
        "metadata": {"name": "db", "namespace": "shop"},
        "data": {"password": SECRET_VALUE},
    }
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "nginx:1.28"}]}}}}
    return [
        # RequestReceived then ResponseComplete of the same request: one timeline entry.
        audit(0, "a-create", "create", "alice", "deployments", "web", request=request_create, stage="RequestReceived"),
        audit(0, "a-create", "create", "alice", "deployments", "web", code=201, request=request_create,
              response=created),
        event(1, "e1000000-0000-4000-8000-000000000001", "500", "Deployment", "web", "ScalingReplicaSet",
              "Scaled up replica set web-6d4b8 from 0 to 1"),
        log(2, "web-6d4b8-x7k2p", "nginx started", 0),
        audit(10, "a-scale", "update", "alice", "deployments", "web", subresource="scale", request=scale,
              response={**scale, "status": {"replicas": 3}}),
        event(11, "e1000000-0000-4000-8000-000000000002", "501", "Deployment", "web", "ScalingReplicaSet",
              "Scaled up replica set web-6d4b8 from 1 to 3"),
        audit(12, "a-get", "get", "alice", "deployments", "web", response=scaled),
        audit(20, "a-patch", "patch", "bob", "deployments", "web", request=patch, response=patched),
        log(21, "web-6d4b8-x7k2p", "GET / 200", 14),
        event(22, "e1000000-0000-4000-8000-000000000004", "503", "Pod", "web-6d4b8-x7k2p", "BackOff",
              "Back-off restarting failed container app", type="Warning", count=4),
        audit(30, "a-delpod", "delete", "carol", "pods", "web-6d4b8-x7k2p", ip="10.9.9.9"),
        audit(40, "a-secret", "get", SA_CI, "secrets", "db", response=secret),
        audit(50, "a-forbid", "delete", "mallory", "deployments", "web", code=403, decision="forbid"),
        event(51, "e1000000-0000-4000-8000-000000000003", "502", "Deployment", "web", "ScalingReplicaSet",
              "Scaled down replica set web-6d4b8 from 3 to 2", type="Normal", count=2),
        log(52, "other-7f9c-abcde", "not about web", 0, "file-uid-2"),
    ]  # fmt: skip


RULES = Path(__file__).resolve().parents[2] / "examples" / "history" / "rules"


def alerts(records: list[Record], *rules_files: Path | str) -> list[Record]:
    """The alerts the real ``detect`` filter raises on ``records``' audit records: Falco's
    k8s_audit rules unchanged and the example's local rule (examples/history/rules), then any
    ``rules_files``; as the filter emits them (Falco's JSON output + identity, with the record
    identity ``(auditID, stage, "detect", rule)``)."""
    from kubetrail.core.record import Batch
    from kubetrail.transforms.detect import DetectTransform
    from tests.unit.helpers import build

    files = [str(RULES / "k8s_audit_rules.yaml"), str(RULES / "local.yaml"), *map(str, rules_files)]
    detect = build(DetectTransform, rules_file=files, alert_tag="kube.alert")
    audit = [r for r in records if r.tag == "kube.audit"]
    _, emitted = detect.process_emitting(Batch("kube.audit", audit))
    return [record for batch in emitted for record in batch.records]
