"""A real, local Kubernetes control plane for kubetrail's tests and for hacking.

Why this exists: kubetrail's correctness claims (nothing lost, nothing repeated) depend on
behaviour that fakes get wrong - resourceVersion semantics, 410 Gone after compaction, the
two Event APIs sharing one storage, audit log rotation and the audit webhook's retries.  So the
tests run against the genuine kube-apiserver, etcd, kube-controller-manager and kube-scheduler,
built from the Go module proxy (no Docker, no prebuilt downloads) and started as plain
processes on loopback ports.

Entry points:

* ``scripts/local-cluster build|up|down|status`` (see ``__main__``),
* :class:`LocalCluster` for Python callers (the pytest fixtures),
* :class:`AuditSink`, a tiny HTTPS receiver for the audit webhook backend.
"""

from __future__ import annotations

from .build import BuildError, GoNotFoundError, Versions, build, ensure_binaries
from .cluster import ClusterError, ClusterOptions, LocalCluster
from .kubeapi import ApiResponse, KubeAPI
from .webhook import AuditSink

__all__ = [
    "ApiResponse",
    "AuditSink",
    "BuildError",
    "ClusterError",
    "ClusterOptions",
    "GoNotFoundError",
    "KubeAPI",
    "LocalCluster",
    "Versions",
    "build",
    "ensure_binaries",
]
