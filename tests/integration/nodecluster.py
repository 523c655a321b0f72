"""A control plane with one real node (containerd + kubelet + kube-proxy) for tests marked ``node``.

Used as ``with node_cluster(directory, **options) as cluster:`` from a module-scoped fixture;
only one node can run per machine (``/var/log/pods``, port 10250 are fixed), so modules that
need one take turns.  When the node cannot start here (not root, no Go, a failed build, a
missing kernel feature or host tool, another node already running) the tests are skipped with
the reason, which carries the failing component's last log lines; everything started so far
has been stopped by then.  ``KUBETRAIL_REQUIRE_NODE=1`` (or CI's ``KUBETRAIL_REQUIRE_ALL=1``) turns
that skip into a failure, for a CI that must prove the node works.

Pods for tests: ``busybox_pod(...)`` builds a Pod spec on ``localhost/busybox:latest``
(``imagePullPolicy: Never``: nothing can be pulled here) with a short grace period (``sh`` as
PID 1 ignores SIGTERM unless trapped, real-node.md P8).  Pods resolve cluster names through the
node's CoreDNS.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from localcluster import BuildError, ClusterError, KubeAPI, LocalCluster
from tests import required


def unavailable(reason: str) -> NoReturn:
    """Skip with the reason (fail with ``KUBETRAIL_REQUIRE_NODE=1`` or in CI: :mod:`tests.required`)."""
    required.unavailable(f"no local node: {reason}", kind="node")


@contextlib.contextmanager
def node_cluster(directory: Path, **options: Any) -> Iterator[LocalCluster]:
    """A fresh control plane with controllers and one node, stopped (and checked) at the end."""
    if os.geteuid() != 0:
        unavailable("needs root (containerd, kubelet and kube-proxy run as root)")
    options.setdefault("controllers", True)
    options.setdefault("nodes", 1)
    try:
        cluster = LocalCluster.up(directory, log=sys.stderr, **options)
    except (BuildError, ClusterError) as exc:
        unavailable(str(exc)[-4000:])
    try:
        yield cluster
    finally:
        cluster.down()


def busybox_pod(
    name: str,
    script: str,
    *,
    image: str = "localhost/busybox:latest",
    labels: dict[str, str] | None = None,
    container: str = "app",
) -> dict[str, Any]:
    """A Pod running ``sh -c script`` (end it with ``sleep 3600 & wait`` to keep it running)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": container,
                    "image": image,
                    "imagePullPolicy": "Never",
                    # sh as PID 1 ignores SIGTERM unless it traps it.
                    "command": ["sh", "-c", f"trap 'exit 0' TERM; {script}"],
                }
            ],
        },
    }


def wait_pod_phase(
    api: KubeAPI, namespace: str, name: str, phases: tuple[str, ...], timeout: float = 60
) -> dict[str, Any]:
    """Wait until the pod reaches one of ``phases``; the error carries its status."""
    deadline = time.monotonic() + timeout
    pod: dict[str, Any] = {}
    while time.monotonic() < deadline:
        resp = api.get(f"/api/v1/namespaces/{namespace}/pods/{name}")
        if resp.status == 200:
            pod = resp.json()
            if pod.get("status", {}).get("phase") in phases:
                return pod
        time.sleep(0.25)
    raise AssertionError(f"pod {namespace}/{name} not in {phases} after {timeout}s: {pod.get('status')}")
