"""Benchmark: records/s into each backend HTTP sink on loopback, batched, gzip on and off,
against the ``file`` sink in the same run.

Backends: ``es`` -> real Elasticsearch 7.10 and ``opensearch`` -> real OpenSearch 2.x (Maven
Central runners, ``tests/servers/search.py``), ``loki`` -> real Loki (built from its Go module,
``tests/servers/loki.py``), ``opentelemetry`` -> real OpenTelemetry Collector (OTLP/HTTP
protobuf, file exporter, ``tests/servers/otelcol.py``), ``splunk`` -> the fake HEC
(``tests/fakes/splunk.py``, Splunk cannot be installed here; run in its own process). Servers are
started one at a time, each stopped before the next, so they do not compete for the 2 cores.

Input: audit events from bench/gen_audit.py (~0.9 KB each) in batches of 1,000 records as
the tail source hands them over (``bench/_sinks.py``); each sink's ``write`` is awaited batch
after batch, as the sink runner does with one worker. A retryable answer (e.g. a 429) is retried
after a short pause and counted, so the figure includes it. After each run the records are
counted on the server (``_count`` after a refresh; a ``count_over_time`` query to Loki;
the collector's exported records; the fake's indexed events): every record must be there.

Baseline: the ``file`` sink (``format plain``, fsync per batch) at the start and at the end of
the run; ratios are against the mean of the two.

    .venv/bin/python bench/bench_backend_sinks.py [--records 100000] [--only es,loki,...]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import re
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from _sinks import batches, build

from _common import REPO, audit_lines_file, cpu_count_hint
from kubetrail.core.errors import RetryableError
from kubetrail.sinks.file import FileSink

sys.path.insert(0, str(REPO))  # tests.servers / tests.fakes


ERRORS: list[str] = []


async def drive(sink: Any, lines: list[bytes]) -> tuple[float, int, float]:
    """Records/s of ``sink.write`` over ``lines`` (retrying retryable failures), the retries, and
    this process's CPU time per record in microseconds (the sink's side; the server has its own)."""
    work = batches(lines)
    await sink.start()
    retries = 0
    started, cpu = time.perf_counter(), time.process_time()
    try:
        for batch in work:
            for _ in range(100):
                try:
                    await sink.write(batch)
                    break
                except RetryableError as exc:
                    retries += 1
                    if str(exc)[:300] not in ERRORS:
                        ERRORS.append(str(exc)[:300])
                        print(f"    retrying after: {ERRORS[-1]}", flush=True)
                    await asyncio.sleep(min(2.0, getattr(exc, "retry_after", None) or 0.2))
            else:
                raise RuntimeError("a batch failed 100 times")
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await sink.close()
    return len(lines) / elapsed, retries, cpu / len(lines) * 1e6


def http_json(url: str, method: str = "GET", body: bytes | None = None) -> Any:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return orjson.loads(response.read())


def wait_count(count: Callable[[], int], expected: int, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    got = count()
    while got < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        got = count()
    return got


def hec_process(port_q: Any, stop: Any) -> None:
    from tests.fakes.splunk import FakeHec

    async def main() -> None:
        hec = FakeHec(token="bench")
        await hec.start()
        port_q.put(hec.port)
        while not stop.is_set():
            await asyncio.sleep(0.05)
        port_q.put(len(hec.indexed))
        await hec.stop()

    asyncio.run(main())


Variant = tuple[str, dict[str, Any]]
GZIP: list[Variant] = [("", {}), (", gzip", {"compress": "gzip"})]


def bench_search(kind: str, lines: list[bytes], results: dict[str, tuple[float, int, float]]) -> None:
    from kubetrail.sinks.es import EsSink
    from kubetrail.sinks.opensearch import OpenSearchSink
    from tests.servers.search import SearchServer

    cls = OpenSearchSink if kind == "opensearch" else EsSink
    server = SearchServer(kind)
    server.start()
    try:
        for suffix, extra in GZIP:
            index = f"bench{suffix.replace(', ', '-')}"
            sink = build(cls, host="127.0.0.1", port=server.port, index=index, suppress_type_name="on", **extra)
            name = f"{cls.plugin_name} {server.version}{suffix}"
            results[name] = asyncio.run(drive(sink, lines))
            report(name, results[name])

            def count(index: str = index) -> int:
                http_json(f"{server.url}/{index}/_refresh", "POST")
                return int(http_json(f"{server.url}/{index}/_count")["count"])

            check(name, wait_count(count, len(lines)), len(lines))
    finally:
        server.stop()


def bench_loki(lines: list[bytes], results: dict[str, tuple[float, int, float]]) -> None:
    from kubetrail.sinks.loki import LokiSink
    from tests.servers.loki import Loki

    server = Loki()
    server.start()

    def count(job: str) -> int:
        # what Loki stored (a refused push is counted by its received-lines metric, so ask a query)
        query = urllib.parse.urlencode({"query": f'sum(count_over_time({{job="{job}"}}[1h]))'})
        result = http_json(f"{server.url}/loki/api/v1/query?{query}")["data"]["result"]
        return int(result[0]["value"][1]) if result else 0

    try:
        for n, (suffix, extra) in enumerate(GZIP):
            # one stream per verb (7): Loki limits each stream to 3 MB/s by default
            sink = build(LokiSink, host="127.0.0.1", port=server.port, labels=f"job=bench{n}, $verb", **extra)
            name = f"loki{suffix}"
            results[name] = asyncio.run(drive(sink, lines))
            report(name, results[name])
            check(name, wait_count(lambda n=n: count(f"bench{n}"), len(lines)), len(lines))
    finally:
        server.stop()


def bench_otel(lines: list[bytes], results: dict[str, tuple[float, int, float]]) -> None:
    from kubetrail.runtime.plugins import COMMON_OUTPUT_OPTIONS
    from kubetrail.sinks.opentelemetry import OpenTelemetrySink
    from tests.servers import otelcol
    from tests.unit.helpers import build as build_with_common

    with tempfile.TemporaryDirectory(prefix="kubetrail-bench-otel-") as tmp:
        collector = otelcol.Collector(otelcol.build(), Path(tmp))
        collector.start()
        records = re.compile(rb'"logRecords":\[')

        def count() -> int:
            # one exported line per request; count log records without decoding every body
            if not collector.output.exists():
                return 0
            return sum(len(rl) for rl in _otel_records(collector.output.read_bytes(), records))

        try:
            for n, (suffix, extra) in enumerate(GZIP):
                sink = build_with_common(OpenTelemetrySink, COMMON_OUTPUT_OPTIONS, port=collector.port, **extra)
                name = f"opentelemetry (protobuf){suffix}"
                results[name] = asyncio.run(drive(sink, lines))
                report(name, results[name])
                check(name, wait_count(count, len(lines) * (n + 1)) - len(lines) * n, len(lines))
        finally:
            collector.stop()


def _otel_records(data: bytes, marker: re.Pattern[bytes]) -> list[list[Any]]:
    out = []
    for line in data.splitlines():
        if not marker.search(line):
            continue
        request = orjson.loads(line)
        for resource_logs in request.get("resourceLogs", []):
            for scope_logs in resource_logs.get("scopeLogs", []):
                out.append(scope_logs.get("logRecords", []))
    return out


def bench_splunk(lines: list[bytes], results: dict[str, tuple[float, int, float]]) -> None:
    from kubetrail.sinks.splunk import SplunkSink

    mp = multiprocessing.get_context("spawn")
    port_q, stop = mp.Queue(), mp.Event()
    proc = mp.Process(target=hec_process, args=(port_q, stop), daemon=True)
    proc.start()
    port = port_q.get(timeout=60)
    names = []
    try:
        for suffix, extra in GZIP:
            sink = build(SplunkSink, host="127.0.0.1", port=port, splunk_token="bench", **extra)
            name = f"splunk (fake HEC){suffix}"
            results[name] = asyncio.run(drive(sink, lines))
            report(name, results[name])
            names.append(name)
    finally:
        stop.set()
        indexed = port_q.get(timeout=60)
        proc.join(timeout=30)
    check(" + ".join(names), indexed, len(lines) * len(names))


def bench_file(lines: list[bytes], results: dict[str, tuple[float, int, float]], name: str) -> None:
    with tempfile.TemporaryDirectory(prefix="kubetrail-bench-") as tmp:
        results[name] = asyncio.run(drive(build(FileSink, path=tmp, file="out.log", format="plain"), lines))
        report(name, results[name])
        check(name, Path(tmp, "out.log").read_bytes().count(b"\n"), len(lines))


def report(name: str, result: tuple[float, int, float]) -> None:
    print(
        f"  {name:40s} {result[0]:>10,.0f} records/s  sink CPU {result[2]:5.1f} us/record  retries {result[1]}",
        flush=True,
    )


FAILURES: list[str] = []


def check(name: str, got: int, expected: int) -> None:
    if got != expected:
        FAILURES.append(f"{name}: {got} records on the server, expected {expected}")
        print(f"  FAILED {FAILURES[-1]}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--only", default="opensearch,es,loki,splunk,opentelemetry")
    args = parser.parse_args()
    source = audit_lines_file(100_000 if args.records <= 100_000 else args.records)
    with source.open("rb") as handle:
        lines = [line for _, line in zip(range(args.records), handle, strict=False)]
    mb = sum(map(len, lines)) / 1e6
    print(f"{len(lines):,} records, {mb:.0f} MB, batches of 1000; {cpu_count_hint()}", flush=True)
    results: dict[str, tuple[float, int, float]] = {}
    bench_file(lines, results, "file (baseline, start)")
    for which in args.only.split(","):
        if which in ("es", "opensearch"):
            bench_search("elasticsearch" if which == "es" else "opensearch", lines, results)
        elif which == "loki":
            bench_loki(lines, results)
        elif which == "splunk":
            bench_splunk(lines, results)
        elif which == "opentelemetry":
            bench_otel(lines, results)
        else:
            raise SystemExit(f"unknown sink {which!r}")
    bench_file(lines, results, "file (baseline, end)")
    base = (results["file (baseline, start)"][0] + results["file (baseline, end)"][0]) / 2
    print(f"--- {cpu_count_hint()}; ratio to the file sink (mean of start and end: {base:,.0f} records/s)")
    for name, (rate, retries, cpu) in results.items():
        print(
            f"  {name:40s} {rate:>10,.0f} records/s  {rate / base:6.3f}x  "
            f"sink CPU {cpu:5.1f} us/record  retries {retries}"
        )
    for failure in FAILURES:
        print("FAILED:", failure, file=sys.stderr)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
