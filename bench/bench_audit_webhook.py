"""Benchmark: audit webhook ingest over TLS -> file (fsync), 400-event EventLists.

kubetrail runs as a child process with the ``kubernetes_audit`` input (TLS, client
certificate required, as the API server would connect) and the ``file`` output; this process
plays the API server with a few keep-alive connections posting pre-built EventLists and waits
for each 200 (which kubetrail sends only after the file sink fsynced the batch). kubetrail's
CPU time is read from /proc, so the client's own CPU is not counted.

    .venv/bin/python bench/bench_audit_webhook.py [--batches 1000] [--connections 4] [--filter]

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

from _common import REPO, audit_lines_file, cpu_count_hint

sys.path.insert(0, str(REPO / "cluster"))
from localcluster import pki

CONFIG = """
[SERVICE]
    log_level warn
[INPUT]
    name          kubernetes_audit
    tag           audit
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--filter", action="store_true", help="add the kubernetes_audit filter")
    args = parser.parse_args()
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
        config.write_text(CONFIG.format(port=port, dir=work, filter=FILTER if args.filter else ""))
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
            shares = [bodies[i :: args.connections] for i in range(args.connections)]
            cpu_before = cpu_seconds(proc.pid)
            started = time.perf_counter()
            asyncio.run(_run_all(port, ctx, shares, latencies))
            wall = time.perf_counter() - started
            cpu = cpu_seconds(proc.pid) - cpu_before
        finally:
            proc.terminate()
            proc.wait(30)
        written = sum(1 for _ in (work / "out" / "audit.jsonl").open("rb"))
        events = args.batches * per_batch
        if written != events:
            print(f"FAILED: {written} of {events} events written", file=sys.stderr)
            return 1
        latencies.sort()
        p50 = latencies[len(latencies) // 2] * 1000
        p99 = latencies[int(len(latencies) * 0.99)] * 1000
        mb = sum(len(b) for b in bodies) / 1e6
        print(
            f"input: {args.batches} EventLists x {per_batch} events ({mb:.0f} MB), TLS with client certificate, "
            f"{args.connections} connections, filter {'on' if args.filter else 'off'} ({cpu_count_hint()})"
        )
        print(
            f"{events / wall:>10,.0f} events/s wall   {events / cpu:>10,.0f} events per kubetrail CPU second   "
            f"request latency p50 {p50:.1f} ms p99 {p99:.1f} ms   kubetrail cpu {cpu:.2f} s in {wall:.2f} s"
        )
        rate = events / cpu
        print(f"target >= 50,000 events/s on one core: {'PASS' if rate >= 50_000 else 'MISS'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


async def _run_all(port: int, ctx: ssl.SSLContext, shares: list[list[bytes]], latencies: list[float]) -> None:
    await asyncio.gather(*(client(port, ctx, share, latencies) for share in shares))


if __name__ == "__main__":
    sys.exit(main())
