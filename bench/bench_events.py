"""Benchmark: the kubernetes_events input against a real local control plane.

    .venv/bin/python bench/bench_events.py latency  [--present 10000 --seconds 60 --rate 100]
    .venv/bin/python bench/bench_events.py traffic  [--present 10000 --minutes 30 --rate 20]
    .venv/bin/python bench/bench_events.py rss      [--present 100000]
    .venv/bin/python bench/bench_events.py compression [--seconds 20 --rate 20]

latency  N events present, then RATE new events and RATE count updates per second: time from
         the API server's answer to the write until the record is in kubetrail's output file
         (p50, p99), kubetrail's CPU seconds and peak RSS. Target: p99 under 1 s.
traffic  bytes and requests kubetrail receives from the API server over MINUTES, first idle
         then under churn, beside a collector that re-lists every Event on every reconnect and
         every 10 minutes (Fluent Bit's behaviour), both measured through byte-counting TCP
         proxies in the same run. Target: at least 10x fewer bytes than re-listing.
rss      peak RSS of kubetrail during its first list with N events present. Target: < 100 MB.
compression  what gzip could do for the watch stream under churn: the raw bytes of a watch while
         RATE creates + RATE count updates per second run, against the same bytes gzipped one
         member per event (what Kubernetes 1.37's WatchListCompression sends, and only for
         WatchList requests; regular watches, which kubetrail uses, are never compressed) and as
         one gzip stream flushed after each event (which no API server sends).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import orjson

from _common import REPO, cpu_count_hint

sys.path.insert(0, str(REPO / "cluster"))
from localcluster import LocalCluster

NS = "bench"


class Writer:
    """Writes Events through aiohttp with a few requests in flight; records answer times."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.url = cluster.url
        self.ssl = ssl.create_default_context(cafile=str(cluster.ca_file))
        self.headers = {"Authorization": f"Bearer {cluster.admin_token}", "Content-Type": "application/json"}
        self.answered: dict[tuple[str, str], float] = {}
        self.objects: list[dict] = []  # type: ignore[type-arg]
        self.n = 0

    async def create(self, session: aiohttp.ClientSession, record: bool = True) -> None:
        self.n += 1
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {
            "metadata": {"name": f"e{self.n}-{os.getpid()}"},
            "count": 1,
            "type": "Normal",
            "involvedObject": {"kind": "Pod", "namespace": NS, "name": f"pod-{self.n % 500}"},
            "reason": "BackOff",
            "message": "Back-off restarting failed container app in pod " + "x" * 80,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": "kubelet", "host": "node-1"},
        }
        async with session.post(f"{self.url}/api/v1/namespaces/{NS}/events", json=body, ssl=self.ssl) as r:
            obj = await r.json()
            assert r.status == 201, obj
        if record:
            self.answered[(obj["metadata"]["uid"], obj["metadata"]["resourceVersion"])] = time.monotonic()
        self.objects.append(obj)

    async def bump(self, session: aiohttp.ClientSession) -> None:
        import random

        obj = random.choice(self.objects[-2000:])
        name = obj["metadata"]["name"]
        obj["count"] += 1
        async with session.patch(
            f"{self.url}/api/v1/namespaces/{NS}/events/{name}",
            ssl=self.ssl,
            data=orjson.dumps({"count": obj["count"]}),
            headers={**self.headers, "Content-Type": "application/merge-patch+json"},
        ) as r:
            new = await r.json()
            assert r.status == 200, new
        self.answered[(new["metadata"]["uid"], new["metadata"]["resourceVersion"])] = time.monotonic()

    async def populate(self, count: int) -> None:
        async with aiohttp.ClientSession(headers=self.headers) as session:
            sem = asyncio.Semaphore(16)

            async def one() -> None:
                async with sem:
                    await self.create(session, record=False)

            started = time.monotonic()
            for start in range(0, count, 1000):
                await asyncio.gather(*(one() for _ in range(min(1000, count - start))))
            print(f"  {count} events present ({count / (time.monotonic() - started):.0f} creates/s)", flush=True)

    async def churn(self, seconds: float, rate: int) -> None:
        async with aiohttp.ClientSession(headers=self.headers) as session:
            tasks: set[asyncio.Task[None]] = set()
            interval = 1.0 / rate
            end = time.monotonic() + seconds
            tick = time.monotonic()
            while tick < end:
                for coro in (self.create(session), self.bump(session)):
                    task = asyncio.create_task(coro)
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                tick += interval
                await asyncio.sleep(max(0.0, tick - time.monotonic()))
            await asyncio.gather(*tasks)


class OutputWatcher(threading.Thread):
    """Stamps each (uid, resourceVersion) with the time its line appeared in the output file."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.arrived: dict[tuple[str, str], float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        offset = 0
        pending = b""
        while not self.stop.is_set():
            if self.path.exists():
                with self.path.open("rb") as handle:
                    handle.seek(offset)
                    data = handle.read()
                if data:
                    now = time.monotonic()
                    offset += len(data)
                    lines = (pending + data).split(b"\n")
                    pending = lines.pop()
                    for line in lines:
                        meta = orjson.loads(line)["metadata"]
                        self.arrived.setdefault((meta["uid"], meta["resourceVersion"]), now)
            time.sleep(0.005)


def kubetrail_config(cluster: LocalCluster, work: Path, url: str | None = None) -> Path:
    config = work / "kubetrail.conf"
    config.write_text(f"""
[SERVICE]
    log_level warn
[INPUT]
    name              kubernetes_events
    kube_url          {url or cluster.url}
    kube_ca_file      {cluster.ca_file}
    kube_token_file   {cluster.collector_token_file}
    tls.vhost         127.0.0.1
    db                {work}/events.db
[OUTPUT]
    name   file
    match  *
    path   {work}
    file   events.jsonl
    format plain
""")
    return config


def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds, peak RSS MB) of a running process."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    with open(f"/proc/{pid}/status") as handle:
        hwm = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM"))
    return cpu, hwm / 1024


def start_kubetrail(config: Path, work: Path) -> subprocess.Popen[bytes]:
    log = (work / "kubetrail.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)], stdout=log, stderr=log
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def up(work: Path, **options: object) -> LocalCluster:
    cluster = LocalCluster.up(work / "cluster", log=open(os.devnull, "w"), **options)  # noqa: SIM115
    cluster.client("admin").post("/api/v1/namespaces", {"metadata": {"name": NS}})
    return cluster


def bench_latency(args: argparse.Namespace, work: Path) -> None:
    cluster = up(work, event_ttl="2h")
    try:
        writer = Writer(cluster)
        asyncio.run(writer.populate(args.present))
        watcher = OutputWatcher(work / "events.jsonl")
        watcher.start()
        proc = start_kubetrail(kubetrail_config(cluster, work), work)
        deadline = time.monotonic() + 300
        while len(watcher.arrived) < args.present and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu0, _ = proc_stats(proc.pid)
        print(
            f"  initial list of {args.present} delivered; churn {args.rate}+{args.rate}/s for {args.seconds}s",
            flush=True,
        )
        asyncio.run(writer.churn(args.seconds, args.rate))
        deadline = time.monotonic() + 30
        while not set(writer.answered) <= set(watcher.arrived) and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu1, rss = proc_stats(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        watcher.stop.set()
        lat = [watcher.arrived[k] - t for k, t in writer.answered.items() if k in watcher.arrived]
        missing = len(writer.answered) - len(lat)
        print(
            f"\nlatency, API answer -> kubetrail output ({len(lat)} occurrences, {missing} missing; {cpu_count_hint()})"
        )
        print(
            f"  p50 {statistics.median(lat) * 1000:.0f} ms   p99 {percentile(lat, 0.99) * 1000:.0f} ms   "
            f"max {max(lat) * 1000:.0f} ms"
        )
        print(
            f"  kubetrail CPU during churn {cpu1 - cpu0:.2f} s over {args.seconds} s "
            f"({(cpu1 - cpu0) / args.seconds * 100:.1f}% of one core); peak RSS {rss:.1f} MB"
        )
        print(f"  target p99 < 1 s: {'PASS' if percentile(lat, 0.99) < 1 and not missing else 'MISS'}")
    finally:
        cluster.down()


class CountingProxy:
    """A TCP proxy on loopback counting bytes from the API server and connections."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.down = 0
        self.connections = 0
        self.port = 0

    async def start(self) -> None:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            try:
                while data := await src.read(65536):
                    if count:
                        self.down += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))
        except asyncio.CancelledError:
            pass  # the benchmark is over


async def relisting_collector(url: str, cluster: LocalCluster, stop: asyncio.Event, stats: dict[str, int]) -> None:
    """Fluent Bit's kubernetes_events loop: list everything, watch until the 10-minute timeout
    (or any close), then list everything again."""
    ctx = ssl.create_default_context(cafile=str(cluster.ca_file))
    headers = {"Authorization": f"Bearer {cluster.collector_token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        while not stop.is_set():
            stats["requests"] += 1
            async with session.get(f"{url}/api/v1/events", ssl=ctx, server_hostname="127.0.0.1") as r:
                body = await r.json()
            rv = body["metadata"]["resourceVersion"]
            stats["requests"] += 1
            try:
                async with session.get(
                    f"{url}/api/v1/events",
                    ssl=ctx,
                    server_hostname="127.0.0.1",
                    params={"watch": "1", "resourceVersion": rv, "timeoutSeconds": "600"},
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=700),
                ) as r:
                    stop_wait = asyncio.ensure_future(stop.wait())
                    async for _chunk in r.content.iter_any():
                        if stop.is_set():
                            break
                    stop_wait.cancel()
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.5)


def bench_traffic(args: argparse.Namespace, work: Path) -> None:
    cluster = up(work, event_ttl="2h")
    try:
        writer = Writer(cluster)
        asyncio.run(writer.populate(args.present))
        api_port = int(cluster.url.rsplit(":", 1)[1])

        async def run() -> None:
            ours, theirs = CountingProxy(api_port), CountingProxy(api_port)
            await ours.start()
            await theirs.start()
            proc = start_kubetrail(kubetrail_config(cluster, work, f"https://127.0.0.1:{ours.port}"), work)
            stop = asyncio.Event()
            stats = {"requests": 0}
            baseline = asyncio.create_task(
                relisting_collector(f"https://127.0.0.1:{theirs.port}", cluster, stop, stats)
            )
            half = args.minutes * 30
            await asyncio.sleep(20)  # both have done their first list
            first = (ours.down, theirs.down)
            print(
                f"  first list: kubetrail {first[0] / 1e6:.1f} MB, re-listing collector {first[1] / 1e6:.1f} MB",
                flush=True,
            )
            await asyncio.sleep(half - 20)
            idle = (ours.down - first[0], theirs.down - first[1])
            print(
                f"  idle {half / 60:.1f} min: kubetrail {idle[0] / 1e6:.2f} MB, re-listing {idle[1] / 1e6:.2f} MB",
                flush=True,
            )
            await writer.churn(half, args.rate)
            churn = (ours.down - first[0] - idle[0], theirs.down - first[1] - idle[1])
            stop.set()
            baseline.cancel()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            print(
                f"\ntraffic from the API server over {args.minutes} min ({args.present} events present; "
                f"churn {args.rate}+{args.rate}/s in the second half)"
            )
            print(f"  {'':28} {'kubetrail':>12} {'re-listing':>12} {'ratio':>7}")
            for name, a, b in (
                ("first list", *first),
                ("idle (after first list)", *idle),
                ("churn", *churn),
                ("total", ours.down, theirs.down),
            ):
                print(f"  {name:28} {a / 1e6:>10.2f}MB {b / 1e6:>10.2f}MB {b / max(a, 1):>6.1f}x")
            print(f"  connections: kubetrail {ours.connections}, re-listing {theirs.connections}")
            print(f"  target >= 10x fewer bytes (total): {'PASS' if theirs.down >= 10 * ours.down else 'MISS'}")

        asyncio.run(run())
    finally:
        cluster.down()


def bench_rss(args: argparse.Namespace, work: Path) -> None:
    cluster = up(work, event_ttl="2h")
    try:
        writer = Writer(cluster)
        asyncio.run(writer.populate(args.present))
        proc = start_kubetrail(kubetrail_config(cluster, work), work)
        out = work / "events.jsonl"
        started = time.monotonic()
        while time.monotonic() - started < 600:
            if out.exists() and sum(1 for _ in out.open("rb")) >= args.present:
                break
            time.sleep(0.5)
        took = time.monotonic() - started
        cpu, rss = proc_stats(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        print(
            f"\nfirst list of {args.present} events: delivered in {took:.1f} s, CPU {cpu:.1f} s, "
            f"peak RSS {rss:.1f} MB   target < 100 MB: {'PASS' if rss < 100 else 'MISS'}"
        )
    finally:
        cluster.down()


def bench_compression(args: argparse.Namespace, work: Path) -> None:
    import zlib

    cluster = up(work)
    try:
        api = cluster.client("admin")
        rv = api.get(f"/api/v1/namespaces/{NS}/events").json()["metadata"]["resourceVersion"]
        lines: list[bytes] = []
        stop = threading.Event()

        def read() -> None:
            with api.watch(f"/api/v1/namespaces/{NS}/events", timeout=args.seconds + 30, resourceVersion=rv) as w:
                for event in w:
                    lines.append(orjson.dumps(event) + b"\n")  # compact JSON, as the API server writes
                    if stop.is_set():
                        break

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        writer = Writer(cluster)
        asyncio.run(writer.populate(50))  # something for count updates to hit
        asyncio.run(writer.churn(args.seconds, args.rate))
        time.sleep(2)
        stop.set()
        raw = sum(map(len, lines))
        per_member = sum(len(zlib.compress(line, 1, wbits=31)) for line in lines)  # the apiserver's level 1
        stream = zlib.compressobj(1, wbits=31)
        flushed = sum(len(stream.compress(line)) + len(stream.flush(zlib.Z_SYNC_FLUSH)) for line in lines)
        print(f"{len(lines)} watch events, {raw / len(lines):.0f} B each, {raw / 1e6:.2f} MB ({cpu_count_hint()})")
        print(f"  gzip, one member per event (k8s 1.37 WatchList): {per_member / 1e6:.2f} MB, {raw / per_member:.2f}x")
        print(f"  gzip, one stream flushed per event (no apiserver): {flushed / 1e6:.2f} MB, {raw / flushed:.2f}x")
    finally:
        cluster.down()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=("latency", "traffic", "rss", "compression"))
    parser.add_argument("--present", type=int)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=int)
    args = parser.parse_args()
    defaults = {"latency": (10_000, 100), "traffic": (10_000, 20), "rss": (100_000, 0), "compression": (0, 20)}[
        args.which
    ]
    args.present = args.present or defaults[0]
    args.rate = args.rate or defaults[1]
    with tempfile.TemporaryDirectory(prefix="kubetrail-bench-events-") as tmp:
        modes = {"latency": bench_latency, "traffic": bench_traffic, "rss": bench_rss, "compression": bench_compression}
        modes[args.which](args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
