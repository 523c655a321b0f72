"""A node that cannot start fails with the reason and the failing component's log, and leaves nothing.

Each test starts a fresh control plane with a node that is broken on purpose, after containerd
is already running, so the cleanup of a half-started node is what is checked: every process
stopped, no mount, rule, interface, cgroup, sysctl change or host path left (the node's own
``leftovers()`` check, read back through ``state.json`` as ``down`` from another process would).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from localcluster import ClusterError, LocalCluster
from localcluster.node import NodeError, preflight
from tests.integration.nodecluster import unavailable

pytestmark = [pytest.mark.cluster, pytest.mark.node]


@pytest.fixture(autouse=True)
def _node_possible() -> None:
    """Skip (with the reason) where no node can start at all: not root, no iptables, another
    node running; these tests are about a node that fails for its own reasons."""
    if os.geteuid() != 0:
        unavailable("needs root (containerd, kubelet and kube-proxy run as root)")
    try:
        preflight()
    except NodeError as exc:
        unavailable(str(exc))


def _assert_nothing_left(directory: Path) -> None:
    cluster = LocalCluster.attach(directory)
    assert cluster.node is not None
    assert not cluster.node.started
    assert cluster.node.leftovers() == []
    running = [n for n, c in [*cluster.components.items(), *cluster.node.components.items()] if c.alive()]
    assert running == []


def _unnamed_archive(path: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        data = json.dumps({"schemaVersion": 2, "manifests": [{"digest": "sha256:00", "annotations": {}}]}).encode()
        info = tarfile.TarInfo("index.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_image_without_a_name_stops_the_half_started_node(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    archive = _unnamed_archive(tmp_path / "unnamed.tar")
    with pytest.raises(ClusterError) as failure:
        LocalCluster.up(directory, controllers=True, nodes=1, images=[str(archive)])
    message = str(failure.value)
    assert str(archive) in message and "io.containerd.image.name" in message
    _assert_nothing_left(directory)


def test_kubelet_refusing_its_config_is_reported_with_its_log(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    # The kubelet's own validation refuses a log monitor interval under 3 s (our option check
    # only checks the syntax, so the kubelet's message is the one users see).
    with pytest.raises(ClusterError) as failure:
        LocalCluster.up(directory, controllers=True, nodes=1, container_log_monitor_interval="1s")
    message = str(failure.value)
    assert "kubelet exited during startup" in message, message
    assert "containerLogMonitorInterval" in message, message  # from the kubelet's own log
    _assert_nothing_left(directory)


OWNER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from localcluster import LocalCluster
c = LocalCluster.up(sys.argv[2], controllers=True, nodes=1)
pod = {"metadata": {"name": "sleeper"}, "spec": {"terminationGracePeriodSeconds": 1, "containers": [
    {"name": "app", "image": "localhost/busybox:latest", "imagePullPolicy": "Never",
     "command": ["sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"]}]}}
assert c.client("admin").post("/api/v1/namespaces/default/pods", pod).status == 201
while c.client("admin").get("/api/v1/namespaces/default/pods/sleeper").json()["status"].get("phase") != "Running":
    time.sleep(0.2)
print("up", flush=True)
time.sleep(600)
"""


def test_node_is_torn_down_when_its_owner_is_killed(tmp_path: Path) -> None:
    """A SIGKILLed test run: the watchdog stops the node (with a running pod) and the host is clean."""
    directory = tmp_path / "c"
    root = Path(__file__).resolve().parents[2]
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(root / "cluster"), str(directory)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "up"
        assert Path("/sys/class/net/cni0").exists()
    finally:
        owner.kill()
        owner.wait()

    def node_stopped() -> bool:
        state = json.loads((directory / "state.json").read_text())
        return not state["node"]["started"] and not any(
            LocalCluster.attach(directory).components[n].alive() for n in state["components"]
        )

    deadline = time.monotonic() + 90
    while not node_stopped() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert node_stopped(), (directory / "watchdog.log").read_text()[-2000:]
    _assert_nothing_left(directory)
