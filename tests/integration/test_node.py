"""Container logs written by a real containerd and rotated by a real kubelet, read by kubetrail.

The node (``localcluster.node``: containerd + runc, CNI bridge, kubelet, kube-proxy) runs next
to a fresh control plane; busybox pods write numbered lines; kubetrail runs as a host process
with ``tail`` on ``/var/log/containers/*.log``, ``multiline.parser cri`` and the ``kubernetes``
filter, and writes to a file.  Every line must arrive exactly once, whole (a line over 16 KiB is
split by containerd into ``P`` pieces plus an ``F``), with its pod's metadata; also while the
kubelet rotates the file at 1 MiB.  The last test stops the node and checks that the host is as
before: no processes, mounts, iptables/nft rules, interfaces, cgroups, sysctl changes or paths.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localcluster import ClusterError, KubeAPI, LocalCluster
from tests import required
from tests.integration.kubetrail_proc import KubetrailProcess, file_output, read_records, wait_for
from tests.integration.nodecluster import busybox_pod, node_cluster, wait_pod_phase

pytestmark = [pytest.mark.cluster, pytest.mark.node]

ROOT = Path(__file__).resolve().parents[2]

BIG = 20_000  # bytes: over containerd's 16 KiB line limit, so the line is written as P + F
ROTATE_LINES = 20_000
PAD = "r" * 180


def _kubetrail_image_archive() -> list[str]:
    """The archive of ``scripts/image build``: cached, so this is quick unless kubetrail changed
    (then ~2 minutes; on a cold machine this module may run before test_node_chart.py builds it).
    Empty when the build fails: the one test that needs the image says so."""
    try:
        done = subprocess.run([str(ROOT / "scripts" / "image"), "build"], capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.SubprocessError):
        return []
    lines = done.stdout.strip().splitlines()
    return [lines[-1]] if done.returncode == 0 and lines and Path(lines[-1]).is_file() else []


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with node_cluster(
        tmp_path_factory.mktemp("node-cluster"),
        container_log_max_size="1Mi",
        container_log_max_files=5,
        container_log_monitor_interval="3s",
        images=_kubetrail_image_archive(),
    ) as c:
        yield c


@pytest.fixture(scope="module")
def admin(cluster: LocalCluster) -> KubeAPI:
    return cluster.client("admin")


def _namespace(admin: KubeAPI) -> str:
    name = f"ktnode-{uuid.uuid4().hex[:8]}"
    resp = admin.post("/api/v1/namespaces", {"metadata": {"name": name, "labels": {"suite": "node"}}})
    assert resp.status == 201, resp
    # kcm creates the namespace's `default` ServiceAccount; pods are refused until it exists.
    wait_for(lambda: admin.get(f"/api/v1/namespaces/{name}/serviceaccounts/default").ok, 30, "default SA")
    return name


def _config(cluster: LocalCluster, out: Path) -> str:
    assert cluster.node is not None
    return f"""
[SERVICE]
    log_level debug
    grace 5
[INPUT]
    name              tail
    path              /var/log/containers/*.log
    tag               kube.*
    read_from_head    on
    refresh_interval  1
    rotate_wait       30
    multiline.parser  cri
    db                {out}/tail.db
[FILTER]
    name              kubernetes
    match             kube.*
    kube_url          {cluster.url}
    kube_ca_file      {cluster.ca_file}
    kube_token_file   {cluster.collector_token_file}
    node_name         {cluster.node.name}
    namespace_labels  on
{file_output(out)}"""


def _ours(records: list[dict[str, Any]], namespace: str, pod: str) -> list[dict[str, Any]]:
    return [
        r
        for r in records
        if r.get("kubernetes", {}).get("namespace_name") == namespace and r["kubernetes"].get("pod_name") == pod
    ]


def _create(admin: KubeAPI, namespace: str, pod: dict[str, Any]) -> None:
    resp = admin.post(f"/api/v1/namespaces/{namespace}/pods", pod)
    assert resp.status == 201, resp


def test_node_is_ready_with_pinned_versions(cluster: LocalCluster, admin: KubeAPI) -> None:
    assert cluster.node is not None
    node = admin.get(f"/api/v1/nodes/{cluster.node.name}").json()
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True", node["status"]["conditions"]
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.36.3"
    assert info["containerRuntimeVersion"] == "containerd://2.4.2"
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == cluster.node.ip
    env = (cluster.dir / "env").read_text()
    for key in ("NODE_NAME", "BUSYBOX_IMAGE", "POD_LOG_DIR", "CONTAINER_LOG_DIR", "HELM", "KUBECTL"):
        assert f"export {key}=" in env, key
    # The `kubernetes` Service points at the node's address (lease endpoint reconciler), so
    # pods reach the API server through kube-proxy.
    slices = admin.get("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices").json()["items"]
    endpoints = [e["addresses"][0] for s in slices if s["metadata"]["name"] == "kubernetes" for e in s["endpoints"]]
    assert endpoints == [cluster.node.ip]


def test_pod_lines_exactly_once_with_metadata(cluster: LocalCluster, admin: KubeAPI, tmp_path: Path) -> None:
    assert cluster.node is not None
    ns = _namespace(admin)
    lines = 2000
    script = (
        f'i=1; while [ $i -le {lines} ]; do echo "out $i"; echo "err $i" >&2; i=$((i+1)); done; '
        f'big=$(head -c {BIG} /dev/zero | tr \'\\0\' x); echo "big-out $big"; echo "big-err $big" >&2; '
        # Not UTF-8: containerd passes the bytes through; kubetrail decodes with U+FFFD and counts.
        "printf 'bad-utf8 \\377\\376 end\\n'; "
        # After a pause: stdout and stderr reach containerd separately, so "last" needs time.
        "sleep 1; echo done-marker; sleep 3600 & wait"
    )
    out = tmp_path / "out"
    proc = KubetrailProcess(tmp_path, _config(cluster, out)).start()
    try:
        _create(admin, ns, busybox_pod("writer", script, labels={"app": "writer"}))
        pod = wait_pod_phase(admin, ns, "writer", ("Running", "Succeeded", "Failed"))
        expected = 2 * lines + 4

        def delivered() -> int:
            return len(_ours(read_records(out / "out.jsonl"), ns, "writer"))

        wait_for(lambda: delivered() >= expected, 90, f"{expected} lines of the pod delivered")
        time.sleep(2)  # anything repeated late would show up now
    finally:
        assert proc.stop() == 0
    pod = admin.get(f"/api/v1/namespaces/{ns}/pods/writer").json()
    records = _ours(read_records(out / "out.jsonl"), ns, "writer")
    counts = Counter((r["stream"], r["log"]) for r in records)
    want = Counter({("stdout", f"out {i}"): 1 for i in range(1, lines + 1)})
    want.update({("stderr", f"err {i}"): 1 for i in range(1, lines + 1)})
    want.update({("stdout", "big-out " + "x" * BIG): 1, ("stderr", "big-err " + "x" * BIG): 1})
    want.update({("stdout", "done-marker"): 1, ("stdout", "bad-utf8 \ufffd\ufffd end"): 1})
    assert counts == want, (
        f"missing {list((want - counts).keys())[:5]}, extra {list((counts - want).keys())[:5]}, {len(records)} records"
    )
    # Metadata from the real pod, its container as containerd runs it.
    status = pod["status"]["containerStatuses"][0]
    meta = records[0]["kubernetes"]
    assert meta["pod_id"] == pod["metadata"]["uid"]
    assert meta["labels"] == {"app": "writer"}
    assert meta["host"] == cluster.node.name
    assert meta["container_name"] == "app"
    assert meta["docker_id"] == status["containerID"].split("://", 1)[1]
    assert meta["container_image"] == status["image"]
    # No pod_ip: these lines are written (and read) within a second of the container's start,
    # before the kubelet has posted the pod's IP; the rotation test checks later lines have it.
    assert pod["status"]["podIP"].startswith("10.244.0.")
    assert records[0]["kubernetes_namespace"]["labels"]["suite"] == "node"
    assert all(r["_p"] == "F" for r in records)
    # The files as the kubelet and containerd laid them out, in CRI format.
    uid = pod["metadata"]["uid"]
    current = Path(f"/var/log/pods/{ns}_writer_{uid}/app/0.log")
    link = Path(f"/var/log/containers/writer_{ns}_app-{meta['docker_id']}.log")
    assert current.is_file() and link.is_symlink() and link.resolve() == current
    raw = current.read_bytes().splitlines()
    cri = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d) (stdout|stderr) (P|F) ")
    assert all(cri.match(line) for line in raw), raw[:3]
    assert sum(1 for line in raw if b" P " in line[:60]) >= 2  # the two big lines came in pieces
    assert "Traceback" not in proc.log()
    # `kubectl logs` path: apiserver -> kubelet:10250 with the apiserver's kubelet client cert.
    logs = admin.get(f"/api/v1/namespaces/{ns}/pods/writer/log", tailLines=1)
    assert logs.status == 200 and logs.body == b"done-marker\n", logs


IN_CLUSTER_CHECK = """
import json, os, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
url = "https://%s:%s" % (os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
ctx = ssl.create_default_context(cafile=sa + "/ca.crt")  # verifies the name (IP SAN) too
token = open(sa + "/token").read()
def call(path, body=None):
    req = urllib.request.Request(url + path, data=body and json.dumps(body).encode(), method="POST" if body else "GET",
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, context=ctx, timeout=10))
review = call("/apis/authentication.k8s.io/v1/selfsubjectreviews", {"apiVersion": "authentication.k8s.io/v1",
                                                                     "kind": "SelfSubjectReview"})
print(url, call("/version")["gitVersion"], review["status"]["userInfo"]["username"])
url = "https://kubernetes.default.svc"  # through the node's cluster DNS; a DNS SAN of the cert
print(url, call("/version")["gitVersion"])
"""


def test_pod_reaches_the_api_server_through_the_service(cluster: LocalCluster, admin: KubeAPI) -> None:
    """In-cluster config as a pod sees it: KUBERNETES_SERVICE_HOST (10.0.0.1, kube-proxy's DNAT to
    the node IP), the projected token and the CA, with TLS verification of the serving cert."""
    assert cluster.node is not None
    image = cluster.node.kubetrail_image
    if image is None:
        required.unavailable(
            "scripts/image build made no kubetrail image archive to import; busybox has no usable TLS",
            kind="node",
        )
    ns = _namespace(admin)
    pod = busybox_pod("incluster", "", image=image)
    pod["spec"]["containers"][0]["command"] = ["python3", "-c", IN_CLUSTER_CHECK]
    _create(admin, ns, pod)
    done = wait_pod_phase(admin, ns, "incluster", ("Succeeded", "Failed"), timeout=90)
    logs = admin.get(f"/api/v1/namespaces/{ns}/pods/incluster/log").body.decode()
    assert done["status"]["phase"] == "Succeeded", logs
    assert logs.strip().splitlines() == [
        f"https://10.0.0.1:443 v1.36.3 system:serviceaccount:{ns}:default",
        "https://kubernetes.default.svc v1.36.3",
    ], logs


def test_pods_resolve_cluster_names(cluster: LocalCluster, admin: KubeAPI) -> None:
    """CoreDNS on the node IP answers for cluster.local; pods get it as their nameserver."""
    assert cluster.node is not None
    ns = _namespace(admin)
    # busybox's nslookup does not walk the search list; the in-cluster test shows glibc's does.
    script = "cat /etc/resolv.conf; nslookup kubernetes.default.svc.cluster.local"
    _create(admin, ns, busybox_pod("dns", script))
    wait_pod_phase(admin, ns, "dns", ("Succeeded", "Failed"), timeout=60)
    logs = admin.get(f"/api/v1/namespaces/{ns}/pods/dns/log").body.decode()
    assert f"nameserver {cluster.node.ip}" in logs, logs
    assert f"search {ns}.svc.cluster.local svc.cluster.local cluster.local" in logs, logs
    answers = re.findall(r"Address: (\S+)", logs)
    assert answers == ["10.0.0.1"], logs


def test_kubelet_rotation_exactly_once(cluster: LocalCluster, admin: KubeAPI, tmp_path: Path) -> None:
    """The kubelet renames 0.log at 1 MiB (checked every 3 s) and gzips the previous one
    while the pod writes about 4 MB; every line still arrives once."""
    ns = _namespace(admin)
    script = (
        f'i=1; while [ $i -le {ROTATE_LINES} ]; do echo "rot $i {PAD}"; '
        "if [ $((i % 1000)) -eq 0 ]; then sleep 0.4; fi; i=$((i+1)); done; "
        "echo rot-done; sleep 3600 & wait"
    )
    out = tmp_path / "out"
    proc = KubetrailProcess(tmp_path, _config(cluster, out)).start()
    rotated: set[str] = set()
    stop = threading.Event()

    def watch_rotations() -> None:
        # Names of rotated files (0.log.<timestamp>[.gz]) seen while the pod writes.
        while not stop.is_set():
            for path in Path("/var/log/pods").glob(f"{ns}_rotator_*/app/0.log.*"):
                rotated.add(path.name.removesuffix(".gz"))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_rotations, daemon=True)
    watcher.start()
    try:
        _create(admin, ns, busybox_pod("rotator", script, labels={"app": "rotator"}))
        wait_pod_phase(admin, ns, "rotator", ("Running", "Succeeded", "Failed"))

        def done() -> bool:
            return any(r["log"] == "rot-done" for r in _ours(read_records(out / "out.jsonl"), ns, "rotator"))

        wait_for(done, 180, "the rotating pod's last line delivered")
        time.sleep(2)
    finally:
        stop.set()
        watcher.join(5)
        assert proc.stop() == 0
    records = _ours(read_records(out / "out.jsonl"), ns, "rotator")
    counts = Counter(r["log"] for r in records)
    want = Counter({f"rot {i} {PAD}": 1 for i in range(1, ROTATE_LINES + 1)})
    want["rot-done"] = 1
    assert counts == want, (
        f"missing {len(want - counts)} (first {sorted(want - counts)[:3]}), repeated {len(counts - want)}, "
        f"rotations seen {sorted(rotated)}"
    )
    assert len(rotated) >= 2, f"the kubelet rotated fewer than 2 times: {sorted(rotated)}"
    pod = admin.get(f"/api/v1/namespaces/{ns}/pods/rotator").json()
    last = next(r for r in records if r["log"] == "rot-done")["kubernetes"]
    assert last["pod_id"] == pod["metadata"]["uid"] and last["labels"] == {"app": "rotator"}
    assert last.get("pod_ip") == pod["status"]["podIP"], last  # the filter followed the pod's status update
    assert "Traceback" not in proc.log()


def test_a_second_node_is_refused_before_anything_starts(cluster: LocalCluster, tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="another node runs on this machine") as failure:
        LocalCluster.up(tmp_path / "second", controllers=True, nodes=1)
    assert "10250" in str(failure.value)
    assert not (tmp_path / "second" / "state.json").exists()


def test_down_leaves_nothing_behind(cluster: LocalCluster) -> None:
    """Runs last in this module: stops the node and the control plane, then looks at the host."""
    node = cluster.node
    assert node is not None
    pod_logs_existed = "/var/log/pods" not in node.absent_paths
    forward_before = node.sysctl_before["net.ipv4.ip_forward"]
    exes = {str(p) for p in node.bins.all_paths()}
    cluster.down()  # raises, naming them, if the node's own check finds leftovers

    def run(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout

    assert "KUBE-" not in run("iptables-save")
    assert "KUBE-" not in run("ip6tables-save")
    assert "KUBE" not in run("nft", "list", "ruleset")
    assert not Path("/sys/class/net/cni0").exists()
    assert "master cni0" not in run("ip", "link")
    assert str(node.dir) not in Path("/proc/self/mountinfo").read_text()
    assert not list(Path("/sys/fs/cgroup").glob("*/kubepods")) and not Path("/sys/fs/cgroup/kubepods").exists()
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == forward_before
    assert pod_logs_existed or not Path("/var/log/pods").exists()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                exe = os.readlink(proc / "exe")
            except OSError:
                continue
            assert exe not in exes, f"process {proc.name} ({exe}) survived down"
    for comp in [*cluster.components.values(), *node.components.values()]:
        assert not comp.alive(), comp.name
