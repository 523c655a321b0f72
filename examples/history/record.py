"""Re-records the example dataset in examples/history/data from the real local control plane.

Run it as ``scripts/record-example`` (root, for the node; Go or cached control-plane binaries).
It starts a fresh control plane with controllers (and one real node when it can: containerd +
kubelet, ``--nodes 1``; without it the pods are never scheduled and there are no pods' logs),
runs kubetrail itself to collect the Events (``kubernetes_events``) and, with the node, the
pods' logs (``tail`` + ``cri`` + the ``kubernetes`` filter) into JSON lines, plays the story,
and keeps the API server's audit log lines about the story's namespace as they were written:

1. admin creates namespace ``shop`` and Deployment ``shop/web`` (1 replica);
2. admin scales it to 3 (the ``scale`` subresource);
3. admin changes its image to ``localhost/busybox:1.37``, which the node does not have
   (``ErrImageNeverPull`` warnings), then back to ``localhost/busybox:latest``;
4. admin deletes one of its pods (the ReplicaSet makes a new one);
5. the service account ``shop/reader`` gets a token and reads Secret ``shop/db-credentials``;
6. user ``norbac`` tries to delete the Deployment: 403.

The API server runs with the audit policy below (bodies of Deployment and Pod writes, metadata
only for Secrets), so ``kubetrail history deploy/shop/web`` can say what each write changed.

The alerts are not recorded: ``ingest.conf`` runs the ``detect`` filter (Falco's rules in
``rules/``) on the recorded audit log, so they are always what those rules say about it, and a
change of rules needs no re-recording. Steps 5 and 6 fire ``K8s Secret Get Successfully``,
``Disallowed K8s User`` and the example's ``K8s Request Forbidden``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "cluster"))

from localcluster import BuildError, ClusterError, KubeAPI, LocalCluster  # noqa: E402

NS = "shop"
POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: None
    nonResourceURLs: ["/healthz*", "/livez*", "/readyz*", "/version", "/version/", "/openapi*", "/api*"]
  - level: None
    resources: [{group: "coordination.k8s.io", resources: ["leases"]}]
  - level: None
    verbs: ["get", "list", "watch"]
    userGroups: ["system:nodes"]
  - level: None
    verbs: ["list", "watch"]
  - level: Metadata
    resources:
      - {group: "", resources: ["secrets", "configmaps", "serviceaccounts/token"]}
      - {group: "authentication.k8s.io", resources: ["tokenreviews"]}
      - {group: "authorization.k8s.io", resources: ["subjectaccessreviews"]}
  - level: RequestResponse
    verbs: ["create", "update", "patch", "delete"]
    resources:
      - {group: "apps", resources: ["deployments", "deployments/scale"]}
      - {group: "", resources: ["pods"]}
  - level: Metadata
"""

COLLECT = """
[SERVICE]
    log_level warn
    grace     10
[INPUT]
    name            kubernetes_events
    tag             kube.events
    kube_url        {url}
    kube_ca_file    {ca}
    kube_token_file {token}
    db              {work}/events.db
[OUTPUT]
    name   file
    match  kube.events
    path   {work}
    file   events.jsonl
    format plain
{logs}
"""

COLLECT_LOGS = """
[INPUT]
    name             tail
    tag              kube.logs.*
    path             /var/log/containers/*_shop_*.log
    multiline.parser cri
    read_from_head   on
    refresh_interval 1
    db               {work}/logs.db
[FILTER]
    name            kubernetes
    match           kube.logs.*
    kube_tag_prefix kube.logs.var.log.containers.
    kube_url        {url}
    kube_ca_file    {ca}
    kube_token_file {token}
    labels          on
    annotations     off
[OUTPUT]
    name   file
    match  kube.logs.*
    path   {work}
    file   logs.jsonl
    format plain
"""

SCRIPT = 'i=0; while true; do i=$((i+1)); echo "web $HOSTNAME: served request $i"; sleep 3; done'


def deployment(image: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": NS, "labels": {"app": "web"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [
                        {
                            "name": "app",
                            "image": image,
                            "imagePullPolicy": "Never",
                            "command": ["sh", "-c", f"trap 'exit 0' TERM; {SCRIPT}"],
                        }
                    ],
                },
            },
        },
    }


def ok(response: Any, what: str) -> Any:
    if response.status >= 300:
        raise SystemExit(f"record: {what} failed: {response.status} {response.body[:500]!r}")
    return response.json()


def patch(api: KubeAPI, path: str, body: Any) -> Any:
    return api.request("PATCH", path, body, content_type="application/strategic-merge-patch+json")


def story(cluster: LocalCluster, with_node: bool) -> None:
    admin = cluster.client("admin")
    image = cluster.node.busybox_image if with_node and cluster.node is not None else "localhost/busybox:latest"
    apps = f"/apis/apps/v1/namespaces/{NS}/deployments"
    ok(admin.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}), "ns")
    time.sleep(1)
    ok(admin.post(apps, deployment(image)), "create deployment")
    time.sleep(12)
    scale = ok(admin.get(f"{apps}/web/scale"), "get scale")
    scale["spec"]["replicas"] = 3
    ok(admin.put(f"{apps}/web/scale", scale), "scale")
    time.sleep(12)
    missing = {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "localhost/busybox:1.37"}]}}}}
    ok(patch(admin, f"{apps}/web", missing), "set a missing image")
    time.sleep(15)
    back = {"spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}}}
    ok(patch(admin, f"{apps}/web", back), "image back")
    time.sleep(12)
    pods = ok(admin.get(f"/api/v1/namespaces/{NS}/pods", labelSelector="app=web"), "list pods")["items"]
    running = sorted(p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp"))
    if running:
        ok(admin.delete(f"/api/v1/namespaces/{NS}/pods/{running[0]}"), "delete a pod")
    time.sleep(8)
    # A service account that may read one Secret, and does.
    ok(admin.post(f"/api/v1/namespaces/{NS}/serviceaccounts", {"metadata": {"name": "reader"}}), "sa")
    secret = {"metadata": {"name": "db-credentials"}, "stringData": {"password": "not-a-real-password"}}
    ok(admin.post(f"/api/v1/namespaces/{NS}/secrets", secret), "secret")
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}"
    role = {
        "metadata": {"name": "read-db-credentials"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["db-credentials"], "verbs": ["get"]}],
    }
    ok(admin.post(f"{rbac}/roles", role), "role")
    binding = {
        "metadata": {"name": "reader-reads-db-credentials"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-db-credentials"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": NS}],
    }
    ok(admin.post(f"{rbac}/rolebindings", binding), "rolebinding")
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 600}}
    token = ok(admin.post(f"/api/v1/namespaces/{NS}/serviceaccounts/reader/token", request), "token")["status"]["token"]
    reader = KubeAPI(cluster.url, cluster.ca_file, token)
    ok(reader.get(f"/api/v1/namespaces/{NS}/secrets/db-credentials"), "read the secret")
    time.sleep(2)
    # Someone without rights tries to delete the Deployment.
    denied = cluster.client("norbac").delete(f"{apps}/web")
    if denied.status != 403:
        raise SystemExit(f"record: expected 403 for norbac, got {denied.status}")
    time.sleep(8)


def keep_audit(source: Path, target: Path, since: str) -> int:
    """The audit lines about the story's namespace, as the API server wrote them."""
    kept = 0
    with source.open("rb") as lines, target.open("wb") as out:
        for line in lines:
            event = json.loads(line)
            ref = event.get("objectRef") or {}
            ours = ref.get("namespace") == NS or (ref.get("resource") == "namespaces" and ref.get("name") == NS)
            if ours and event.get("stageTimestamp", "") >= since:
                out.write(line)
                kept += 1
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1, choices=(0, 1), help="1: try a real node (root), 0: none")
    parser.add_argument("--out", type=Path, default=HERE / "data")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubetrail-record-"))
    policy = work / "policy.yaml"
    policy.write_text(POLICY)
    options: dict[str, Any] = {
        "controllers": True,
        "event_ttl": "1h",
        "apiserver_extra_args": [f"--audit-policy-file={policy}"],
    }
    cluster = None
    with_node = args.nodes == 1 and os.geteuid() == 0
    for nodes in [1, 0] if with_node else [0]:
        try:
            cluster = LocalCluster.up(work / "cluster", nodes=nodes, **options)
            with_node = nodes == 1
            break
        except (BuildError, ClusterError) as exc:
            print(f"record: cluster with {nodes} node(s) did not start: {str(exc)[-1500:]}", file=sys.stderr)
            shutil.rmtree(work / "cluster", ignore_errors=True)
    if cluster is None:
        return 1
    try:
        config = COLLECT.format(
            url=cluster.url,
            ca=cluster.ca_file,
            token=cluster.collector_token_file,
            work=work,
            logs=COLLECT_LOGS.format(url=cluster.url, ca=cluster.ca_file, token=cluster.collector_token_file, work=work)
            if with_node
            else "",
        )
        (work / "collect.conf").write_text(config)
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        collector = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "kubetrail"), "run", "-c", str(work / "collect.conf")], cwd=work
        )
        time.sleep(3)
        story(cluster, with_node)
        collector.send_signal(signal.SIGTERM)
        if collector.wait(timeout=60) != 0:
            raise SystemExit("record: kubetrail (collecting) failed")
        args.out.mkdir(parents=True, exist_ok=True)
        audit = keep_audit(Path(cluster.audit_log_path), args.out / "audit.log", since)
        shutil.copyfile(work / "events.jsonl", args.out / "events.jsonl")
        logs = args.out / "logs.jsonl"
        if with_node and (work / "logs.jsonl").exists():
            shutil.copyfile(work / "logs.jsonl", logs)
        else:
            logs.write_bytes(b"")
        events = sum(1 for _ in (args.out / "events.jsonl").open("rb"))
        lines = sum(1 for _ in logs.open("rb"))
        print(f"record: {audit} audit records, {events} Events, {lines} log lines in {args.out} (node: {with_node})")
    finally:
        cluster.down()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
