"""Benchmark: audit webhook ingest over TLS -> buffer -> file (fsync), 400-event EventLists.

kubetrail runs as a child process with the ``kubernetes_audit`` input (TLS, client
certificate required, as the API server would connect) and the ``file`` output; this process
plays the API server with a few keep-alive connections posting pre-built EventLists and waits
for each 200. With ``storage.type memory`` kubetrail answers once the file sink fsynced the
batch; with ``storage.type filesystem`` once the batch is in the filesystem buffer (the file
sink then writes it from there). Both run in the same invocation, memory first as the baseline.
kubetrail's CPU time is read from /proc, so the client's own CPU is not counted.

    .venv/bin/python bench/bench_audit_webhook.py [--batches 1000] [--connections 4] [--filter]
        [--storage memory,filesystem]

Target (issue 5): at least 50,000 audit events/s on one core. The "per core" figure is
events / kubetrail CPU seconds (kubetrail is one asyncio thread plus the fsync thread).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from _common import REPO, audit_lines_file, cpu_count_hint

sys.path.insert(0, str(REPO / "cluster"))
from localcluster import pki

CONFIG = """
[SERVICE]
    log_level    warn
    storage.path {dir}/storage
[INPUT]
    name          kubernetes_audit
    tag           audit
    storage.type  {storage}
    listen        127.0.0.1
    port          {port}
    tls.crt_file  {dir}/tls.crt
    tls.key_file  {dir}/tls.key
    tls.ca_file   {dir}/ca.crt
{filter}
[OUTPUT]
    name   file
    match  *
    path   {dir}/out
    file   audit.jsonl
    format plain
    mkdir  on
"""

FILTER = "[FILTER]\n    name  kubernetes_audit\n    match *\n"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def client(port: int, ctx: ssl.SSLContext, bodies: list[bytes], latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1")
    for body in bodies:
        head = (
            "POST /audit?timeout=30s HTTP/1.1\r\nHost: kubetrail\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        started = time.perf_counter()
        writer.write(head + body)
        status = (await reader.readline()).split()[1]
        length = 0
        while (line := await reader.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        latencies.append(time.perf_counter() - started)
        if status != b"200":
            raise RuntimeError(f"kubetrail answered {status.decode()}")
    writer.close()


class Result(NamedTuple):
    wall: float
    cpu: float
    p50_ms: float
    p99_ms: float


def run_once(storage: str, bodies: list[bytes], events: int, connections: int, with_filter: bool) -> Result:
    """One kubetrail child process with ``storage.type`` ``storage``; every event must arrive."""
    work = Path(tempfile.mkdtemp(prefix="kubetrail-bench-"))
    try:
        ca = pki.make_ca("bench-ca")
        pki.write_cert(work / "ca.crt", ca.cert)
        pki.serving_cert(ca, "kubetrail").write(work / "tls.crt", work / "tls.key")
        pki.issue(ca, "kube-apiserver", client=True).write(work / "client.crt", work / "client.key")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        config = work / "bench.conf"
        config.write_text(CONFIG.format(port=port, dir=work, storage=storage, filter=FILTER if with_filter else ""))
        proc = subprocess.Popen([sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)])
        try:
            deadline = time.monotonic() + 20
            while True:
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("kubetrail did not start")
                time.sleep(0.05)
            ctx = ssl.create_default_context(cafile=str(work / "ca.crt"))
            ctx.load_cert_chain(work / "client.crt", work / "client.key")
            latencies: list[float] = []
            shares = [bodies[i::connections] for i in range(connections)]
            cpu_before = cpu_seconds(proc.pid)
            started = time.perf_counter()
            asyncio.run(_run_all(port, ctx, shares, latencies))
            wall = time.perf_counter() - started
            cpu = cpu_seconds(proc.pid) - cpu_before
        finally:
            proc.terminate()  # a clean stop drains the buffer into the file before exiting
            proc.wait(120)
        written = sum(1 for _ in (work / "out" / "audit.jsonl").open("rb"))
        if written != events:
            raise RuntimeError(f"{storage}: {written} of {events} events written")
        latencies.sort()
        return Result(wall, cpu, latencies[len(latencies) // 2] * 1000, latencies[int(len(latencies) * 0.99)] * 1000)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--filter", action="store_true", help="add the kubernetes_audit filter")
    parser.add_argument("--storage", default="memory,filesystem", help="storage.type values, the first is the baseline")
    args = parser.parse_args()
    storages = [part.strip() for part in args.storage.split(",") if part.strip()]
    per_batch = 400
    # Every event distinct (auditIDs unique): with the filter on, repeats would be deduplicated.
    needed = args.batches * per_batch
    source = audit_lines_file(100_000 if needed <= 100_000 else 1_000_000)
    with source.open("rb") as fh:
        lines = [line.rstrip(b"\n") for line in itertools.islice(fh, needed)]
    if len(lines) < needed:
        parser.error(f"at most {len(lines) // per_batch} batches")
    bodies = []
    for i in range(args.batches):
        items = b",".join(lines[i * per_batch : (i + 1) * per_batch])
        bodies.append(b'{"kind":"EventList","apiVersion":"audit.k8s.io/v1","metadata":{},"items":[' + items + b"]}")
    events = args.batches * per_batch
    results: dict[str, Result] = {}
    for storage in storages:
        try:
            results[storage] = run_once(storage, bodies, events, args.connections, args.filter)
        except RuntimeError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
    mb = sum(len(b) for b in bodies) / 1e6
    print(
        f"input: {args.batches} EventLists x {per_batch} events ({mb:.0f} MB), TLS with client certificate, "
        f"{args.connections} connections, filter {'on' if args.filter else 'off'} ({cpu_count_hint()})"
    )
    base = results[storages[0]]
    passed = True
    for storage, r in results.items():
        rate = events / r.cpu
        passed &= rate >= 50_000
        print(
            f"storage.type {storage:<10} {events / r.wall:>9,.0f} events/s wall  {rate:>9,.0f} events per kubetrail "
            f"CPU second  p50 {r.p50_ms:5.1f} ms p99 {r.p99_ms:5.1f} ms  cpu {r.cpu:5.2f} s in {r.wall:5.2f} s  "
            f"ratio vs {storages[0]} {base.wall / r.wall:.2f}x"
        )
    print(f"target >= 50,000 events/s on one core: {'PASS' if passed else 'MISS'}")
    return 0


async def _run_all(port: int, ctx: ssl.SSLContext, shares: list[list[bytes]], latencies: list[float]) -> None:
    await asyncio.gather(*(client(port, ctx, share, latencies) for share in shares))


if __name__ == "__main__":
    sys.exit(main())
