"""The chart's ``credentialSecrets``: outputs' credentials mounted from Secrets as files and named
in the config by path (``${file:/etc/kubetrail/secrets/<name>/<key>}``), never environment
variables. Rendered by the real helm (the one ``scripts/local-cluster build`` makes; skipped
without it); the install on a real API server is tests/integration/test_chart_secrets.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit import test_chart_aggregator
from tests.unit.test_chart_aggregator import render
from tests.unit.test_secrets import secret_volume

OUTPUTS = """[OUTPUT]
    name es
    match *
    host es.example
    http_user ${file:/etc/kubetrail/secrets/es/username}
    http_passwd ${file:/etc/kubetrail/secrets/es/password}
[OUTPUT]
    name kafka
    match *
    brokers kafka:9092
    rdkafka.security.protocol SASL_SSL
    rdkafka.sasl.mechanisms SCRAM-SHA-512
    rdkafka.sasl.username ${file:/etc/kubetrail/secrets/kafka/username}
    rdkafka.sasl.password ${file:/etc/kubetrail/secrets/kafka/password}
"""
SECRETS = [
    "--set",
    "credentialSecrets[0].name=es",
    "--set",
    "credentialSecrets[0].secretName=es-writer",
    "--set",
    "credentialSecrets[1].name=kafka",
]
EVERY_PART = [
    "--set",
    "audit.webhook.enabled=true",
    "--set",
    "audit.webhook.tlsSecret=tls",
    "--set",
    "audit.webhook.tokenSecret=token",
    "--set",
    "audit.file.enabled=true",
    "--set",
    "aggregator.enabled=true",
    "--set",
    "aggregator.brokers=kafka:9092",
    "--set",
    "aggregator.topics={logs}",
]


# test_chart_aggregator's fixture (the built helm, or skip), bound rather than imported so that the
# tests' ``helm`` parameters do not read as redefinitions of an unused import.
helm = test_chart_aggregator.helm


def pod_specs(text: str) -> dict[str, dict[str, Any]]:
    """Every pod spec rendered (workloads, the check hook's Job, the helm test pods) by object name."""
    specs = {}
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        if doc["kind"] == "Pod":
            specs[doc["metadata"]["name"]] = doc["spec"]
        elif doc["kind"] in ("Deployment", "DaemonSet", "Job"):
            specs[doc["metadata"]["name"]] = doc["spec"]["template"]["spec"]
    return specs


def test_every_pod_mounts_each_secret_read_only_and_no_env_holds_one(helm: Path, tmp_path: Path) -> None:
    outputs = tmp_path / "outputs.conf"
    outputs.write_text(OUTPUTS)
    result = render(helm, *SECRETS, *EVERY_PART, "--set-file", f"config.outputs={outputs}")
    assert result.returncode == 0, result.stderr
    specs = pod_specs(result.stdout)
    assert len(specs) >= 11  # 5 parts, the config check hook, 5 helm test pods
    for name, spec in specs.items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["credentials-es"]["secret"] == {"secretName": "es-writer", "defaultMode": 0o440}, name
        assert volumes["credentials-kafka"]["secret"] == {"secretName": "kafka", "defaultMode": 0o440}, name
        assert spec["securityContext"]["fsGroup"] == 65532, name  # 0440: group-readable by the non-root user
        for container in spec["containers"]:
            mounts = {m["name"]: m for m in container["volumeMounts"]}
            assert mounts["credentials-es"] == {
                "name": "credentials-es",
                "mountPath": "/etc/kubetrail/secrets/es",
                "readOnly": True,
            }, name
            assert mounts["credentials-kafka"]["mountPath"] == "/etc/kubetrail/secrets/kafka", name
            for env in container.get("env", []):
                assert "secretKeyRef" not in str(env.get("valueFrom", "")), (name, env)
    configs = [
        text
        for doc in yaml.safe_load_all(result.stdout)
        if doc and doc["kind"] == "ConfigMap"
        for text in doc["data"].values()
    ]
    assert any("http_passwd ${file:/etc/kubetrail/secrets/es/password}" in text for text in configs)


def test_without_credential_secrets_nothing_changes(helm: Path) -> None:
    result = render(helm)
    assert result.returncode == 0, result.stderr
    assert "credentials-" not in result.stdout and "/etc/kubetrail/secrets" not in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "credentialSecrets[0].name=ES"], "at '/credentialSecrets/0/name': 'ES' does not match pattern"),
        (
            ["--set", "credentialSecrets[0].name=es", "--set", "credentialSecrets[0].key=password"],
            "additional properties 'key' not allowed",
        ),
        (["--set", "credentialSecrets[0].secretName=x"], "missing property 'name'"),
        (
            ["--set", "credentialSecrets[0].name=es", "--set", "credentialSecrets[1].name=es"],
            'credentialSecrets[1].name: "es" is used twice',
        ),
    ],
)
def test_bad_values_fail_naming_the_value(helm: Path, args: list[str], message: str) -> None:
    result = render(helm, *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_a_config_naming_a_secret_that_is_not_mounted_fails(helm: Path, tmp_path: Path) -> None:
    outputs = tmp_path / "outputs.conf"
    outputs.write_text(OUTPUTS)
    result = render(helm, "--set", "credentialSecrets[0].name=es", "--set-file", f"config.outputs={outputs}")
    assert result.returncode != 0
    assert (
        'the config names ${file:/etc/kubetrail/secrets/kafka/...}, but credentialSecrets has no entry named "kafka"'
        in result.stderr
    ), result.stderr


def test_credentials_example_renders_configs_that_kubetrail_checks(helm: Path, tmp_path: Path) -> None:
    """deploy/examples/credentials-values.yaml: every part's config, with the Secrets' keys laid out
    as the kubelet mounts them (here under tmp_path instead of /etc/kubetrail/secrets), passes
    ``kubetrail check``, which reads each ${file:...}; a key missing from a Secret fails it."""
    example = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "credentials-values.yaml"
    result = render(helm, "-f", str(example))
    assert result.returncode == 0, result.stderr
    mounted = tmp_path / "secrets"
    for name in ("es", "kafka"):
        secret_volume(mounted / name, {"username": f"{name}-user", "password": f"{name}-pw\n"})
    configs = {
        doc["metadata"]["name"]: doc["data"]["kubetrail.conf"]
        for doc in yaml.safe_load_all(result.stdout)
        if doc and doc["kind"] == "ConfigMap" and "kubetrail.conf" in doc.get("data", {})
    }
    assert {"t-kubetrail-logs", "t-kubetrail-events", "t-kubetrail-aggregator"} <= set(configs)
    assert "rdkafka.sasl.password ${file:/etc/kubetrail/secrets/kafka/password}" in configs["t-kubetrail-aggregator"]
    env = {"POD_NAME": "p-0", "NODE_NAME": "n", "KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}

    def check(name: str, text: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / f"{name}.conf"
        path.write_text(text.replace("/etc/kubetrail/secrets/", f"{mounted}/"))
        return subprocess.run(
            [sys.executable, "-m", "kubetrail.cli.main", "check", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, "PATH": "/usr/bin:/bin"},
        )

    for name, text in configs.items():
        result = check(name, text)
        assert result.returncode == 0, (name, result.stderr)
        assert "es-pw" not in result.stdout and "kafka-pw" not in result.stdout
    (mounted / "kafka" / "password").unlink()
    broken = check("broken", configs["t-kubetrail-aggregator"])
    assert broken.returncode == 2
    assert f"'rdkafka.sasl.password': credential file: cannot read {mounted}/kafka/password" in broken.stderr
