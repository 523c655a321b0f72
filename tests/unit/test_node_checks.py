"""The node's refusals that need no node: a host without a kernel feature, and a pod network that
would leave pods unreachable (issue 16's bad input), each refused with the reason before anything
starts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from localcluster import ClusterError, LocalCluster
from localcluster.node import Node, NodeError, NodeOptions, _check_pod_cidr, preflight


def _kernel(tmp_path: Path, filesystems: str, cgroup_memory: bool) -> tuple[Path, Path]:
    proc, sysfs = tmp_path / "proc", tmp_path / "sys"
    (proc / "sys/net/ipv4").mkdir(parents=True)
    (proc / "sys/net/ipv4/ip_forward").write_text("0\n")
    (proc / "filesystems").write_text(filesystems)
    (sysfs / "class/net").mkdir(parents=True)
    if cgroup_memory:
        (sysfs / "fs/cgroup/memory").mkdir(parents=True)
    return proc, sysfs


def test_a_kernel_without_overlayfs_or_a_memory_cgroup_is_named(tmp_path: Path) -> None:
    proc, sysfs = _kernel(tmp_path, "nodev\tproc\nnodev\ttmpfs\n\text4\n", cgroup_memory=False)
    with pytest.raises(NodeError) as failure:
        preflight(proc, sysfs)
    message = str(failure.value)
    assert "the kernel has no overlay filesystem" in message
    assert "no cgroup memory controller" in message


def test_a_kernel_with_the_features_passes_those_checks(tmp_path: Path) -> None:
    proc, sysfs = _kernel(tmp_path, "nodev\toverlay\n\text4\n", cgroup_memory=True)
    try:
        preflight(proc, sysfs)
    except NodeError as exc:  # root, tools and ports are this machine's: only the kernel is faked
        assert "overlay" not in str(exc) and "cgroup" not in str(exc)


ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
"""


@pytest.mark.parametrize(
    ("cidr", "message"),
    [
        ("10.244.0.0/33", "is not an IPv4 network"),
        ("10.244.0.1/24", "is not an IPv4 network"),  # host bits set
        ("fd00::/64", "an IPv4 network from /16 to /28"),
        ("10.0.0.0/8", "an IPv4 network from /16 to /28"),
        ("10.0.0.0/16", "overlaps the Service range 10.0.0.0/24"),
        ("192.168.4.0/24", "overlaps 192.168.0.0/16 on eth0, a network this host is on"),
    ],
)
def test_pod_cidrs_that_would_leave_pods_without_a_network(tmp_path: Path, cidr: str, message: str) -> None:
    routes = tmp_path / "route"
    routes.write_text(ROUTES)
    with pytest.raises(NodeError, match=re.escape(message)):
        _check_pod_cidr(cidr, routes)
    _check_pod_cidr("10.244.0.0/24", routes)  # the default is fine there


def test_a_bad_pod_cidr_stops_up_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match=re.escape("pod CIDR '10.244.0.0/33' is not an IPv4 network")):
        LocalCluster.up(tmp_path / "c", controllers=True, nodes=1, pod_cidr="10.244.0.0/33", allow_build=False)
    assert not (tmp_path / "c" / "node").exists()


def test_a_node_dir_too_long_for_the_kubelets_sockets_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """The kubelet's pod-resources socket (root dir + 10 digits) is the longest path under the
    node dir: a dir that leaves it over 107 bytes made the kubelet exit with `bind: invalid
    argument` in a CI run; now the start says why before anything runs."""
    # Room for containerd's socket (the only one checked before), not for the kubelet's.
    base = Path("/tmp") / ("d" * 65)
    assert len(str(base / "node" / "run" / "containerd.sock.ttrpc")) <= 107
    node = Node(base, bins=None, options=NodeOptions(), name="n", ip="10.0.0.1")  # type: ignore[arg-type]
    with pytest.raises(NodeError, match=r"too long for the unix sockets under it \(\d+ of at most 107 bytes\)"):
        node.start(admin=None, url="", ca_file=Path(), log=None, save=lambda: None)  # type: ignore[arg-type]
    assert not base.exists()
    short = Node(Path("/tmp/ktn.abcdef/test_node_is_torn_down_when_it0/c"), None, NodeOptions(), "n", "10.0.0.1")  # type: ignore[arg-type]
    assert len(str(short.dir / "kubelet" / "root" / "pod-resources")) + 11 <= 107
