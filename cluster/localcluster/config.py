"""Configuration files for the control plane: static tokens, audit policy, kubeconfigs.

Why static bearer tokens: they give each identity a realistic ``user.username`` in audit
records (``admin``, ``kubetrail-collector``, ``system:kube-controller-manager``...) with a
one-line file, and a test can hand any token to the code under test exactly as a real
deployment would hand it a service-account token.

Kubeconfigs are written as JSON, which is valid YAML, so no YAML library is needed.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from . import pki

# Audit policy.  Rules are evaluated in order; the first match wins.
# * No ``omitStages``: every stage (RequestReceived, ResponseStarted for watches,
#   ResponseComplete, Panic) is logged, so the collector has to cope with several records
#   per auditID, as it must in real clusters that keep the default.
# * Health and version probes are dropped: the harness and the controllers poll them
#   constantly and they carry no information.
# * Secrets, configmaps and token/subject-access reviews stay at Metadata: their bodies hold
#   credentials, which must never end up in an audit trail that kubetrail ships elsewhere.
# * Events (both API groups) are logged with full request and response bodies, because the
#   tests correlate audit records with the Event objects kubetrail collects.
# * Everything else at Metadata: who did what to which object, without bodies.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
rules:
  - level: None
    nonResourceURLs: ["/healthz*", "/livez*", "/readyz*", "/version", "/version/"]
  - level: Metadata
    resources:
      - group: ""
        resources: ["secrets", "configmaps", "serviceaccounts/token"]
      - group: "authentication.k8s.io"
        resources: ["tokenreviews"]
      - group: "authorization.k8s.io"
        resources: ["subjectaccessreviews", "selfsubjectaccessreviews", "selfsubjectrulesreviews"]
  - level: RequestResponse
    resources:
      - group: ""
        resources: ["events"]
      - group: "events.k8s.io"
        resources: ["events"]
  - level: Metadata
"""

# (file stem, user name, groups).  Control-plane users get the RBAC bootstrap roles that
# upstream binds to exactly these names.
IDENTITIES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("admin", "admin", ("system:masters",)),
    ("kcm", "system:kube-controller-manager", ()),
    ("scheduler", "system:kube-scheduler", ()),
    ("collector", "kubetrail-collector", ()),
    ("norbac", "norbac", ()),
)


@dataclass(frozen=True)
class Tokens:
    by_stem: dict[str, str]

    def __getitem__(self, stem: str) -> str:
        return self.by_stem[stem]


def write_tokens(directory: Path) -> Tokens:
    """``tokens.csv`` for --token-auth-file plus one ``<stem>.token`` file per identity."""
    rows = []
    tokens: dict[str, str] = {}
    for stem, user, groups in IDENTITIES:
        token = f"{stem}-{secrets.token_hex(16)}"
        tokens[stem] = token
        row = f"{token},{user},uid-{stem}"
        if groups:
            row += ',"' + ",".join(groups) + '"'
        rows.append(row)
        pki.write_secret(directory / f"{stem}.token", token + "\n")
    pki.write_secret(directory / "tokens.csv", "\n".join(rows) + "\n")
    return Tokens(tokens)


def write_kubeconfig(
    path: Path,
    server: str,
    ca_file: Path,
    *,
    token: str | None = None,
    token_file: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    name: str = "local",
) -> None:
    user: dict[str, str] = {}
    if token is not None:
        user["token"] = token
    if token_file is not None:
        user["tokenFile"] = str(token_file)
    if client_cert is not None and client_key is not None:
        user["client-certificate"] = str(client_cert)
        user["client-key"] = str(client_key)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }
    pki.write_secret(path, json.dumps(config, indent=2) + "\n")


def write_audit_policy(path: Path) -> None:
    path.write_text(AUDIT_POLICY)
