"""Where the API server is and how to talk to it.

Three ways, in order of precedence: a ``kubeconfig`` file (running outside a cluster), the
explicit Fluent Bit options (``kube_url``, ``kube_ca_file``, ``kube_ca_path``,
``kube_token_file``), whose defaults are the in-cluster service account files. A kubeconfig's
inline credentials are written to files under a private temp dir so that every credential is
handled the same way: as a file that may rotate.

Without ``kube_url`` the address is the in-cluster one, found as every Kubernetes client finds
it (client-go's ``InClusterConfig``): ``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT``
(an IPv6 host in brackets), which the kubelet sets in every pod, when both are set and the token
file exists; that needs no cluster DNS (hostNetwork pods, DNS not up yet). Otherwise
``https://kubernetes.default.svc``, Fluent Bit's default. ``kube_url`` always wins. Credentials
never come from the environment: the token and CA stay files, re-read when they rotate.
"""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option

IN_CLUSTER_URL = "https://kubernetes.default.svc"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class KubeConfigError(Exception):
    """The connection settings are unusable (missing file, bad kubeconfig)."""


@dataclass
class ConnectionConfig:
    url: str = IN_CLUSTER_URL
    ca_file: str | None = f"{SA_DIR}/ca.crt"
    ca_path: str | None = None
    token_file: str | None = f"{SA_DIR}/token"
    token_ttl: float = 600.0
    tls_verify: bool = True
    tls_vhost: str | None = None
    tls_debug: int = 0
    client_cert_file: str | None = None
    client_key_file: str | None = None

    @classmethod
    def from_kubeconfig(cls, path: str, context: str | None = None, token_ttl: float = 600.0) -> ConnectionConfig:
        try:
            doc: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise KubeConfigError(f"cannot read kubeconfig {path}: {exc}") from None
        base = Path(path).resolve().parent
        name = context or doc.get("current-context")
        contexts = {c.get("name"): c.get("context", {}) for c in doc.get("contexts") or []}
        if name not in contexts:
            raise KubeConfigError(f"kubeconfig {path}: context {name!r} not found")
        ctx = contexts[name]
        clusters = {c.get("name"): c.get("cluster", {}) for c in doc.get("clusters") or []}
        users = {u.get("name"): u.get("user", {}) for u in doc.get("users") or []}
        cluster = clusters.get(ctx.get("cluster"))
        if not cluster or not cluster.get("server"):
            raise KubeConfigError(f"kubeconfig {path}: cluster {ctx.get('cluster')!r} has no server")
        user = users.get(ctx.get("user"), {})
        config = cls(url=cluster["server"].rstrip("/"), ca_file=None, token_file=None, token_ttl=token_ttl)
        config.tls_verify = not cluster.get("insecure-skip-tls-verify", False)
        config.tls_vhost = cluster.get("tls-server-name")
        config.ca_file = _file_or_data(
            base, cluster.get("certificate-authority"), cluster.get("certificate-authority-data"), "ca.crt"
        )
        config.client_cert_file = _file_or_data(
            base, user.get("client-certificate"), user.get("client-certificate-data"), "client.crt"
        )
        config.client_key_file = _file_or_data(base, user.get("client-key"), user.get("client-key-data"), "client.key")
        if user.get("tokenFile"):
            config.token_file = str(base / user["tokenFile"])
        elif user.get("token"):
            config.token_file = _write_private(user["token"].encode(), "token")
        if user.get("exec") or user.get("auth-provider"):
            raise KubeConfigError(f"kubeconfig {path}: exec and auth-provider credentials are not supported")
        return config


def _file_or_data(base: Path, file: str | None, data: str | None, name: str) -> str | None:
    if file:
        return str(base / file)
    if data:
        return _write_private(base64.b64decode(data), name)
    return None


_PRIVATE_DIR: str | None = None


def _write_private(content: bytes, name: str) -> str:
    global _PRIVATE_DIR
    if _PRIVATE_DIR is None:
        _PRIVATE_DIR = tempfile.mkdtemp(prefix="kubetrail-kubeconfig-")
    path = os.path.join(_PRIVATE_DIR, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)
    return path


# The connection options every plugin that talks to the API server accepts, with Fluent Bit's
# names and defaults (its kubernetes_events input and kubernetes filter share them too).
CONNECTION_OPTIONS: tuple[Option, ...] = (
    Option(
        "kube_url",
        "str",
        None,
        help="API server URL (default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT in a pod with "
        f"the token file, else {IN_CLUSTER_URL})",
    ),
    Option("kube_ca_file", "str", f"{SA_DIR}/ca.crt"),
    Option("kube_ca_path", help="Directory of CA certificates"),
    Option(
        "kube_token_file",
        "str",
        f"{SA_DIR}/token",
        help="Bearer token file, re-read after kube_token_ttl and on 401; empty: no token",
    ),
    Option("kube_token_ttl", "duration", 600.0, help="Re-read the token file after this (and on 401)"),
    Option("kubeconfig", help="Use this kubeconfig instead of the kube_* options (outside a cluster)"),
    Option("tls.verify", "bool", True),
    Option("tls.debug", "int", 0),
    Option("tls.vhost", help="TLS server name to verify against"),
)


def connection_from_options(config: dict[str, Any]) -> ConnectionConfig:
    """The connection a plugin's resolved CONNECTION_OPTIONS describe (ConfigError if unusable)."""
    if config["kubeconfig"]:
        try:
            return ConnectionConfig.from_kubeconfig(config["kubeconfig"], token_ttl=config["kube_token_ttl"])
        except KubeConfigError as exc:
            raise ConfigError(str(exc), key="kubeconfig") from None
    token_file = config["kube_token_file"] or None
    return ConnectionConfig(
        url=(config["kube_url"] or in_cluster_url(token_file)).rstrip("/"),
        ca_file=config["kube_ca_file"] or None,
        ca_path=config["kube_ca_path"],
        token_file=token_file,
        token_ttl=config["kube_token_ttl"],
        tls_verify=config["tls.verify"],
        tls_vhost=config["tls.vhost"],
        tls_debug=config["tls.debug"],
    )


def in_cluster_url(token_file: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """The API server as a pod reaches it: the ``kubernetes`` Service's address from the
    environment the kubelet sets (as client-go does), when the pod has its token; else the
    Service's DNS name."""
    host = environ.get("KUBERNETES_SERVICE_HOST", "").strip()
    port = environ.get("KUBERNETES_SERVICE_PORT", "").strip()
    if not host or not port or not token_file or not os.path.isfile(token_file):
        return IN_CLUSTER_URL
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address, as Go's net.JoinHostPort writes it
    return f"https://{host}:{port}"
