"""A real Kubernetes node next to the local control plane: containerd + runc, CNI, kubelet, kube-proxy.

Why a real node: the claims that matter about container logs are about what containerd writes
and what the kubelet rotates, and those differ in details (P/F pieces, rename rotation with a
delayed gzip, rotated files larger than the limit) that hand-written files get wrong.  The
recipe was verified on this machine (``shared/docs/real-node.md``); what it needed, briefly:

* cgroup v1 (hybrid) and no systemd as PID 1: the cgroupfs driver (``SystemdCgroup = false``,
  which is what the kubelet takes from CRI) and ``failCgroupV1: false``.
* ``CAP_SYS_RESOURCE`` is missing from every process's bounding set here, so no one may lower
  ``oom_score_adj``; containerd's ``restrict_oom_score_adj = true`` clamps the sandbox's -998
  to our own 0 (without it every sandbox fails in runc), and the kubelet runs with
  ``oomScoreAdj: 0``.
* Everything under the node's own directory where the components allow it (containerd
  root/state/sockets, runc root, pod network namespaces, CNI IPAM, kubelet root and certs).
  Paths that are hard-coded (``/run/containerd/s``, ``/var/lib/kubelet/device-plugins``,
  ``/var/log/pods``, ``/var/log/containers``, ``/var/lib/cni``, ``/run/mount``) are recorded as
  absent before the start and removed at teardown; that also means one node per machine.
* No kubelet iptables chains (``makeIPTablesUtilChains: false``), kube-proxy in iptables mode
  without ``route_localnet`` or conntrack sysctl changes; ``net.ipv4.ip_forward`` is set to 1
  and restored.  Pods get routes only to the service CIDR and the node IP: nothing they send
  can leave the machine, and they get no DNS (``resolvConf: ""``).
* Images are imported (``images``), never pulled, so the image GC thresholds are 100/99 and
  eviction thresholds low: an imported image cannot come back once collected.

Teardown (``stop``) leaves nothing: kubelet stopped, every sandbox removed through CRI (CNI
DEL, shims exit), kube-proxy's rules cleaned (``--cleanup`` plus the ``KUBE-FIREWALL`` chain it
leaves), containerd stopped, leftover shims and pod processes killed by exe/cgroup, mounts
under the node dir unmounted deepest first, ``cni0`` and its veths deleted, the ``kubepods``
cgroups removed in every hierarchy, sysctls restored, and the host paths that did not exist
before removed.  :func:`leftovers` checks all of that and names what it finds.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import config, images, pki
from .gotools import NodeBinaries
from .kubeapi import KubeAPI
from .process import Component, ComponentError, free_port, probe

POD_CIDR = "10.244.0.0/24"  # the default; --pod-cidr chooses another
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # the `kubernetes` Service
BRIDGE = "cni0"
POD_LOG_DIR = Path("/var/log/pods")
CONTAINER_LOG_DIR = Path("/var/log/containers")
KUBELET_PORTS = (10248, 10250)
PROXY_PORTS = (10249, 10256)
# Host paths some component writes outside the node dir (hard-coded in it); removed at
# teardown when they did not exist before the start.
HOST_PATHS = (
    "/run/containerd",
    "/run/nri",
    "/run/netns",
    "/run/mount",
    "/var/lib/cni",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/opt/containerd",
    str(POD_LOG_DIR),
    str(CONTAINER_LOG_DIR),
)
SYSCTLS = {"net.ipv4.ip_forward": "1"}
# Held (by content: the node dir) while a node runs; removed by teardown.
NODE_LOCK = Path("/run/kubetrail-localcluster-node.lock")
NODE_COMPONENTS = ("containerd", "coredns", "kube-proxy", "kubelet")
CLUSTER_DOMAIN = "cluster.local"
_LEFTOVER_CHAINS = ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT", "KUBE-PROXY-CANARY")
_SIZE = re.compile(r"^\d+(Ki|Mi|Gi)?$")
_DURATION = re.compile(r"^(\d+(\.\d+)?(ms|s|m|h))+$")


class NodeError(RuntimeError):
    """The node could not start (or stop cleanly); the message names the component and why."""


@dataclass
class NodeOptions:
    container_log_max_size: str = "10Mi"
    container_log_max_files: int = 5
    container_log_monitor_interval: str = "10s"
    images: list[str] = field(default_factory=list)  # extra OCI image archives to import
    ready_timeout: float = 120.0
    pod_cidr: str = POD_CIDR

    def validate(self) -> None:
        _check_pod_cidr(self.pod_cidr)
        if not _SIZE.match(self.container_log_max_size):
            raise NodeError(
                f"container log max size {self.container_log_max_size!r} is not a quantity like 1Mi, 512Ki, 10Mi"
            )
        if self.container_log_max_files < 2:
            raise NodeError(
                f"container log max files must be >= 2 (the kubelet's minimum), got {self.container_log_max_files}"
            )
        if not _DURATION.match(self.container_log_monitor_interval):
            raise NodeError(f"container log monitor interval {self.container_log_monitor_interval!r} is not a duration")
        for image in self.images:
            if not Path(image).is_file():
                raise NodeError(f"image archive not found: {image}")


def _host_networks(route_file: Path = Path("/proc/net/route")) -> list[tuple[str, ipaddress.IPv4Network]]:
    """(interface, network) of this host's directly connected IPv4 routes (not the default)."""
    out = []
    try:
        lines = route_file.read_text().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        cols = line.split()
        if len(cols) < 8 or cols[1] == "00000000":
            continue
        dest = ipaddress.IPv4Address(int(cols[1], 16).to_bytes(4, "little"))
        mask = ipaddress.IPv4Address(int(cols[7], 16).to_bytes(4, "little"))
        out.append((cols[0], ipaddress.IPv4Network(f"{dest}/{mask}", strict=False)))
    return out


def _check_pod_cidr(cidr: str, route_file: Path = Path("/proc/net/route")) -> None:
    """The CNI misconfigurations that would leave pods without a network, refused before
    anything starts: not a network, too small or too large, or overlapping the Service range or
    a network this host is already on (the bridge's gateway would shadow it)."""
    try:
        network = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise NodeError(f"pod CIDR {cidr!r} is not an IPv4 network like 10.244.0.0/24: {exc}") from None
    if not isinstance(network, ipaddress.IPv4Network) or not 16 <= network.prefixlen <= 28:
        raise NodeError(f"pod CIDR {cidr}: an IPv4 network from /16 to /28 is needed (one node's pods)")
    if network.overlaps(ipaddress.ip_network(SERVICE_CIDR)):
        raise NodeError(f"pod CIDR {cidr} overlaps the Service range {SERVICE_CIDR}")
    for iface, host in _host_networks(route_file):
        if iface != BRIDGE and network.overlaps(host):
            raise NodeError(
                f"pod CIDR {cidr} overlaps {host} on {iface}, a network this host is on: pods and the host "
                "could not reach each other; choose a free range (--pod-cidr)"
            )


def node_ip() -> str:
    """IPv4 address of the interface carrying the default route (the kubelet's --node-ip)."""
    iface = None
    with open("/proc/net/route") as fh:
        for line in fh.readlines()[1:]:
            cols = line.split()
            if len(cols) > 2 and cols[1] == "00000000":
                iface = cols[0]
                break
    if iface is None:
        raise NodeError("no default route: a node needs an IPv4 address that pods can reach (none found)")
    out = subprocess.run(["ip", "-j", "-4", "addr", "show", "dev", iface], capture_output=True, text=True)
    try:
        for link in json.loads(out.stdout or "[]"):
            for addr in link.get("addr_info", []):
                if addr.get("family") == "inet":
                    return str(addr["local"])
    except (ValueError, KeyError) as exc:
        raise NodeError(f"cannot read the address of {iface}: {exc}") from exc
    raise NodeError(f"interface {iface} (default route) has no IPv4 address")


def node_name() -> str:
    """This machine's hostname, as the kubelet would register it (lower case)."""
    return socket.gethostname().split(".")[0].lower()


def _run(cmd: list[str], timeout: float = 60.0, check: bool = False) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        if check:
            raise NodeError(f"`{' '.join(cmd)}` failed: {exc}") from exc
        return subprocess.CompletedProcess(cmd, 127, "", str(exc))
    if check and done.returncode != 0:
        raise NodeError(f"`{' '.join(cmd)}` failed (exit {done.returncode}): {done.stderr.strip()}")
    return done


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _udp_port_free(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((ip, port))
        except OSError:
            return False
    return True


def preflight(proc: Path = Path("/proc"), sysfs: Path = Path("/sys")) -> None:
    """Refuse early, with the reason, when this host cannot run the node (``proc``/``sysfs``:
    where the kernel's features are read, for tests)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root (containerd, the kubelet and kube-proxy need root)")
    for tool in ("iptables", "iptables-save", "iptables-restore", "ip6tables", "conntrack", "ip", "nft"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            problems.append(
                f"{tool} not found (apt-get install iptables conntrack nftables iproute2; scripts/setup does)"
            )
    filesystems = (proc / "filesystems").read_text() if (proc / "filesystems").exists() else ""
    if "overlay" not in filesystems:
        problems.append("the kernel has no overlay filesystem (containerd's overlayfs snapshotter needs it)")
    if not (sysfs / "fs/cgroup/memory").is_dir() and not (sysfs / "fs/cgroup/cgroup.controllers").exists():
        problems.append("no cgroup memory controller under /sys/fs/cgroup")
    if not (proc / "sys/net/ipv4/ip_forward").exists():
        problems.append("no /proc/sys/net/ipv4/ip_forward (network namespace without sysctls?)")
    if (sysfs / "class/net" / BRIDGE).exists():
        problems.append(f"a {BRIDGE} interface already exists: another node (or CNI setup) runs on this machine")
    busy = [str(port) for port in (*KUBELET_PORTS, *PROXY_PORTS) if _port_in_use(port)]
    if busy:
        problems.append(
            f"port(s) {', '.join(busy)} already in use (the kubelet's are 10248 and 10250, kube-proxy's "
            "10249 and 10256): another node runs on this machine (one node per machine)"
        )
    if problems:
        raise NodeError("this host cannot run a node: " + "; ".join(problems))


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def _iptables_lines(tool: str) -> list[str]:
    """Rules and user chains from ``iptables-save`` (counters and built-in chains dropped)."""
    out = _run([tool]).stdout
    lines = []
    table = ""
    for line in out.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A"):
            lines.append(f"{table} {line}")
        elif line.startswith(":"):
            chain = line[1:].split()[0]
            if chain not in ("INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"):
                lines.append(f"{table} chain {chain}")
    return lines


def _nft_ruleset() -> list[dict[str, Any]]:
    out = _run(["nft", "-j", "list", "ruleset"]).stdout
    try:
        items = json.loads(out or "{}").get("nftables", [])
    except ValueError:
        return []
    return [i for i in items if "metainfo" not in i]


def _mounts_under(prefixes: list[str]) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            target = line.split()[4].replace("\\040", " ")
            if any(target == p or target.startswith(p.rstrip("/") + "/") for p in prefixes):
                found.append(target)
    return found


def _procs_with_exe(paths: set[str], mentioning: str) -> list[tuple[int, str]]:
    """Processes running one of ``paths`` whose command line mentions ``mentioning`` (the node
    dir: every node process names its config, socket or state there), so another node's
    processes, started from the same cached binaries, are never taken for ours."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            exe = os.readlink(entry / "exe")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if exe.removesuffix(" (deleted)") in paths and mentioning.encode() in cmdline:
            found.append((int(entry.name), exe))
    return found


def _node_running(node_dir: Path) -> bool:
    """Whether the node whose state lives next to ``node_dir`` still has a live process."""
    try:
        state = json.loads((node_dir.parent / "state.json").read_text()).get("node") or {}
    except (OSError, ValueError):
        return False
    if not state.get("started"):
        return False
    comps = [Component.from_state(n, c) for n, c in (state.get("components") or {}).items()]
    return any(c.alive() for c in comps)


def _kubepods_cgroups() -> list[Path]:
    root = Path("/sys/fs/cgroup")
    found = []
    if (root / "kubepods").is_dir():
        found.append(root / "kubepods")
    if root.is_dir():
        for hierarchy in root.iterdir():
            if (hierarchy / "kubepods").is_dir():
                found.append(hierarchy / "kubepods")
    return found


def _cgroup_procs(cgroup: Path) -> set[int]:
    pids: set[int] = set()
    for procs in cgroup.rglob("cgroup.procs"):
        try:
            pids.update(int(p) for p in procs.read_text().split())
        except (OSError, ValueError):
            continue
    return pids


class Node:
    """One node (containerd, kubelet, kube-proxy) registered with the cluster in ``cluster_dir``.

    Attributes: ``name``, ``ip``, ``dir`` (``cluster_dir/node``), ``bins``, ``components``,
    ``busybox_image``, ``kubetrail_image`` (the first extra image whose name contains
    ``kubetrail``), ``imported`` (every image name imported), ``cri_endpoint``.
    """

    def __init__(self, cluster_dir: Path, bins: NodeBinaries, options: NodeOptions, name: str, ip: str) -> None:
        self.cluster_dir = cluster_dir
        self.dir = cluster_dir / "node"
        self.bins = bins
        self.options = options
        self.name = name
        self.ip = ip
        self.components: dict[str, Component] = {}
        self.dns_ready_port = free_port(set())
        self.imported: list[str] = []
        self.busybox_image = images.BUSYBOX_IMAGE
        self.kubetrail_image: str | None = None
        # What the host looked like before the start, so teardown restores exactly that.
        self.absent_paths: list[str] = []
        self.sysctl_before: dict[str, str] = {}
        self.nft_empty_before = True
        self.iptables_before: dict[str, list[str]] = {}
        self.started = False

    # -- paths ----------------------------------------------------------------------------

    @property
    def socket(self) -> Path:
        return self.dir / "run" / "containerd.sock"

    @property
    def cri_endpoint(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pki_dir(self) -> Path:
        return self.cluster_dir / "pki"

    def env(self) -> dict[str, str]:
        env = {
            "NODE_NAME": self.name,
            "NODE_IP": self.ip,
            "CLUSTER_DNS": self.ip,
            "BUSYBOX_IMAGE": self.busybox_image,
            "POD_LOG_DIR": str(POD_LOG_DIR),
            "CONTAINER_LOG_DIR": str(CONTAINER_LOG_DIR),
            "CRI_ENDPOINT": self.cri_endpoint,
            "CRICTL": str(self.bins.path("crictl")),
        }
        if self.kubetrail_image:
            env["KUBETRAIL_IMAGE"] = self.kubetrail_image
        return env

    # -- certificates (before the apiserver starts) ---------------------------------------

    @staticmethod
    def apiserver_sans(ip: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(IPs, DNS names) the apiserver's serving cert needs once pods talk to it."""
        dns = (
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        )
        return ("127.0.0.1", "::1", SERVICE_IP, ip), dns

    def write_pki(self, ca: pki.KeyPair) -> None:
        """Client certs from the cluster CA: the apiserver's for the kubelet (system:masters,
        so ``kubectl logs/exec`` work), the kubelet's node identity and kube-proxy's."""
        d = self.pki_dir
        pki.issue(ca, "kube-apiserver-kubelet-client", client=True, orgs=("system:masters",)).write(
            d / "apiserver-kubelet-client.crt", d / "apiserver-kubelet-client.key"
        )
        pki.issue(ca, f"system:node:{self.name}", client=True, orgs=("system:nodes",)).write(
            d / "kubelet.crt", d / "kubelet.key"
        )
        pki.issue(ca, "system:kube-proxy", client=True).write(d / "kube-proxy.crt", d / "kube-proxy.key")

    def apiserver_args(self) -> list[str]:
        d = self.pki_dir
        return [
            f"--kubelet-client-certificate={d / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={d / 'apiserver-kubelet-client.key'}",
        ]

    # -- configuration files --------------------------------------------------------------

    def _write_configs(self, url: str, ca_file: Path) -> None:
        n = self.dir
        for sub in ("run", "containerd", "cni/net.d", "cni/ipam", "kubelet/root", "kubelet/pki", "images"):
            (n / sub).mkdir(parents=True, exist_ok=True)
        pki_dir = self.pki_dir
        config.write_kubeconfig(
            n / "kubelet.kubeconfig",
            url,
            ca_file,
            client_cert=pki_dir / "kubelet.crt",
            client_key=pki_dir / "kubelet.key",
        )
        config.write_kubeconfig(
            n / "kube-proxy.kubeconfig",
            url,
            ca_file,
            client_cert=pki_dir / "kube-proxy.crt",
            client_key=pki_dir / "kube-proxy.key",
        )
        (n / "containerd" / "config.toml").write_text(self._containerd_toml())
        (n / "cni" / "net.d" / "10-kubetrail.conflist").write_text(json.dumps(self._cni_conflist(), indent=2) + "\n")
        (n / "kubelet.yaml").write_text(json.dumps(self._kubelet_config(ca_file), indent=2) + "\n")
        (n / "kube-proxy.yaml").write_text(json.dumps(self._proxy_config(), indent=2) + "\n")
        (n / "Corefile").write_text(self._corefile())

    def _corefile(self) -> str:
        # Cluster DNS on the node IP (pods have a route to it), answering only for the cluster
        # domain: there is no upstream to forward to, and pods cannot reach one anyway.
        return f"""\
.:53 {{
    bind {self.ip}
    errors
    ready 127.0.0.1:{self.dns_ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {self.cluster_dir / "kubeconfig"}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""

    def _containerd_toml(self) -> str:
        n = self.dir
        cri = 'plugins."io.containerd.cri.v1.runtime"'
        runc = f"{cri}.containerd.runtimes.runc"
        return f"""\
# Written by localcluster.node; version 3 (containerd 2.x migrates it on load).
version = 3
root = "{n / "containerd" / "root"}"
state = "{n / "containerd" / "state"}"
imports = []

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.socket}.ttrpc"

[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.internal.v1.opt"]
  path = "{n / "containerd" / "opt"}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{images.PAUSE_IMAGE}"

[{cri}]
  # This VM's bounding set lacks CAP_SYS_RESOURCE: nobody may lower oom_score_adj, so clamp.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [{cri}.containerd]
    default_runtime_name = "runc"
  [{runc}]
    runtime_type = "io.containerd.runc.v2"
  [{runc}.options]
    BinaryName = "{self.bins.path("runc")}"
    Root = "{n / "containerd" / "state" / "runc"}"
    SystemdCgroup = false
  [{cri}.cni]
    bin_dirs = ["{self.bins.cni_dir}"]
    conf_dir = "{n / "cni" / "net.d"}"
    max_conf_num = 1
"""

    def _cni_conflist(self) -> dict[str, Any]:
        o = self.options
        pod_net = ipaddress.ip_network(o.pod_cidr)
        return {
            "cniVersion": "1.0.0",
            "name": "kubetrail",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(self.dir / "cni" / "ipam"),
                        "ranges": [[{"subnet": o.pod_cidr, "gateway": str(next(pod_net.hosts()))}]],
                        # No default route: pods reach Services and the node, nothing else.
                        "routes": [{"dst": SERVICE_CIDR}, {"dst": f"{self.ip}/32"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def _kubelet_config(self, ca_file: Path) -> dict[str, Any]:
        o = self.options
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": self.cri_endpoint,
            "failSwapOn": False,
            "oomScoreAdj": 0,
            "makeIPTablesUtilChains": False,
            "containerLogMaxSize": o.container_log_max_size,
            "containerLogMaxFiles": o.container_log_max_files,
            "containerLogMonitorInterval": o.container_log_monitor_interval,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(ca_file)},
            },
            "authorization": {"mode": "Webhook"},
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": KUBELET_PORTS[0],
            "resolvConf": "",
            "clusterDNS": [self.ip],
            "clusterDomain": CLUSTER_DOMAIN,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
        }

    def _proxy_config(self) -> dict[str, Any]:
        return {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(self.dir / "kube-proxy.kubeconfig")},
            "hostnameOverride": self.name,
            "clusterCIDR": self.options.pod_cidr,
            "nodePortAddresses": ["primary"],
            "oomScoreAdj": 0,
            "healthzBindAddress": f"127.0.0.1:{PROXY_PORTS[1]}",
            "metricsBindAddress": f"127.0.0.1:{PROXY_PORTS[0]}",
            "iptables": {"localhostNodePorts": False},
            "conntrack": {"maxPerCore": 0},
        }

    def _components(self) -> dict[str, Component]:
        n, b = self.dir, self.bins
        return {
            "containerd": Component(
                "containerd",
                [str(b.path("containerd")), "--config", str(n / "containerd" / "config.toml")],
                n / "containerd.log",
                0,
            ),
            "coredns": Component(
                "coredns",
                [str(b.path("coredns")), "-conf", str(n / "Corefile")],
                n / "coredns.log",
                self.dns_ready_port,
            ),
            "kube-proxy": Component(
                "kube-proxy",
                [str(b.path("kube-proxy")), f"--config={n / 'kube-proxy.yaml'}", "--v=2"],
                n / "kube-proxy.log",
                PROXY_PORTS[1],
            ),
            "kubelet": Component(
                "kubelet",
                [
                    str(b.path("kubelet")),
                    f"--config={n / 'kubelet.yaml'}",
                    f"--kubeconfig={n / 'kubelet.kubeconfig'}",
                    f"--root-dir={n / 'kubelet' / 'root'}",
                    f"--cert-dir={n / 'kubelet' / 'pki'}",
                    f"--hostname-override={self.name}",
                    f"--node-ip={self.ip}",
                    "--v=2",
                ],
                n / "kubelet.log",
                KUBELET_PORTS[1],
            ),
        }

    # -- start ----------------------------------------------------------------------------

    def _record_host(self) -> None:
        self.absent_paths = [p for p in HOST_PATHS if not os.path.lexists(p)]
        self.sysctl_before = {k: _sysctl_path(k).read_text().strip() for k in SYSCTLS}
        self.nft_empty_before = not _nft_ruleset()
        self.iptables_before = {t: _iptables_lines(t) for t in ("iptables-save", "ip6tables-save")}

    def start(self, admin: KubeAPI, url: str, ca_file: Path, log: TextIO, save: Callable[[], None]) -> float:
        """Start containerd, import images, start kube-proxy and the kubelet; wait for Ready.

        Returns the seconds until Ready.  On failure everything this node started is stopped
        and :class:`NodeError` names the failing component with its last log lines.
        """
        started = time.monotonic()
        # The longest unix sockets: containerd's ttrpc one, and the kubelet's pod-resources socket
        # (a temporary name of up to 10 digits under its root dir); sun_path holds 107 bytes.
        longest = max(
            len(str(self.socket)) + len(".ttrpc"), len(str(self.dir / "kubelet" / "root" / "pod-resources")) + 11
        )
        if longest > 107:
            raise NodeError(
                f"the node dir {self.dir} is too long for the unix sockets under it ({longest} of at most 107 "
                "bytes); use a shorter cluster dir"
            )
        stale = _mounts_under([str(self.dir)])
        if stale:
            raise NodeError(f"an earlier node's mounts are still under {self.dir} ({stale[0]}, ...): run `down` first")
        if not _udp_port_free(self.ip, 53):
            raise NodeError(f"port {self.ip}:53 (udp) is in use: the node's cluster DNS (CoreDNS) needs it")
        self._take_lock()
        shutil.rmtree(self.dir, ignore_errors=True)  # a fresh node every time, like a fresh etcd
        try:
            self._record_host()
        except BaseException:
            self._release_lock()
            raise
        self.started = True
        save()  # the host's "before" on disk before anything changes it: `down` restores it
        self._write_configs(url, ca_file)
        for key, value in SYSCTLS.items():
            _sysctl_path(key).write_text(value + "\n")
        self.components = self._components()
        env = {**os.environ, "PATH": f"{self.bins.dir}:{os.environ.get('PATH', '')}:/usr/sbin:/sbin"}
        containerd = self.components["containerd"]
        self._start_with_env(containerd, env)
        save()
        try:
            containerd.wait_ready(self._containerd_ready, 60.0)
        except ComponentError as exc:
            raise NodeError(str(exc)) from exc
        self._import_images(log)
        _ensure_node_binding(admin)
        coredns = self.components["coredns"]
        self._start_with_env(coredns, env)
        save()
        try:
            coredns.wait_ready(lambda: probe(f"http://127.0.0.1:{self.dns_ready_port}/ready"), 60.0)
        except ComponentError as exc:
            raise NodeError(str(exc)) from exc
        for name in ("kube-proxy", "kubelet"):
            self._start_with_env(self.components[name], env)
        save()
        try:
            # The kubelet first: it fails fast on a bad config, while kube-proxy's /healthz
            # stays 503 until the Node object it serves exists.
            self.components["kubelet"].wait_ready(lambda: self._node_ready(admin), self.options.ready_timeout)
            self.components["kube-proxy"].wait_ready(lambda: probe(f"http://127.0.0.1:{PROXY_PORTS[1]}/healthz"), 60.0)
        except ComponentError as exc:
            raise NodeError(f"{exc}\n{self._other_logs(exc)}") from exc
        return time.monotonic() - started

    def _take_lock(self) -> None:
        """One node per machine, atomically: two `up`s that both passed the port checks race
        here, and the loser gets a clear message instead of a half-shared host."""
        for _ in range(2):
            try:
                fd = os.open(NODE_LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = NODE_LOCK.read_text().strip()
                except OSError:
                    other = ""
                if other and other != str(self.dir) and _node_running(Path(other)):
                    raise NodeError(
                        f"another node runs on this machine (its state is in {Path(other).parent}; stop it with "
                        f"`scripts/local-cluster down {Path(other).parent}`): one node per machine"
                    ) from None
                NODE_LOCK.unlink(missing_ok=True)  # stale: its node is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(self.dir) + "\n")
            return
        raise NodeError(f"could not take {NODE_LOCK}")

    def _release_lock(self) -> None:
        try:
            if NODE_LOCK.read_text().strip() == str(self.dir):
                NODE_LOCK.unlink()
        except OSError:
            pass

    def _other_logs(self, exc: Exception) -> str:
        parts = []
        for name, comp in self.components.items():
            if name not in str(exc).split(" ", 1)[0]:
                parts.append(f"Last lines of {comp.log_path}:\n{comp.log_tail(10)}")
        return "\n".join(parts)

    @staticmethod
    def _start_with_env(comp: Component, env: dict[str, str]) -> None:
        # The node's PATH must reach the shim (containerd finds containerd-shim-runc-v2 on
        # PATH) and iptables/conntrack (kube-proxy).
        comp.env = env
        comp.start()

    def _ctr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        # An absolute socket path: a relative one is parsed as a URL authority by ctr.
        return _run([str(self.bins.path("ctr")), "--address", str(self.socket), "-n", "k8s.io", *args], timeout)

    def _containerd_ready(self) -> tuple[bool, str]:
        if not self.socket.exists():
            return False, f"{self.socket} not there yet"
        done = self._ctr("version", timeout=10)
        return done.returncode == 0, (done.stderr or done.stdout).strip()[-300:]

    def _import_images(self, log: TextIO) -> None:
        folder = self.dir / "images"
        pause = folder / "pause.tar"
        busybox = folder / "busybox.tar"
        try:
            images.pause_image(self.bins.path("pause"), pause)
            images.busybox_image(busybox)
        except (OSError, images.ImageError) as exc:
            raise NodeError(f"building the node's images failed: {exc}") from exc
        archives = [(pause, images.PAUSE_IMAGE), (busybox, images.BUSYBOX_IMAGE)]
        for extra in self.options.images:
            try:
                archives.append((Path(extra), images.archive_image_name(Path(extra))))
            except images.ImageError as exc:
                raise NodeError(str(exc)) from exc
        for archive, name in archives:
            done = self._ctr("images", "import", str(archive))
            if done.returncode != 0:
                raise NodeError(
                    f"importing {archive} ({name}) into containerd failed: {(done.stderr or done.stdout).strip()}\n"
                    f"Last lines of {self.components['containerd'].log_path}:\n"
                    f"{self.components['containerd'].log_tail(10)}"
                )
            listed = self._ctr("images", "ls", "-q").stdout.split()
            if name not in listed:
                raise NodeError(f"importing {archive} did not create image {name} (images: {', '.join(listed)})")
            self.imported.append(name)
            print(f"node: imported {name} from {archive}", file=log, flush=True)
            if archive.parent != folder and "kubetrail" in name and self.kubetrail_image is None:
                self.kubetrail_image = name

    def _node_ready(self, admin: KubeAPI) -> tuple[bool, str]:
        resp = admin.get(f"/api/v1/nodes/{self.name}")
        if resp.status != 200:
            return False, f"node {self.name} not registered yet (HTTP {resp.status})"
        conditions = resp.json().get("status", {}).get("conditions", [])
        ready = [c for c in conditions if c.get("type") == "Ready"]
        if ready and ready[0].get("status") == "True":
            return True, "Ready"
        return False, f"node {self.name} not Ready: {ready[0].get('message') if ready else 'no Ready condition'}"

    # -- stop -----------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Tear everything down (see the module docstring); returns what could not be cleaned."""
        if not self.started:
            return []
        errors: list[str] = []
        for name in ("kubelet", "coredns"):
            comp = self.components.get(name)
            if comp is not None:
                self._stop(comp, 15.0, errors)
        if self.socket.exists() and self.components.get("containerd") and self.components["containerd"].alive():
            # Removing the sandboxes through CRI runs CNI DEL (veths, IPs) and ends the shims.
            done = _run(
                [
                    str(self.bins.path("crictl")),
                    "--runtime-endpoint",
                    self.cri_endpoint,
                    "--timeout",
                    "30s",
                    "rmp",
                    "-fa",
                ],
                timeout=120,
            )
            if done.returncode != 0:
                errors.append(f"crictl rmp -fa: {done.stderr.strip()[-300:]}")
        proxy = self.components.get("kube-proxy")
        if proxy is not None:
            self._stop(proxy, 10.0, errors)
        self._clean_iptables()
        containerd = self.components.get("containerd")
        if containerd is not None:
            self._stop(containerd, 15.0, errors)
        self._kill_leftover_processes()
        self._unmount()
        self._delete_links()
        self._remove_cgroups(errors)
        for prefix in (self.options.pod_cidr, SERVICE_CIDR):
            for flag in ("-s", "-d"):
                _run(["conntrack", "-D", flag, prefix], timeout=10)
        for key, value in self.sysctl_before.items():
            try:
                _sysctl_path(key).write_text(value + "\n")
            except OSError as exc:
                errors.append(f"restoring {key}={value}: {exc}")
        for path in self.absent_paths:
            if os.path.lexists(path):
                shutil.rmtree(path, ignore_errors=True)
                if os.path.lexists(path):
                    errors.append(f"could not remove {path}")
        self.started = False
        self._release_lock()
        return errors

    @staticmethod
    def _stop(comp: Component, timeout: float, errors: list[str]) -> None:
        try:
            comp.stop(timeout)
        except ComponentError as exc:
            errors.append(str(exc))

    def _clean_iptables(self) -> None:
        # kube-proxy's own cleanup removes its chains and nft tables; it leaves KUBE-FIREWALL
        # (always created) and the jumps to it, which go by hand (real-node.md P6).
        _run([str(self.bins.path("kube-proxy")), "--cleanup"], timeout=60)
        for tool, save in (("iptables", "iptables-save"), ("ip6tables", "ip6tables-save")):
            before = set(self.iptables_before.get(save, []))
            for line in _iptables_lines(save):
                if line in before:
                    continue
                table, rest = line.split(" ", 1)
                if rest.startswith("-A ") and any(c in rest for c in _LEFTOVER_CHAINS):
                    _run([tool, "-t", table, "-D", *shlex.split(rest[3:])], timeout=10)
            for line in _iptables_lines(save):
                table, rest = line.split(" ", 1)
                if rest.startswith("chain ") and line not in before and rest[6:] in _LEFTOVER_CHAINS:
                    _run([tool, "-t", table, "-F", rest[6:]], timeout=10)
                    _run([tool, "-t", table, "-X", rest[6:]], timeout=10)
        if self.nft_empty_before:
            # iptables-nft leaves empty base tables; the ruleset was empty, so drop tables without rules.
            items = _nft_ruleset()
            with_rules = {(i["rule"]["family"], i["rule"]["table"]) for i in items if "rule" in i}
            for item in items:
                if "table" in item:
                    key = (item["table"]["family"], item["table"]["name"])
                    if key not in with_rules:
                        _run(["nft", "delete", "table", key[0], key[1]], timeout=10)

    def _exe_paths(self) -> set[str]:
        return {str(p) for p in self.bins.all_paths()}

    def _kill_leftover_processes(self) -> None:
        # Shims are reparented to PID 1 and outlive containerd (P13); pod processes live in
        # the kubepods cgroups.  Both are ours by construction: by exe path and by cgroup.
        targets = {pid for pid, _ in _procs_with_exe(self._exe_paths(), str(self.dir))}
        for cgroup in _kubepods_cgroups():
            targets |= _cgroup_procs(cgroup)
        targets.discard(os.getpid())
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in targets):
            time.sleep(0.1)

    def _unmount(self) -> None:
        prefixes = [str(self.dir)]
        if "/run/netns" in self.absent_paths:
            prefixes.append("/run/netns")
        if "/var/lib/kubelet" in self.absent_paths:
            prefixes.append("/var/lib/kubelet")
        for _ in range(3):
            mounts = _mounts_under(prefixes)
            if not mounts:
                return
            for target in sorted(mounts, key=lambda m: m.count("/"), reverse=True):
                if _run(["umount", target], timeout=30).returncode != 0:
                    _run(["umount", "-l", target], timeout=30)

    def _delete_links(self) -> None:
        if not Path(f"/sys/class/net/{BRIDGE}").exists():
            return
        out = _run(["ip", "-j", "link", "show", "master", BRIDGE]).stdout
        try:
            veths = [link["ifname"] for link in json.loads(out or "[]")]
        except (ValueError, KeyError):
            veths = []
        for veth in veths:
            _run(["ip", "link", "del", veth], timeout=10)
        _run(["ip", "link", "del", BRIDGE], timeout=10)

    def _remove_cgroups(self, errors: list[str]) -> None:
        for cgroup in _kubepods_cgroups():
            dirs = sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
            for d in [*dirs, cgroup]:
                for _ in range(50):
                    try:
                        d.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.1)  # a killed process may still be leaving the cgroup
                else:
                    errors.append(f"could not remove cgroup {d}")

    def status(self) -> dict[str, dict[str, Any]]:
        """Per node component: pid, running, healthy (containerd answers, /healthz 200), RSS."""
        checks: dict[str, Callable[[], tuple[bool, str]]] = {
            "containerd": self._containerd_ready,
            "coredns": lambda: probe(f"http://127.0.0.1:{self.dns_ready_port}/ready"),
            "kube-proxy": lambda: probe(f"http://127.0.0.1:{PROXY_PORTS[1]}/healthz"),
            "kubelet": lambda: probe(f"http://127.0.0.1:{KUBELET_PORTS[0]}/healthz"),
        }
        result: dict[str, dict[str, Any]] = {}
        for name, comp in self.components.items():
            alive = comp.alive()
            healthy, detail = checks[name]() if alive else (False, "not running")
            result[name] = {
                "pid": comp.pid,
                "running": alive,
                "port": comp.port,
                "healthy": healthy,
                "detail": detail,
                "rss_kb": comp.rss_kb(),
                "log": str(comp.log_path),
            }
        return result

    # -- checks ---------------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """Everything the node left on the host (empty after a clean ``stop``)."""
        found: list[str] = []
        for pid, exe in _procs_with_exe(self._exe_paths(), str(self.dir)):
            found.append(f"process {pid} ({exe})")
        mounts = _mounts_under([str(self.dir), "/run/netns"])
        found += [f"mount {m}" for m in mounts]
        for save in ("iptables-save", "ip6tables-save"):
            before = set(self.iptables_before.get(save, []))
            found += [f"{save}: {line}" for line in _iptables_lines(save) if line not in before]
        if self.nft_empty_before:
            found += [f"nft: {json.dumps(i)}" for i in _nft_ruleset()][:20]
        if Path(f"/sys/class/net/{BRIDGE}").exists():
            found.append(f"interface {BRIDGE}")
        out = _run(["ip", "-j", "link", "show", "type", "veth"]).stdout
        try:
            found += [f"veth {link['ifname']}" for link in json.loads(out or "[]") if link.get("master") == BRIDGE]
        except (ValueError, KeyError):
            pass
        found += [f"cgroup {c}" for c in _kubepods_cgroups()]
        for key, value in self.sysctl_before.items():
            now = _sysctl_path(key).read_text().strip()
            if now != value:
                found.append(f"sysctl {key}={now} (was {value})")
        found += [f"path {p}" for p in self.absent_paths if os.path.lexists(p)]
        try:
            if NODE_LOCK.read_text().strip() == str(self.dir):
                found.append(f"lock {NODE_LOCK}")
        except OSError:
            pass
        for port in (*KUBELET_PORTS, *PROXY_PORTS):
            if _port_in_use(port):
                found.append(f"port {port} still in use")
        if not _udp_port_free(self.ip, 53):
            found.append(f"port {self.ip}:53 (udp) still in use")
        return found

    # -- state ----------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ip": self.ip,
            "bins": {"dir": str(self.bins.dir), "kube_dir": str(self.bins.kube_dir)},
            "options": {
                "container_log_max_size": self.options.container_log_max_size,
                "container_log_max_files": self.options.container_log_max_files,
                "container_log_monitor_interval": self.options.container_log_monitor_interval,
                "images": self.options.images,
                "ready_timeout": self.options.ready_timeout,
            },
            "components": {n: c.to_state() for n, c in self.components.items()},
            "imported": self.imported,
            "kubetrail_image": self.kubetrail_image,
            "absent_paths": self.absent_paths,
            "sysctl_before": self.sysctl_before,
            "nft_empty_before": self.nft_empty_before,
            "iptables_before": self.iptables_before,
            "started": self.started,
        }

    @classmethod
    def from_state(cls, cluster_dir: Path, state: dict[str, Any]) -> Node:
        bins = NodeBinaries(Path(state["bins"]["dir"]), Path(state["bins"]["kube_dir"]))
        node = cls(cluster_dir, bins, NodeOptions(**state["options"]), state["name"], state["ip"])
        node.components = {n: Component.from_state(n, c) for n, c in state["components"].items()}
        if "coredns" in node.components:
            node.dns_ready_port = node.components["coredns"].port
        node.imported = list(state.get("imported", []))
        node.kubetrail_image = state.get("kubetrail_image")
        node.absent_paths = list(state.get("absent_paths", []))
        node.sysctl_before = dict(state.get("sysctl_before", {}))
        node.nft_empty_before = bool(state.get("nft_empty_before", True))
        node.iptables_before = dict(state.get("iptables_before", {}))
        node.started = bool(state.get("started", False))
        return node


def _ensure_node_binding(admin: KubeAPI) -> None:
    """The authorizer is RBAC only (no Node authorizer): bind ``system:node`` to ``system:nodes``."""
    obj = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "localcluster:nodes", "labels": {"app.kubernetes.io/managed-by": "localcluster"}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node"},
        "subjects": [{"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": "system:nodes"}],
    }
    resp = admin.ensure("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", obj)
    if not resp.ok:
        raise NodeError(f"creating the system:node ClusterRoleBinding failed: {resp}")
