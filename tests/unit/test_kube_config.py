"""Where the API server is: ``kube_url``, else the in-cluster address from the environment the
kubelet sets (client-go's InClusterConfig), else Fluent Bit's ``https://kubernetes.default.svc``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetrail.core.options import resolve_options
from kubetrail.kube.config import CONNECTION_OPTIONS, IN_CLUSTER_URL, connection_from_options, in_cluster_url
from tests.unit.helpers import section, write

POD_ENV = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def options(**props: Any) -> dict[str, Any]:
    return dict(resolve_options(section("input", **props), CONNECTION_OPTIONS, "kubernetes_events"))


@pytest.fixture
def token(tmp_path: Path) -> Path:
    return write(tmp_path / "sa" / "token", "a-token")


def test_in_a_pod_the_service_environment_gives_the_address(token: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in POD_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KUBERNETES_TOKEN", "never-used")  # credentials come from files only
    connection = connection_from_options(options(kube_token_file=token, kube_ca_file=token.parent / "ca.crt"))
    assert connection.url == "https://10.96.0.1:443"
    assert connection.token_file == str(token) and connection.ca_file == str(token.parent / "ca.crt")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (POD_ENV, "https://10.96.0.1:443"),
        (
            {"KUBERNETES_SERVICE_HOST": "fd00:10:96::1", "KUBERNETES_SERVICE_PORT": "6443"},
            "https://[fd00:10:96::1]:6443",
        ),
        ({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, IN_CLUSTER_URL),  # no port: not in a cluster
        ({"KUBERNETES_SERVICE_PORT": "443"}, IN_CLUSTER_URL),
        ({"KUBERNETES_SERVICE_HOST": " ", "KUBERNETES_SERVICE_PORT": "443"}, IN_CLUSTER_URL),
        ({}, IN_CLUSTER_URL),
    ],
)
def test_in_cluster_url_needs_host_and_port(token: Path, env: dict[str, str], expected: str) -> None:
    assert in_cluster_url(str(token), env) == expected


def test_without_the_token_file_the_environment_is_not_used(tmp_path: Path) -> None:
    assert in_cluster_url(str(tmp_path / "missing"), POD_ENV) == IN_CLUSTER_URL
    assert in_cluster_url(None, POD_ENV) == IN_CLUSTER_URL  # kube_token_file "" (no token)
    assert in_cluster_url(str(tmp_path), POD_ENV) == IN_CLUSTER_URL  # a directory is not a token


def test_kube_url_overrides_the_environment(token: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in POD_ENV.items():
        monkeypatch.setenv(key, value)
    connection = connection_from_options(options(kube_url="https://api.example:6443/", kube_token_file=token))
    assert connection.url == "https://api.example:6443"


def test_outside_a_pod_the_default_is_fluent_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in POD_ENV:
        monkeypatch.delenv(key, raising=False)
    assert connection_from_options(options()).url == IN_CLUSTER_URL == "https://kubernetes.default.svc"


def test_a_kubeconfig_wins_over_the_environment(tmp_path: Path, token: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in POD_ENV.items():
        monkeypatch.setenv(key, value)
    kubeconfig = write(
        tmp_path / "kubeconfig",
        "current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
        "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:6443'}}]\n"
        f"users: [{{name: u, user: {{tokenFile: {token}}}}}]\n",
    )
    connection = connection_from_options(options(kubeconfig=kubeconfig, kube_token_file=token))
    assert connection.url == "https://127.0.0.1:6443" and connection.token_file == str(token)
