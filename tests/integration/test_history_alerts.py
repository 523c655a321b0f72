"""Alerts in the timeline from a real API server: scripted actions on the shared local control
plane, its audit log (every rotated piece) about the test's namespace, ``kubetrail run`` with the
real ``tail`` -> ``kubernetes_audit`` -> ``detect`` (Falco's k8s_audit rules unchanged and the
example's local rule, examples/history/rules) -> ``sqlite`` pipeline, then ``kubetrail history``,
``who`` and ``search`` on the store: each alert right after the request that fired it. Run twice,
the store holds each alert once (identity (auditID, stage, rule)).

The shared cluster's audit policy logs most resources at Metadata (no bodies), so the actions
are those Falco's rules judge from metadata: a Deployment created, a Secret read by a service
account, a request refused (403) by a user outside Falco's allowed list; and their harmless
twins (a ConfigMap read, a request an allowed user makes) fire nothing."""

from __future__ import annotations

import gzip
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from kubetrail.cli.main import main
from tests.timing import scaled

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "cluster"))

from localcluster import KubeAPI, LocalCluster  # noqa: E402

pytestmark = pytest.mark.cluster

RULES = ROOT / "examples" / "history" / "rules"


def _ok(response: Any, what: str) -> Any:
    assert response.status < 300, (what, response.status, response.body[:300])
    return response.json()


def _audit_lines(cluster: LocalCluster, namespace: str) -> list[bytes]:
    """The audit log lines (all rotated pieces, oldest first) about ``namespace``."""
    audit = Path(cluster.audit_log_path)
    pieces = [*sorted(audit.parent.glob(audit.stem + "-*")), audit]
    out = []
    for path in pieces:
        opener: Any = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            for line in handle:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a line being written at the end of the live file
                ref = event.get("objectRef") or {}
                if ref.get("namespace") == namespace:
                    out.append(line if line.endswith(b"\n") else line + b"\n")
    return out


CONFIG = """
[SERVICE]
    log_level warn
    grace     5
[INPUT]
    name           tail
    tag            kube.audit
    path           {log}
    parser         k8s_audit
    read_from_head on
    exit_on_eof    on
[FILTER]
    name  kubernetes_audit
    match kube.audit
[FILTER]
    name       detect
    match      kube.audit
    rules_file {rules}/k8s_audit_rules.yaml
    rules_file {rules}/local.yaml
    alert_tag  kube.alert
[OUTPUT]
    name  sqlite
    match *
    path  {store}
"""


def _history(store: Path, *args: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(main, [*args, "--store", str(store), "--json"])
    assert result.exit_code == 0, result.output
    return [orjson.loads(line) for line in result.stdout.splitlines()]


def test_alerts_from_the_real_api_server_in_the_timeline(
    local_cluster: LocalCluster, admin: KubeAPI, namespace: str, tmp_path: Path
) -> None:
    ns = namespace
    apps = f"/apis/apps/v1/namespaces/{ns}/deployments"
    deployment = {
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "app", "image": "localhost/busybox:latest"}]},
            },
        },
    }
    _ok(admin.post(apps, deployment), "create deployment")
    _ok(admin.post(f"/api/v1/namespaces/{ns}/configmaps", {"metadata": {"name": "settings"}}), "configmap")
    _ok(admin.get(f"/api/v1/namespaces/{ns}/configmaps/settings"), "read configmap")  # harmless twin
    _ok(admin.post(f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "reader"}}), "sa")
    _ok(admin.post(f"/api/v1/namespaces/{ns}/secrets", {"metadata": {"name": "db"}, "stringData": {"p": "x"}}), "s")
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}"
    rule = {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["db"], "verbs": ["get"]}
    _ok(admin.post(f"{rbac}/roles", {"metadata": {"name": "read-db"}, "rules": [rule]}), "role")
    binding = {
        "metadata": {"name": "reader-reads-db"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-db"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}],
    }
    _ok(admin.post(f"{rbac}/rolebindings", binding), "rolebinding")
    token = _ok(
        admin.post(
            f"/api/v1/namespaces/{ns}/serviceaccounts/reader/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 600}},
        ),
        "token",
    )["status"]["token"]
    reader = KubeAPI(local_cluster.url, local_cluster.ca_file, token)
    _ok(reader.get(f"/api/v1/namespaces/{ns}/secrets/db"), "read the secret")
    assert local_cluster.client("norbac").delete(f"{apps}/web").status == 403
    _ok(admin.get(f"{apps}/web"), "admin reads it")  # allowed user: nothing fires

    sa = f"system:serviceaccount:{ns}:reader"
    deadline = time.monotonic() + scaled(60)  # a loaded machine: see tests/timing.py
    while True:  # the API server writes the log as it goes: wait for the last request
        lines = _audit_lines(local_cluster, ns)
        users = [(json.loads(line)["user"]["username"], json.loads(line)["verb"]) for line in lines]
        if ("norbac", "delete") in users and ("admin", "get") in users[users.index(("norbac", "delete")) :]:
            break
        assert time.monotonic() < deadline, users
        time.sleep(0.5)
    log = tmp_path / "audit.log"
    log.write_bytes(b"".join(lines))
    store = tmp_path / "store.db"
    (tmp_path / "ingest.conf").write_text(CONFIG.format(log=log, rules=RULES, store=store))
    counts = []
    for _ in range(2):  # the second run replays everything: nothing is stored twice
        done = subprocess.run(
            [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(tmp_path / "ingest.conf")],
            capture_output=True,
            text=True,
            timeout=scaled(120),
        )
        assert done.returncode == 0, done.stderr
        with sqlite3.connect(store) as conn:
            counts.append(conn.execute("SELECT kind, count(*) FROM records GROUP BY kind ORDER BY kind").fetchall())
    assert counts[0] == counts[1]

    got = _history(store, "history", f"deploy/{ns}/web")
    requests = [
        (e["kind"], e.get("user"), e.get("verb"), e.get("rule")) for e in got if e["kind"] in ("audit", "alert")
    ]
    create = requests.index(("audit", "admin", "create", None))
    assert requests[create + 1] == ("alert", "admin", "create", "K8s Deployment Created")
    refused = requests.index(("audit", "norbac", "delete", None))
    assert requests[refused + 1 : refused + 3] == [
        ("alert", "norbac", "delete", "Disallowed K8s User"),
        ("alert", "norbac", "delete", "K8s Request Forbidden"),
    ]
    read = requests.index(("audit", "admin", "get", None))
    assert all(kind == "audit" for kind, *_ in requests[read:])  # the allowed user's read: no alert
    alerts = [e for e in got if e["kind"] == "alert"]
    assert all(e["trigger_id"] is not None and e["stage"] == "ResponseComplete" for e in alerts)

    mine = _history(store, "who", sa)
    assert [(e["kind"], e["verb"], e["resource"], e["name"], e.get("rule")) for e in mine] == [
        ("audit", "get", "secrets", "db", None),
        ("alert", "get", "secrets", "db", "K8s Secret Get Successfully"),
    ]
    assert mine[1]["priority"] == "Error" and f"user={sa} secret=db ns={ns}" in mine[1]["output"]

    warnings = _history(store, "search", "--kind", "alert", "--priority", "warning", "--namespace", ns)
    assert [e["rule"] for e in warnings] == ["K8s Secret Get Successfully", "K8s Request Forbidden"]
    # (Disallowed K8s User prints no namespace: found by user, with the request it names.)
    by_user = _history(store, "search", "--rule", "Disallowed K8s User", "--user", "norbac")
    assert [(e["trigger"]["verb"], e["trigger"]["name"], e["trigger"]["namespace"]) for e in by_user] == [
        ("delete", "web", ns)
    ]
    # The harmless twins fired nothing: no alert about the ConfigMap read.
    assert _history(store, "search", "--kind", "alert", "--resource", "configmaps", "--verb", "get") == []
