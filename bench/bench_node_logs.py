"""kubetrail's `logs` DaemonSet on a real node, installed by its Helm chart, under load.

20 busybox pods write numbered lines (about 1,000 lines/s each, 20,000 lines/s together) for
``--seconds`` (120); containerd writes them in CRI format, the kubelet rotates; the chart's
DaemonSet pod tails them with the `kubernetes` filter and writes them with the `file` output to a
hostPath. While it runs, this script reads the output as it grows and takes, per line, the
latency from the container runtime's timestamp to the moment the line is seen in the output
(read every 100 ms, so up to 0.1 s is the reader's own). The kubetrail pod's CPU and memory come
from its cgroup (cgroup v1: cpuacct.usage, memory.stat total_rss).

The baseline in the same run is what the pods produced: delivered lines/s against produced
lines/s (1.00 = keeps up), and the latency of the first 30 s against the last 30 s (no growing
lag). Needs root, Go and the image (``scripts/image build``); run:

    sudo .venv/bin/python bench/bench_node_logs.py [--pods 20] [--rate 1000] [--seconds 120]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "cluster"))

from localcluster import LocalCluster  # noqa: E402

WRITER = """end=$(( $(date +%s) + {seconds} )); n=0
while [ $(date +%s) -lt $end ]; do
  seq $((n+1)) $((n+{burst})) | sed "s/^/L $POD /"; n=$((n+{burst})); usleep {pause_us}
done
echo "DONE $POD $n"; sleep 3600 & wait"""


def _cri_epoch(stamp: str) -> float:
    # 2026-12-05T03:50:15.341972633Z -> float seconds (microseconds are plenty here)
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (frac or "0"))


class OutputReader(threading.Thread):
    """Follows the output file(s) and records (pod, n) -> latency as lines appear."""

    def __init__(self, out: Path, namespace: str) -> None:
        super().__init__(daemon=True)
        self.out, self.namespace = out, namespace
        self.offsets: dict[Path, int] = {}
        self.seen: dict[tuple[str, int], float] = {}
        self.duplicates = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            time.sleep(0.1)

    def poll(self) -> None:
        for path in self.out.glob("*.jsonl"):
            offset = self.offsets.get(path, 0)
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read()
            end = data.rfind(b"\n") + 1
            self.offsets[path] = offset + end
            now = time.time()
            for line in data[:end].splitlines():
                record = json.loads(line)
                if record.get("kubernetes", {}).get("namespace_name") != self.namespace:
                    continue
                words = record.get("log", "").split(" ")
                if len(words) != 3 or words[0] != "L":
                    continue
                key = (words[1], int(words[2]))
                with self.lock:
                    if key in self.seen:
                        self.duplicates += 1
                    else:
                        self.seen[key] = now - _cri_epoch(record["time"])


def _cgroup_dir(controller: str, pod_uid: str) -> Path:
    base = Path("/sys/fs/cgroup") / controller / "kubepods"
    for path in base.rglob(f"pod{pod_uid}"):
        return path
    raise SystemExit(f"no {controller} cgroup for pod {pod_uid} under {base}")


def _rss(memory_dir: Path) -> int:
    for line in (memory_dir / "memory.stat").read_text().splitlines():
        if line.startswith("total_rss "):
            return int(line.split()[1])
    return 0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=20)
    parser.add_argument("--rate", type=int, default=1000, help="lines/s per pod (aimed at)")
    parser.add_argument("--seconds", type=int, default=120)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (a real node)")
    image = subprocess.run([str(REPO / "scripts" / "image"), "build"], capture_output=True, text=True, check=True)
    archive = image.stdout.strip().splitlines()[-1]
    work = Path(tempfile.mkdtemp(prefix="bench-node-"))
    out = Path("/var/lib") / f"kubetrail-bench-{uuid.uuid4().hex[:8]}"
    out.mkdir(mode=0o777)
    cluster = LocalCluster.up(work / "cluster", controllers=True, nodes=1, images=[archive], log=sys.stderr)
    try:
        run(cluster, args, out, work)
    finally:
        cluster.down()
        subprocess.run(["rm", "-rf", str(out)], check=False)


def run(cluster: LocalCluster, args: argparse.Namespace, out: Path, work: Path) -> None:
    admin = cluster.client("admin")
    assert cluster.helm is not None
    values = {
        "image": {"repository": "localhost/kubetrail", "pullPolicy": "Never"},
        "config": {
            "outputs": "[OUTPUT]\n    name file\n    match *\n    path /out\n    file ${POD_NAME}.jsonl\n"
            "    format plain\n    mkdir on\n"
        },
        "events": {"enabled": False},
        "configCheck": {"enabled": False},
        "extraVolumes": [{"name": "out", "hostPath": {"path": str(out), "type": "Directory"}}],
        "extraVolumeMounts": [{"name": "out", "mountPath": "/out"}],
        "logs": {"kubernetesFilter": {"merge_log": "off", "labels": "on", "annotations": "off"}},
    }
    (work / "values.json").write_text(json.dumps(values))
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "HELM_CACHE_HOME": str(work / "hc"),
        "HELM_CONFIG_HOME": str(work / "hcfg"),
        "HELM_DATA_HOME": str(work / "hd"),
    }
    admin.post("/api/v1/namespaces", {"metadata": {"name": "kt-bench"}})
    subprocess.run(
        [
            str(cluster.helm),
            "install",
            "kt",
            str(REPO / "deploy/helm/kubetrail"),
            "-n",
            "kt-bench",
            "-f",
            str(work / "values.json"),
            "--wait",
            "--timeout",
            "300s",
        ],
        env=env,
        check=True,
    )
    selector = "app.kubernetes.io/component=logs"
    pod = admin.get("/api/v1/namespaces/kt-bench/pods", labelSelector=selector).json()["items"][0]
    cpu_dir = _cgroup_dir("cpuacct", pod["metadata"]["uid"])
    mem_dir = _cgroup_dir("memory", pod["metadata"]["uid"])

    ns = "bench"
    admin.post("/api/v1/namespaces", {"metadata": {"name": ns}})
    while not admin.get(f"/api/v1/namespaces/{ns}/serviceaccounts/default").ok:
        time.sleep(0.5)
    burst = max(1, args.rate // 10)
    script = WRITER.format(seconds=args.seconds, burst=burst, pause_us=90_000)
    reader = OutputReader(out, ns)
    reader.start()
    cpu0, wall0 = int((cpu_dir / "cpuacct.usage").read_text()), time.monotonic()
    peak_rss = 0
    for i in range(args.pods):
        body = {
            "metadata": {"name": f"w{i}"},
            "spec": {
                "restartPolicy": "Never",
                "dnsPolicy": "Default",
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "w",
                        "image": "localhost/busybox:latest",
                        "imagePullPolicy": "Never",
                        "command": ["sh", "-c", script],
                        "env": [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                    }
                ],
            },
        }
        admin.post(f"/api/v1/namespaces/{ns}/pods", body)
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + args.seconds + 60
    produced: dict[str, int] = {}
    while time.monotonic() < deadline:
        time.sleep(2)
        peak_rss = max(peak_rss, _rss(mem_dir))
        with reader.lock:
            samples.append((time.monotonic() - wall0, len(reader.seen)))
        produced = _produced(ns)
        if len(produced) == args.pods and all(v is not None for v in produced.values()):
            total = sum(produced.values())
            if len(reader.seen) >= total:
                break
    cpu1, wall1 = int((cpu_dir / "cpuacct.usage").read_text()), time.monotonic()
    reader.stop.set()
    reader.join()
    reader.poll()
    total_produced = sum(v or 0 for v in produced.values())
    latencies = list(reader.seen.values())
    first = [reader.seen[k] for k in list(reader.seen)[: len(reader.seen) // 4]]
    last = [reader.seen[k] for k in list(reader.seen)[-len(reader.seen) // 4 :]]
    elapsed = args.seconds
    print(f"pods {args.pods}, aimed {args.pods * args.rate:,} lines/s for {args.seconds} s")
    print(f"produced  {total_produced:,} lines ({total_produced / elapsed:,.0f} lines/s)")
    print(
        f"delivered {len(reader.seen):,} lines, {reader.duplicates} repeated, "
        f"{total_produced - len(reader.seen):,} missing"
    )
    print(f"delivered / produced: {len(reader.seen) / max(1, total_produced):.4f}")
    print(
        f"latency write->output p50 {statistics.median(latencies):.3f} s, p99 {_percentile(latencies, 0.99):.3f} s, "
        f"max {max(latencies):.3f} s"
    )
    print(
        f"latency first quarter p50 {statistics.median(first):.3f} s / last quarter p50 "
        f"{statistics.median(last):.3f} s (growing lag if the second is much larger)"
    )
    cores = (cpu1 - cpu0) / 1e9 / (wall1 - wall0)
    print(f"kubetrail pod CPU {cores:.3f} cores (avg over {wall1 - wall0:.0f} s), peak RSS {peak_rss / 2**20:.0f} MiB")
    print(f"CPU per 100k lines: {(cpu1 - cpu0) / 1e9 / max(1, len(reader.seen)) * 1e5:.2f} CPU-s")


def _produced(namespace: str) -> dict[str, int | None]:
    """Lines each writer pod wrote, from its DONE line in its CRI log (None while it writes)."""
    result: dict[str, int | None] = {}
    for directory in Path("/var/log/pods").glob(f"{namespace}_*"):
        pod = directory.name.split("_")[1]
        result[pod] = None
        for log in (directory / "w").glob("*.log"):
            tail = subprocess.run(["tail", "-n", "3", str(log)], capture_output=True, text=True).stdout
            for line in tail.splitlines():
                if " DONE " in line:
                    result[pod] = int(line.rsplit(" ", 1)[1])
    return result


if __name__ == "__main__":
    main()
