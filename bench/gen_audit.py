#!/usr/bin/env python3
"""Write N realistic audit.k8s.io/v1 JSON lines (mix of levels/verbs) to stdout.

The team's shared benchmark generator (shared/bench/gen_audit.py), kept here so the benchmarks
run from a clone alone; only its layout changed (ruff), its output is the same line for line
(apart from the one ``uuid4`` owner uid, random in both).
"""

import datetime as dt
import json
import random
import sys
import uuid

n = int(sys.argv[1])
random.seed(7)
users = [
    ("system:kube-controller-manager", ["system:authenticated"]),
    (
        "system:serviceaccount:kube-system:replicaset-controller",
        ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"],
    ),
    ("system:node:worker-1", ["system:nodes", "system:authenticated"]),
    ("alice@example.com", ["devs", "system:authenticated"]),
    ("system:kube-scheduler", ["system:authenticated"]),
]
res = ["pods", "configmaps", "leases", "events", "deployments", "secrets", "nodes", "services", "endpoints"]
verbs = ["get", "list", "watch", "update", "patch", "create", "delete"]
t0 = dt.datetime(2026, 11, 28, 12, 0, 0)
pod = {
    "kind": "Pod",
    "apiVersion": "v1",
    "metadata": {
        "name": "web-7d9f8b6c5-x2x9q",
        "namespace": "shop",
        "labels": {"app": "web", "pod-template-hash": "7d9f8b6c5"},
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "web-7d9f8b6c5",
                "uid": str(uuid.uuid4()),
                "controller": True,
            }
        ],
    },
    "spec": {
        "containers": [
            {
                "name": "web",
                "image": "nginx:1.27",
                "ports": [{"containerPort": 80}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
            }
        ],
        "nodeName": "worker-1",
        "serviceAccountName": "default",
    },
    "status": {"phase": "Running"},
}
out = sys.stdout
for i in range(n):
    u, g = random.choice(users)
    r = random.choice(res)
    v = random.choice(verbs)
    ts = t0 + dt.timedelta(microseconds=i * 250)
    ev = {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": "Metadata",
        "auditID": str(uuid.UUID(int=random.getrandbits(128))),
        "stage": "ResponseComplete",
        "requestURI": f"/api/v1/namespaces/shop/{r}/obj-{i % 500}",
        "verb": v,
        "user": {"username": u, "groups": g},
        "sourceIPs": [f"10.0.{i % 7}.{i % 250}"],
        "userAgent": "kube-controller-manager/v1.36.4 (linux/amd64) kubernetes/abc1234/"
        "system:serviceaccount:kube-system:replicaset-controller",
        "objectRef": {"resource": r, "namespace": "shop", "name": f"obj-{i % 500}", "apiVersion": "v1"},
        "responseStatus": {"metadata": {}, "code": 200},
        "requestReceivedTimestamp": ts.isoformat() + "Z" if ts.microsecond else ts.isoformat() + ".000000Z",
        "stageTimestamp": (ts + dt.timedelta(microseconds=1800)).isoformat() + "Z",
        "annotations": {
            "authorization.k8s.io/decision": "allow",
            "authorization.k8s.io/reason": "RBAC: allowed by ClusterRoleBinding "
            '"system:controller:replicaset-controller"',
        },
    }
    if i % 10 == 0 and r == "pods" and v in ("create", "update", "patch"):
        ev["level"] = "RequestResponse"
        ev["requestObject"] = pod
        ev["responseObject"] = pod
    out.write(json.dumps(ev, separators=(",", ":")))
    out.write("\n")
