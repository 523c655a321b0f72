"""Benchmark: records/s through the ``forward`` and ``syslog`` (tcp) sinks to local receivers,
against the ``file`` sink (format plain, fsync per batch) in the same run.

Input: audit events from bench/gen_audit.py (~1 KB each) in batches of 1,000 records,
handed over as the tail source does (original JSON lines plus lazily built records); each
sink's ``write`` is awaited batch after batch (one worker, as the sink runner does).

Receivers, each in its own process so their CPU is not the sink's:

* forward: tests/fakes/forward_server.py (the fake Fluentd: decodes every event, answers acks),
  and the real OpenTelemetry Collector's ``fluentforward`` receiver (tests/servers/otelcol.py;
  it converts every event to an OTLP log record and writes them to a file, so it is slower);
* syslog: the real rsyslogd (Debian) with imtcp writing every message to a file; a plain TCP
  reader that counts octet-counted frames when rsyslog is not installed.

Every receiver's count is checked at the end (nothing lost).

    .venv/bin/python bench/bench_network_sinks.py [--records 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tempfile
from pathlib import Path
from typing import Any

from _sinks import BATCH, build, run_sink

from _common import REPO, audit_lines_file, cpu_count_hint
from kubetrail.sinks.file import FileSink
from kubetrail.sinks.forward import ForwardSink
from kubetrail.sinks.syslog import SyslogSink


def forward_receiver(port_queue: Any, stop: Any) -> None:
    sys.path.insert(0, str(REPO))
    from tests.fakes.forward_server import FakeForwardServer

    async def main() -> None:
        server = FakeForwardServer()
        await server.start()
        port_queue.put(server.port)
        while not stop.is_set():
            await asyncio.sleep(0.05)
            if len(server.events) > 200_000:
                server.events.clear()  # counted by message below; keep the memory bounded
        port_queue.put(sum(server.modes.values()))
        await server.stop()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()
    lines = audit_lines_file(args.records).read_bytes().splitlines(keepends=True)[: args.records]
    mb = sum(map(len, lines)) / 1e6
    print(f"{len(lines):,} records, {mb:.0f} MB, batches of {BATCH}; {cpu_count_hint()}")

    sys.path.insert(0, str(REPO))
    from tests.servers import otelcol, rsyslog

    ctx = multiprocessing.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=forward_receiver, args=(ports, stop), daemon=True)
    proc.start()
    fwd_port = ports.get(timeout=30)
    results: dict[str, float] = {}
    forward_variants = 0
    with tempfile.TemporaryDirectory(prefix="kubetrail-bench-") as tmp:
        syslog_server = rsyslog.RsyslogServer(Path(tmp) / "rsyslog") if rsyslog.rsyslogd() else None
        if syslog_server is None:
            sys.exit("rsyslogd is not installed (scripts/setup installs it)")
        syslog_server.start()
        collector = otelcol.Collector(otelcol.build(), Path(tmp) / "otelcol")
        collector.start()
        try:
            variants: list[tuple[str, Any]] = [
                ("file (plain, fsync per batch)", lambda: build(FileSink, path=tmp, file="out.log", format="plain")),
                ("forward packed_forward", lambda: build(ForwardSink, port=fwd_port)),
                (
                    "forward + require_ack_response",
                    lambda: build(ForwardSink, port=fwd_port, require_ack_response="on"),
                ),
                (
                    "forward + ack + compress gzip",
                    lambda: build(ForwardSink, port=fwd_port, require_ack_response="on", compress="gzip"),
                ),
                (
                    f"forward + ack -> otelcol {otelcol.collector_version()} fluentforward",
                    lambda: build(ForwardSink, port=collector.forward_port, require_ack_response="on"),
                ),
                (
                    f"syslog tcp rfc5424 -> rsyslogd {rsyslog.version().split()[1]}",
                    lambda: build(SyslogSink, mode="tcp", port=syslog_server.tcp_port, syslog_maxsize=16384),
                ),
            ]
            for name, make in variants:
                results[name] = asyncio.run(run_sink(make(), lines))
                forward_variants += name.startswith("forward") and "otelcol" not in name
                print(f"  {name:42s} {results[name]:>10,.0f} records/s")
            received = len(syslog_server.wait_for(len(lines), timeout=120))
            collected = len(collector.wait_for(len(lines), timeout=120))
        finally:
            collector.stop()
            syslog_server.stop()
            stop.set()
    forward_messages = ports.get(timeout=30)
    proc.join(timeout=30)
    batches_per_run = -(-len(lines) // BATCH)
    assert forward_messages == batches_per_run * forward_variants, forward_messages
    assert received == len(lines), f"rsyslog wrote {received} of {len(lines)} messages"
    assert collected == len(lines), f"the collector exported {collected} of {len(lines)} records"
    baseline = results["file (plain, fsync per batch)"]
    print("ratio to the file sink in the same run:")
    for name, rate in results.items():
        if not name.startswith("file"):
            print(f"  {name:42s} {rate / baseline:.2f}x")


if __name__ == "__main__":
    main()
