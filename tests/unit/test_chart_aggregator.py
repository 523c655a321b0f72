"""The chart's ``aggregator`` part rendered by the real helm (the one ``scripts/local-cluster
build`` makes; skipped without it): the Deployment, its HPA and PDB, no API token, and the
rendered configs of deploy/examples/kafka-aggregator-values.yaml accepted by ``kubetrail check``.
The install on a real API server is tests/integration/test_chart.py's part."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import required
from tests.servers import cache_root

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "kubetrail"
EXAMPLE = ROOT / "deploy" / "examples" / "kafka-aggregator-values.yaml"


@pytest.fixture(scope="module")
def helm() -> Path:
    found = sorted((cache_root() / "control-plane").glob("helm-*/helm"))
    if not found:
        required.unavailable("helm was not built (scripts/local-cluster build)")
    return found[-1]


def render(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), "template", "t", str(CHART), "-n", "obs", *args], capture_output=True, text=True, timeout=120
    )


def objects(text: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text) if d}


def test_example_values_render_a_checked_aggregator(helm: Path, tmp_path: Path) -> None:
    proc = render(helm, "-f", str(EXAMPLE))
    assert proc.returncode == 0, proc.stderr
    docs = objects(proc.stdout)
    deployment = docs[("Deployment", "t-kubetrail-aggregator")]
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    hpa = docs[("HorizontalPodAutoscaler", "t-kubetrail-aggregator")]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["scaleTargetRef"]["name"] == "t-kubetrail-aggregator"
    assert docs[("PodDisruptionBudget", "t-kubetrail-aggregator")]["spec"]["minAvailable"] == 1
    assert docs[("ServiceAccount", "t-kubetrail-aggregator")]["automountServiceAccountToken"] is False
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["cpu"] == "500m"
    for part in ("aggregator", "logs"):
        config = docs[("ConfigMap", f"t-kubetrail-{part}")]["data"]["kubetrail.conf"]
        path = tmp_path / f"{part}.conf"
        path.write_text(config)
        env = {"POD_NAME": "p-0", "NODE_NAME": "n", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
        check = subprocess.run(
            [sys.executable, "-m", "kubetrail.cli.main", "check", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, "KUBERNETES_SERVICE_PORT": "443", "PATH": "/usr/bin:/bin"},
        )
        assert check.returncode == 0, check.stderr
    aggregator = docs[("ConfigMap", "t-kubetrail-aggregator")]["data"]["kubetrail.conf"]
    assert "    name         kafka" in aggregator and "rdkafka.session.timeout.ms 10000" in aggregator
    assert "group_id     kubetrail-aggregator" in aggregator
    assert "nested_under payload" in aggregator


def test_fixed_replicas_without_autoscaling(helm: Path) -> None:
    proc = render(
        helm, "--set", "aggregator.enabled=true", "--set", "aggregator.brokers=k:9092", "--set", "aggregator.topics={a}"
    )
    assert proc.returncode == 0, proc.stderr
    docs = objects(proc.stdout)
    assert docs[("Deployment", "t-kubetrail-aggregator")]["spec"]["replicas"] == 2
    assert not [key for key in docs if key[0] == "HorizontalPodAutoscaler"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "aggregator.enabled=true", "--set", "aggregator.topics={a}"], "aggregator.brokers is required"),
        (["--set", "aggregator.enabled=true", "--set", "aggregator.brokers=k:9092"], "aggregator.topics is required"),
        (["--set", "aggregator.format=xml"], "/aggregator/format"),
        (["--set", "aggregator.autoscaling.maxReplica=3"], "additional properties 'maxReplica' not allowed"),
    ],
)
def test_bad_values_are_refused_at_render(helm: Path, args: list[str], message: str) -> None:
    proc = render(helm, *args)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
