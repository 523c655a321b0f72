"""Benchmark: records/s through the ``http`` sink (json_lines, gzip on/off) to a loopback receiver,
against the ``file`` sink (format plain, fsync per batch) in the same run.

Input: audit events from bench/gen_audit.py (~1 KB each), in batches of 1,000 records
as the tail source hands them over: the original JSON lines (``raw_block``) plus lazily built
records. The sink's ``write`` is awaited batch after batch, as the sink runner does with one
worker. The receiver is an aiohttp server in another process (its CPU does not count here): it
reads each body (aiohttp undoes gzip), counts the lines and answers 204.

    .venv/bin/python bench/bench_http_sinks.py [--records 200000]

Variants: ``json_date_key false`` sends the input bytes as they are (the fast path);
``json_date_key date`` (the default) re-encodes each record with its time added.

A second table gives CPU seconds (this process's, the receiver's not included) of ``json`` and
``json_lines`` with the date key on batches as a ``json`` parser with ``time_format`` hands them
over (the block and each line's time, no record: the http output frames them natively), against
the ``file`` sink writing the same blocks ``plain``; ``--cpu-rounds`` rounds alternate them.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import orjson
from _sinks import BATCH, build, run_sink, timed_writes

from _common import audit_lines_file, cpu_count_hint
from kubetrail.core.block import ReadyBlock
from kubetrail.core.record import Batch
from kubetrail.sinks.file import FileSink
from kubetrail.sinks.http import HttpOutputSink


def receiver(port_queue: Any, stop: Any) -> None:
    from aiohttp import web

    received = [0]

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        received[0] += body.count(b"\n")
        return web.Response(status=204)

    async def main() -> None:
        app = web.Application(client_max_size=1024**3)
        app.router.add_post("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_queue.put(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        while not stop.is_set():
            await asyncio.sleep(0.05)
        port_queue.put(received[0])
        await runner.cleanup()

    asyncio.run(main())


def timed_batches(lines: list[bytes]) -> list[Batch]:
    """Batches as a json parser with ``time_format`` hands them over: the block with each line's
    time (what validation sets), records never built."""
    out = []
    for start in range(0, len(lines), BATCH):
        chunk = lines[start : start + BATCH]
        block = ReadyBlock(b"".join(chunk), len(chunk), list)
        block.times = array("q", [1_795_867_200_001_800_000 + (start + i) * 1_000_003 for i in range(len(chunk))])
        out.append(Batch("audit", None, block=block, size_bytes=len(block.source)))
    return out


async def sink_cpu(sink: Any, lines: list[bytes]) -> float:
    """CPU seconds of ``sink.write`` over :func:`timed_batches` (start and close not counted)."""
    return await timed_writes(sink, timed_batches(lines), time.process_time)


def cpu_table(port: int, lines: list[bytes], tmp: str, rounds: int) -> int:
    """The second table (see the module docstring); returns the lines the receiver must count."""
    variants: list[tuple[str, Any]] = [
        ("file (plain, fsync per batch)", lambda: build(FileSink, path=tmp, file="out.log", format="plain")),
        ("http json + date", lambda: build(HttpOutputSink, port=port, format="json")),
        ("http json_lines + date", lambda: build(HttpOutputSink, port=port, format="json_lines")),
    ]
    cpu: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _ in range(rounds):
        for name, make in variants:
            cpu[name].append(asyncio.run(sink_cpu(make(), lines)))
            Path(tmp, "out.log").unlink(missing_ok=True)
    print(f"CPU s of the sink's writes, blocks with times (median of {rounds}, all rounds):")
    base = sorted(cpu[variants[0][0]])[rounds // 2]
    for name, values in cpu.items():
        mid = sorted(values)[rounds // 2]
        print(f"  {name:38s} {mid:6.3f} ({', '.join(f'{v:.3f}' for v in values)})  {mid / base:.2f}x file")
    batches = -(-len(lines) // BATCH)
    return rounds * (batches + len(lines))  # the receiver counts newlines: json is one line a batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--cpu-rounds", type=int, default=3, help="rounds of the CPU table (0: skip it)")
    args = parser.parse_args()
    source = audit_lines_file(args.records)
    lines = source.read_bytes().splitlines(keepends=True)[: args.records]
    orjson.loads(lines[0])
    mb = sum(map(len, lines)) / 1e6
    print(f"{len(lines):,} records, {mb:.0f} MB, batches of {BATCH}; {cpu_count_hint()}")

    ctx = multiprocessing.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=receiver, args=(ports, stop), daemon=True)
    proc.start()
    port = ports.get(timeout=30)
    results: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="kubetrail-bench-") as tmp:
            variants: list[tuple[str, Any]] = [
                ("file (plain, fsync per batch)", lambda: build(FileSink, path=tmp, file="out.log", format="plain")),
                (
                    "http json_lines, no date key",
                    lambda: build(HttpOutputSink, port=port, format="json_lines", json_date_key="false"),
                ),
                (
                    "http json_lines, no date key, gzip",
                    lambda: build(
                        HttpOutputSink, port=port, format="json_lines", json_date_key="false", compress="gzip"
                    ),
                ),
                ("http json_lines + date", lambda: build(HttpOutputSink, port=port, format="json_lines")),
                (
                    "http json_lines + date, gzip",
                    lambda: build(HttpOutputSink, port=port, format="json_lines", compress="gzip"),
                ),
            ]
            for name, make in variants:
                results[name] = asyncio.run(run_sink(make(), lines))
                print(f"  {name:38s} {results[name]:>10,.0f} records/s")
            Path(tmp, "out.log").unlink(missing_ok=True)
            cpu_lines = cpu_table(port, lines, tmp, args.cpu_rounds) if args.cpu_rounds else 0
    finally:
        stop.set()
        port_queue_result = ports.get(timeout=30)
        proc.join(timeout=30)
    expected = len(lines) * (len(results) - 1) + cpu_lines
    assert port_queue_result == expected, f"receiver counted {port_queue_result} lines, expected {expected}"
    baseline = results["file (plain, fsync per batch)"]
    print("ratio to the file sink in the same run:")
    for name, rate in results.items():
        if name.startswith("http"):
            print(f"  {name:38s} {rate / baseline:.2f}x")


if __name__ == "__main__":
    main()
