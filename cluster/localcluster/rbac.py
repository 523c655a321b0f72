"""RBAC for the ``kubetrail-collector`` user: exactly what the collector needs, nothing more.

Why so narrow: the tests prove that kubetrail works with least privilege (and fails loudly,
not silently, when a permission is missing).  A broader role here would hide a collector that
quietly depends on, say, listing secrets.

* ClusterRole ``kubetrail-collector``: get/list/watch on ``events`` in the core group and in
  ``events.k8s.io``, and on ``pods`` and ``namespaces`` (to enrich Events).
* Role ``kubetrail-collector-leases`` in namespace ``kubetrail``: get/create/update on
  ``leases`` in ``coordination.k8s.io`` (leader election between collector replicas).
"""

from __future__ import annotations

from typing import Any

from .kubeapi import KubeAPI

COLLECTOR_USER = "kubetrail-collector"
COLLECTOR_NAMESPACE = "kubetrail"
READ = ["get", "list", "watch"]

CLUSTER_ROLE_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["events"], "verbs": READ},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": READ},
    {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": READ},
]
LEASE_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
]


class RbacError(RuntimeError):
    pass


def _subject() -> list[dict[str, str]]:
    return [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": COLLECTOR_USER}]


def objects() -> list[tuple[str, dict[str, Any]]]:
    """(collection path, object) in apply order."""
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    ns_rbac = f"{rbac}/namespaces/{COLLECTOR_NAMESPACE}"
    role_ref = {"apiGroup": "rbac.authorization.k8s.io"}
    labels = {"app.kubernetes.io/managed-by": "localcluster"}
    return [
        (
            "/api/v1/namespaces",
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": COLLECTOR_NAMESPACE, "labels": labels},
            },
        ),
        (
            f"{rbac}/clusterroles",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": COLLECTOR_USER, "labels": labels},
                "rules": CLUSTER_ROLE_RULES,
            },
        ),
        (
            f"{rbac}/clusterrolebindings",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": COLLECTOR_USER, "labels": labels},
                "roleRef": {**role_ref, "kind": "ClusterRole", "name": COLLECTOR_USER},
                "subjects": _subject(),
            },
        ),
        (
            f"{ns_rbac}/roles",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": f"{COLLECTOR_USER}-leases", "labels": labels},
                "rules": LEASE_RULES,
            },
        ),
        (
            f"{ns_rbac}/rolebindings",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": f"{COLLECTOR_USER}-leases", "labels": labels},
                "roleRef": {**role_ref, "kind": "Role", "name": f"{COLLECTOR_USER}-leases"},
                "subjects": _subject(),
            },
        ),
    ]


def apply(admin: KubeAPI) -> None:
    for collection, obj in objects():
        resp = admin.ensure(collection, obj)
        if not resp.ok:
            raise RbacError(f"applying {obj['kind']} {obj['metadata']['name']} failed: {resp}")
