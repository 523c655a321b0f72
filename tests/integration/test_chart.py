"""The Helm chart (deploy/helm/kubetrail) against the real local API server.

helm and kubectl are the ones ``scripts/local-cluster build`` makes from their Go modules. The
chart is linted, rendered, dry-run on the server, installed and uninstalled for real; every
part's ServiceAccount is asked about with SubjectAccessReviews (allowed exactly what its plugins
use, refused the rest); ``kubetrail check --in-cluster`` runs with a part's real token. Pods do
not run here (no node in this cluster): that is tests/integration/test_node*.py.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster import KubeAPI, LocalCluster
from localcluster.pki import make_ca, serving_cert, write_cert, write_key
from tests import required

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "kubetrail"
RELEASE = "kt"
WEBHOOK_SECRETS = ["--set", "audit.webhook.tlsSecret=kt-audit-tls", "--set", "audit.webhook.tokenSecret=kt-audit-token"]
ALL_PARTS = [
    "--set",
    "audit.webhook.enabled=true",
    *WEBHOOK_SECRETS,
    "--set",
    "audit.file.enabled=true",
    "--set",
    "aggregator.enabled=true",
    "--set",
    "aggregator.brokers=kafka-0.kafka:9092",
    "--set",
    "aggregator.topics={kube-logs}",
    "--set",
    "aggregator.autoscaling.enabled=true",
]
POD_ENV = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443", "NODE_NAME": "n", "POD_NAME": "p"}


@pytest.fixture(scope="module")
def helm(local_cluster: LocalCluster) -> Path:
    if local_cluster.helm is None or local_cluster.kubectl is None:
        required.unavailable("helm/kubectl were not built (scripts/local-cluster build says why)")
    return local_cluster.helm


def run_helm(cluster: LocalCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert cluster.helm is not None
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "HELM_CACHE_HOME": str(cluster.dir / "helm-cache"),
        "HELM_CONFIG_HOME": str(cluster.dir / "helm-config"),
        "HELM_DATA_HOME": str(cluster.dir / "helm-data"),
    }
    result = subprocess.run([str(cluster.helm), *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result


def render(cluster: LocalCluster, *args: str) -> list[dict[str, Any]]:
    out = run_helm(cluster, "template", RELEASE, str(CHART), *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def kubetrail_check(config_text: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    path = tmp_path / f"check-{time.monotonic_ns()}.conf"
    path.write_text(config_text)
    return subprocess.run(
        [sys.executable, "-m", "kubetrail.cli.main", "check", "-c", str(path), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **POD_ENV, **(env or {})},
        timeout=120,
    )


def server_dry_run(cluster: LocalCluster, namespace: str, manifest: Path) -> None:
    """``kubectl apply --dry-run=server``: admission and validation by the real API server,
    nothing stored; no warning about a deprecated API."""
    dry = subprocess.run(
        [
            str(cluster.kubectl),
            "--kubeconfig",
            str(cluster.kubeconfig),
            "apply",
            "--dry-run=server",
            "-n",
            namespace,
            "-f",
            str(manifest),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dry.returncode == 0, dry.stderr
    assert "deprecated" not in dry.stderr.lower(), dry.stderr


def part_configs(docs: list[dict[str, Any]]) -> dict[str, str]:
    """Config text by ConfigMap name and key (the parts' and the check hook's)."""
    return {
        f"{doc['metadata']['name']}/{key}": text
        for doc in docs
        if doc["kind"] == "ConfigMap"
        for key, text in doc["data"].items()
    }


def test_lint_strict_with_defaults_and_with_every_part(local_cluster: LocalCluster, helm: Path) -> None:
    for args in ([], ALL_PARTS, ["--set", "events.namespaces={a,b}", "--set", "events.api=events.k8s.io/v1"]):
        result = run_helm(local_cluster, "lint", "--strict", str(CHART), *args)
        assert "0 chart(s) failed" in result.stdout


def test_every_object_has_the_standard_labels(local_cluster: LocalCluster, helm: Path) -> None:
    docs = render(local_cluster, *ALL_PARTS)
    kinds = sorted({doc["kind"] for doc in docs})
    assert {"DaemonSet", "Deployment", "Service", "ConfigMap", "ServiceAccount", "ClusterRole", "Role"} <= set(kinds)
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(kinds)
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kubetrail", doc["metadata"]["name"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/component"], doc["metadata"]["name"]


def test_rendered_configs_are_valid_and_a_broken_one_is_named(
    local_cluster: LocalCluster, helm: Path, tmp_path: Path
) -> None:
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    ca = make_ca()
    pair = serving_cert(ca, "kt-kubetrail-audit-webhook")
    write_cert(tls_dir / "tls.crt", pair.cert)
    write_key(tls_dir / "tls.key", pair.key)
    (tls_dir / "token").write_text("s3cret\n")
    configs = part_configs(render(local_cluster, *ALL_PARTS))
    assert len(configs) == 10  # five parts, and the same five in the check hook's ConfigMap
    for name, text in configs.items():
        # where the Secrets are mounted in the pods
        text = text.replace("/etc/kubetrail/tls", str(tls_dir)).replace("/etc/kubetrail/token", str(tls_dir))
        result = kubetrail_check(text, tmp_path)
        assert result.returncode == 0, f"{name}: {result.stderr}"
    # A user's output section with a typo: the pre-install hook's config fails kubetrail check
    # with the key named (in a cluster with a node, helm install then stops there).
    broken = render(local_cluster, "--set-string", "config.outputs=[OUTPUT]\n    name stdout\n    match *\n    formt x")
    hook = part_configs(broken)["kt-kubetrail-config-check/events.conf"]
    result = kubetrail_check(hook, tmp_path)
    assert result.returncode == 2
    assert "'formt': unknown property for output plugin 'stdout'" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "events.replicas=two"], "/events/replicas"),
        (["--set", "logs.enabld=true"], "additional properties 'enabld' not allowed"),
        (["--set", "metrics.enabled=true"], "additional properties 'enabled' not allowed"),
        (["--set", "audit.webhook.enabled=true"], "audit.webhook.tlsSecret"),
        (["--set", "audit.webhook.enabled=true", "--set", "audit.webhook.tlsSecret=x"], "clientCASecret"),
        (["--set", "events.api=v2"], "/events/api"),
        (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (["--set", "audit.file.enabled=true", "--set", "audit.file.webhook.enabled=true"], "audit.webhook.tlsSecret"),
        (["--set", "audit.file.webhook.port=http"], "/audit/file/webhook/port"),
        ([*ALL_PARTS, "--set", "audit.file.webhook.enabled=true"], "the API server posts to one receiver"),
    ],
)
def test_bad_values_fail_with_the_value_named(
    local_cluster: LocalCluster, helm: Path, args: list[str], message: str
) -> None:
    result = run_helm(local_cluster, "template", RELEASE, str(CHART), *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


COMBINED_AUDIT = [
    *WEBHOOK_SECRETS,
    "--set",
    "audit.file.enabled=true",
    "--set",
    "audit.file.webhook.enabled=true",
    "--set",
    "audit.file.webhook.port=9443",
]


def test_audit_file_part_with_the_webhook_runs_both_into_one_filter(
    local_cluster: LocalCluster, helm: Path, tmp_path: Path
) -> None:
    docs = render(local_cluster, *COMBINED_AUDIT)
    assert not [d for d in docs if "audit-webhook" in d["metadata"]["name"]]  # no separate receiver
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet" and d["metadata"]["name"].endswith("audit-file")]
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["securityContext"]["fsGroup"] == 65532
    container = pod["containers"][0]
    assert {"name": "audit", "containerPort": 9443, "protocol": "TCP"} in container["ports"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/etc/kubetrail/tls", "/etc/kubetrail/token", "/var/log/kubernetes/audit"} <= mounts
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"kt-audit-tls", "kt-audit-token"}
    (hook,) = [d for d in docs if d["kind"] == "Job"]
    (check,) = [c for c in hook["spec"]["template"]["spec"]["containers"] if c["name"] == "audit-file"]
    assert "/etc/kubetrail/tls" in {m["mountPath"] for m in check["volumeMounts"]}

    configs = part_configs(docs)
    text = configs["kt-kubetrail-audit-file/kubetrail.conf"]
    assert text == configs["kt-kubetrail-config-check/audit-file.conf"]
    assert text.count("[FILTER]") == 1 and "match kube.audit.*" in text
    assert "tag               kube.audit.webhook" in text and "tag          kube.audit.file" in text
    assert "db    /var/lib/kubetrail/state/audit-keys.db" in text
    ca = make_ca()
    pair = serving_cert(ca, "kt-kubetrail-audit-webhook")
    write_cert(tmp_path / "tls.crt", pair.cert)
    write_key(tmp_path / "tls.key", pair.key)
    (tmp_path / "token").write_text("s3cret\n")
    text = text.replace("/etc/kubetrail/tls", str(tmp_path)).replace("/etc/kubetrail/token", str(tmp_path))
    result = kubetrail_check(text, tmp_path)
    assert result.returncode == 0, result.stderr
    # A user's own filter db wins over the chart's.
    own = render(local_cluster, *COMBINED_AUDIT, "--set", "audit.file.filter.db=/var/lib/kubetrail/state/mine.db")
    text = part_configs(own)["kt-kubetrail-audit-file/kubetrail.conf"]
    assert "audit-keys.db" not in text and text.count("mine.db") == 1


def _secrets(admin: KubeAPI, namespace: str, tmp_path: Path) -> None:
    ca = make_ca()
    pair = serving_cert(ca, "kt-kubetrail-audit-webhook")
    write_cert(tmp_path / "tls.crt", pair.cert)
    write_key(tmp_path / "tls.key", pair.key)
    data = {k: base64.b64encode((tmp_path / k).read_bytes()).decode() for k in ("tls.crt", "tls.key")}
    for name, kind, payload in (
        ("kt-audit-tls", "kubernetes.io/tls", data),
        ("kt-audit-token", "Opaque", {"token": base64.b64encode(b"s3cret-token\n").decode()}),
    ):
        body = {"metadata": {"name": name}, "type": kind, "data": payload}
        resp = admin.post(f"/api/v1/namespaces/{namespace}/secrets", body)
        assert resp.status == 201, resp


def _allowed(admin: KubeAPI, sa_namespace: str, sa: str, verb: str, resource: str, **attrs: str) -> bool:
    user = f"system:serviceaccount:{sa_namespace}:{sa}"
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{sa_namespace}", "system:authenticated"]
    body = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": groups, "resourceAttributes": {"verb": verb, "resource": resource, **attrs}},
    }
    resp = admin.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", body)
    assert resp.status == 201, resp
    return bool(resp.json()["status"].get("allowed"))


def test_install_on_the_real_api_server_grants_exactly_what_each_part_uses(
    local_cluster: LocalCluster, helm: Path, admin: KubeAPI, namespace: str, tmp_path: Path
) -> None:
    _secrets(admin, namespace, tmp_path)
    # No node runs pods in this cluster, so the pre-install check Job could never finish here.
    args = [*ALL_PARTS, "--set", "configCheck.enabled=false", "-n", namespace]
    manifest = tmp_path / "rendered.yaml"
    # Without the helm test pods: the server refuses a pod whose ServiceAccount does not exist yet.
    manifest.write_text(run_helm(local_cluster, "template", RELEASE, str(CHART), "--skip-tests", *args).stdout)
    server_dry_run(local_cluster, namespace, manifest)
    result = run_helm(local_cluster, "install", RELEASE, str(CHART), *args)
    assert "deprecated" not in result.stderr.lower(), result.stderr
    assert "helm test kt" in result.stdout  # NOTES.txt
    assert "--audit-webhook-config-file" in result.stdout

    selector = f"app.kubernetes.io/instance={RELEASE}"
    for path in (
        "apis/apps/v1/namespaces/{ns}/daemonsets",
        "apis/apps/v1/namespaces/{ns}/deployments",
        "api/v1/namespaces/{ns}/services",
        "api/v1/namespaces/{ns}/serviceaccounts",
    ):
        items = admin.get("/" + path.format(ns=namespace), labelSelector=selector).json()["items"]
        assert items, path
    sa = "kt-kubetrail-{}".format
    allowed = lambda part, verb, resource, **a: _allowed(admin, namespace, sa(part), verb, resource, **a)  # noqa: E731
    lease = {"group": "coordination.k8s.io", "namespace": namespace}
    # logs: the kubernetes filter's pod list + watch, nothing else.
    assert allowed("logs", "list", "pods") and allowed("logs", "watch", "pods")
    for verb, resource, extra in [
        ("get", "pods", {}),
        ("list", "secrets", {}),
        ("get", "secrets", {}),
        ("create", "pods", {"subresource": "exec"}),
        ("list", "namespaces", {}),
        ("list", "events", {}),
        ("delete", "pods", {}),
    ]:
        assert not allowed("logs", verb, resource, **extra), (verb, resource, extra)
    # events: list + watch Events everywhere; create a Lease and read/renew only its own.
    assert allowed("events", "list", "events") and allowed("events", "watch", "events")
    assert allowed("events", "create", "leases", **lease)
    assert allowed("events", "get", "leases", name="kt-kubetrail-events", **lease)
    assert allowed("events", "update", "leases", name="kt-kubetrail-events", **lease)
    for verb, resource, extra in [
        ("update", "leases", {**lease, "name": "kube-scheduler"}),
        ("get", "leases", {**lease, "name": "other"}),
        ("delete", "leases", {**lease, "name": "kt-kubetrail-events"}),
        ("create", "leases", {"group": "coordination.k8s.io", "namespace": "kube-system"}),
        ("create", "events", {}),
        ("get", "events", {}),
        ("list", "secrets", {}),
        ("list", "pods", {}),
        ("create", "pods", {"subresource": "exec"}),
    ]:
        assert not allowed("events", verb, resource, **extra), (verb, resource, extra)
    # The audit parts and the Kafka aggregator call no API at all.
    for part in ("audit-webhook", "audit-file", "aggregator"):
        for verb, resource in [("list", "events"), ("get", "secrets"), ("list", "pods"), ("create", "leases")]:
            assert not allowed(part, verb, resource), (part, verb, resource)

    # kubetrail check --in-cluster with the events part's real token and rendered config.
    token = admin.post(
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa('events')}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 600}},
    ).json()["status"]["token"]
    (tmp_path / "token").write_text(token)
    configs = part_configs(yaml.safe_load_all(manifest.read_text()))
    events_conf = configs["kt-kubetrail-events/kubetrail.conf"]
    events_conf = events_conf.replace(
        "    kube_api ",
        f"    kube_ca_file {local_cluster.ca_file}\n    kube_token_file {tmp_path / 'token'}\n    kube_api ",
    )
    port = local_cluster.url.rsplit(":", 1)[1]
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
    result = kubetrail_check(events_conf, tmp_path, "--in-cluster", "--checks=api", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"as system:serviceaccount:{namespace}:{sa('events')}" in result.stdout
    assert "ok    events rbac: update coordination.k8s.io/leases kt-kubetrail-events" in result.stdout
    # The same check as the logs part's account: refused, with the rule to add.
    token = admin.post(
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa('logs')}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 600}},
    ).json()["status"]["token"]
    (tmp_path / "token").write_text(token)
    result = kubetrail_check(events_conf, tmp_path, "--in-cluster", "--checks=api", env=env)
    assert result.returncode == 1
    assert 'add {apiGroups: [""], resources: ["events"], verbs: ["list"]} to a ClusterRole' in result.stdout

    run_helm(local_cluster, "uninstall", RELEASE, "-n", namespace, "--wait")
    for path in (
        "apis/apps/v1/namespaces/{ns}/daemonsets",
        "apis/apps/v1/namespaces/{ns}/deployments",
        "api/v1/namespaces/{ns}/services",
        "api/v1/namespaces/{ns}/configmaps",
        "api/v1/namespaces/{ns}/serviceaccounts",
        "apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
        "apis/rbac.authorization.k8s.io/v1/clusterroles",
        "apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
    ):
        items = admin.get("/" + path.format(ns=namespace), labelSelector=selector).json()["items"]
        left = [i["metadata"]["name"] for i in items if namespace in i["metadata"]["name"] + str(i["metadata"])]
        assert left == [], path


def test_install_with_a_missing_secret_fails_naming_it(local_cluster: LocalCluster, helm: Path, namespace: str) -> None:
    args = [
        "--set",
        "audit.webhook.enabled=true",
        "--set",
        "audit.webhook.tlsSecret=nope",
        "--set",
        "audit.webhook.tokenSecret=nope-too",
        "--set",
        "configCheck.enabled=false",
        "-n",
        namespace,
    ]
    result = run_helm(local_cluster, "install", "kt-missing", str(CHART), *args, check=False)
    assert result.returncode != 0
    assert f'audit.webhook.tlsSecret: Secret "nope" not found in namespace "{namespace}"' in result.stderr


def test_sidecar_example_is_valid_for_kubetrail_and_the_api_server(
    local_cluster: LocalCluster, helm: Path, namespace: str, tmp_path: Path
) -> None:
    manifest = ROOT / "deploy" / "examples" / "sidecar.yaml"
    docs = [doc for doc in yaml.safe_load_all(manifest.read_text()) if doc]
    config = next(doc for doc in docs if doc["kind"] == "ConfigMap")["data"]["kubetrail.conf"]
    result = kubetrail_check(config, tmp_path, env={"POD_NAMESPACE": "ns"})
    assert result.returncode == 0, result.stderr
    pod = next(doc for doc in docs if doc["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False  # no cluster access at all
    assert all("hostPath" not in volume for volume in pod["volumes"])
    server_dry_run(local_cluster, namespace, manifest)
