"""The OpenTelemetry Collector for the opentelemetry and forward sinks' tests, built from Go modules.

``cluster/gomod/otelcol`` is a small wrapper main (otelcol + the OTLP receiver + the contrib
Fluent Forward receiver + the contrib file exporter) with a pinned go.mod/go.sum. The forward
receiver is the real forward-protocol server the ``forward`` sink is tested against (no Fluentd
or Fluent Bit can be installed here). It is built once into
``~/.cache/kubetrail/otelcol/<collector version>-<go version>-<source hash>/`` (``$KUBETRAIL_CACHE_DIR``
moves the cache) with the same build helper, environment and atomic rename as the control
plane (:mod:`localcluster.build`). A cold build (modules downloaded, nothing cached) took
about 1.5 minutes on this 2-core machine (92 s wall, module downloads included).

``python -m tests.servers.otelcol build`` builds it ahead of the tests (scripts/test calls it);
the fixture builds on demand too and skips with a message when Go or the module proxy is
missing. Each test gets its own collector on free ports, writing what it received through the
file exporter as OTLP/JSON lines, which the tests read back.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from tests.files import written_lines
from tests.servers import ServerProcess, ServerUnavailable, cache_root, free_port, port_open
from tests.timing import scaled

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cluster"))
# the module, not the function localcluster/__init__ exports under the same name
gobuild = importlib.import_module("localcluster.build")

GOMOD_DIR = Path(__file__).resolve().parents[2] / "cluster" / "gomod" / "otelcol"
BINARY = "otelcol-kubetrail"


def collector_version() -> str:
    return gobuild.module_version(GOMOD_DIR / "go.mod", "go.opentelemetry.io/collector/otelcol")


def source_hash() -> str:
    """Of the wrapper's files, so that a changed main.go or go.sum gets a fresh build."""
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update((GOMOD_DIR / name).read_bytes())
    return digest.hexdigest()[:12]


def binary_dir(go_version: str) -> Path:
    return cache_root() / "otelcol" / f"{collector_version()}-{go_version}-{source_hash()}"


def find_cached() -> Path | None:
    root = cache_root() / "otelcol"
    pattern = f"{collector_version()}-go*-{source_hash()}/{BINARY}"
    found = sorted(root.glob(pattern)) if root.is_dir() else []
    usable = [path for path in found if os.access(path, os.X_OK)]
    return usable[-1] if usable else None


def build(log: Any = sys.stderr) -> Path:
    """The collector binary, building it when it is not in the cache yet (idempotent)."""
    try:
        go = gobuild.find_go()
    except gobuild.GoNotFoundError as exc:
        cached = find_cached()
        if cached is not None:
            return cached
        raise ServerUnavailable(f"OpenTelemetry Collector: {exc}") from None
    out = binary_dir(gobuild.go_version(go))
    binary = out / BINARY
    if os.access(binary, os.X_OK):
        return binary
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"building the OpenTelemetry Collector {collector_version()} into {out}", file=log, flush=True)
    try:
        # Shared with the control-plane build: same static settings, temp dir + rename.
        gobuild._build_into(go, GOMOD_DIR, ["."], [BINARY], ["-ldflags=-s -w"], out, log)
    except gobuild.BuildError as exc:
        raise ServerUnavailable(f"building the OpenTelemetry Collector failed: {exc}") from None
    print(f"built {binary} in {time.monotonic() - started:.0f}s", file=log, flush=True)
    return binary


def _config(port: int, forward_port: int, forward_socket: Path, output: Path) -> str:
    return f"""
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{port}
  fluentforward:
    endpoint: 127.0.0.1:{forward_port}
  fluentforward/unix:
    endpoint: unix://{forward_socket}
exporters:
  file:
    path: {output}
    flush_interval: 50ms
service:
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
  pipelines:
    logs:
      receivers: [otlp, fluentforward, fluentforward/unix]
      exporters: [file]
"""


class Collector(ServerProcess):
    """One collector process: OTLP/HTTP on ``port``, the Fluent Forward protocol on ``forward_port``
    and the Unix socket ``forward_socket``; received logs in ``output`` (OTLP/JSON lines). A
    collector that does not start fails the test (RuntimeError), it is not skipped: the binary
    was there. Restartable: the work directory and what it received stay across :meth:`stop`."""

    name = "collector"
    start_error = RuntimeError
    stop_timeout = 20.0

    def __init__(self, binary: Path, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.log_path = workdir / "collector.log"
        self.port = free_port()
        self.forward_port = free_port()
        # Unix socket paths are limited to ~107 bytes: not under a test's long tmp_path.
        self.forward_socket = Path(tempfile.mkdtemp(prefix="ktff-")) / "forward.sock"
        self.output = workdir / "received.jsonl"
        self.proc = None

    def start(self, timeout: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.forward_socket.parent.mkdir(exist_ok=True)  # removed by stop()
        config = self.workdir / "config.yaml"
        config.write_text(_config(self.port, self.forward_port, self.forward_socket, self.output))
        if self.output.exists():  # the file exporter truncates its file: keep what a restart would lose
            self.output.rename(self.workdir / f"received-{len(list(self.workdir.glob('received*')))}.jsonl")
        self.start_attempts(
            lambda attempt: self.spawn([str(self.binary), "--config", str(config)]),
            lambda: True if port_open(self.port) and port_open(self.forward_port) else None,
            timeout,
            interval=0.05,
            attempts=1,
        )

    def stop(self) -> None:
        self.stop_process()
        shutil.rmtree(self.forward_socket.parent, ignore_errors=True)

    def requests(self) -> list[dict[str, Any]]:
        files = [*sorted(self.workdir.glob("received-*.jsonl")), self.output]
        return [orjson.loads(line) for path in files for line in written_lines(path) if line.strip()]

    def log_records(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Every received log record as (resource attributes, record), attributes flattened."""
        found = []
        for request in self.requests():
            for resource_logs in request.get("resourceLogs", []):
                resource = attributes(resource_logs.get("resource", {}).get("attributes", []))
                for scope_logs in resource_logs.get("scopeLogs", []):
                    for record in scope_logs.get("logRecords", []):
                        found.append((resource, record))
        return found

    def wait_for(self, count: int, timeout: float = 30.0) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        deadline = time.monotonic() + scaled(timeout)  # a loaded machine: see tests/timing.py
        while True:
            got = self.log_records()
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.05)


def any_value(value: dict[str, Any]) -> Any:
    """OTLP/JSON AnyValue -> Python."""
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "boolValue" in value:
        return value["boolValue"]
    if "kvlistValue" in value:
        return attributes(value["kvlistValue"].get("values", []))
    if "arrayValue" in value:
        return [any_value(v) for v in value["arrayValue"].get("values", [])]
    if "bytesValue" in value:
        return value["bytesValue"]
    return None


def attributes(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {item["key"]: any_value(item.get("value", {})) for item in items}


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit("usage: python -m tests.servers.otelcol build")
    try:
        print(build())
    except ServerUnavailable as exc:
        sys.exit(str(exc))
