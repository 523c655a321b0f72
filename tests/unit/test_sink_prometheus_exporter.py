"""The ``prometheus_exporter`` output: kubetrail (a real process) routes its ``fluentbit_metrics``
records to it, and the page it serves is read with prometheus_client's own text parser, the
one Prometheus-compatible tools in Python use; malformed metric records and log records too."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetrail.core.errors import ConfigError, PermanentError
from kubetrail.core.record import Batch, Record
from kubetrail.runtime.plugins import COMMON_OUTPUT_OPTIONS, SINKS
from kubetrail.sinks.prometheus_exporter import PrometheusExporterSink
from tests.unit.helpers import build, write


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(response.read().decode())


def sink(**props: Any) -> PrometheusExporterSink:
    return build(PrometheusExporterSink, COMMON_OUTPUT_OPTIONS, **props)  # type: ignore[no-any-return]


def test_kubetrails_own_metrics_served_through_fluentbit_metrics(tmp_path: Path) -> None:
    assert SINKS["prometheus_exporter"] is PrometheusExporterSink
    port = free_port()
    config = write(tmp_path / "p.conf", f"""
[SERVICE]
    grace 2
[INPUT]
    name fluentbit_metrics
    tag metrics
    scrape_interval 0.2
    scrape_on_start on
[INPUT]
    name dummy
    tag logs
    rate 50
[OUTPUT]
    name prometheus_exporter
    match metrics
    host 127.0.0.1
    port {port}
    add_label node  worker-1
    add_label cluster prod
[OUTPUT]
    name null
    match logs
""")  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90  # the machine may be busy
        families: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                families = {f.name: f for f in text_string_to_metric_families(fetch(port))}
            except (urllib.error.URLError, OSError):
                families = {}
            records_in = families.get("kubetrail_records_in")
            if records_in and any(s.labels.get("plugin") == "null" and s.value > 0 for s in records_in.samples):
                break
            time.sleep(0.2)
        assert "kubetrail_records_in" in families, proc.stderr.read() if proc.poll() is not None else families
        records_in = families["kubetrail_records_in"]
        assert records_in.type == "counter"
        by_plugin = {s.labels["plugin"]: s for s in records_in.samples if s.name == "kubetrail_records_in_total"}
        assert by_plugin["null"].value > 0  # the dummy input's records reached the null output
        assert by_plugin["null"].labels["node"] == "worker-1" and by_plugin["null"].labels["cluster"] == "prod"
        latency = families["kubetrail_batch_latency_seconds"]
        assert latency.type == "histogram"
        assert any(s.name.endswith("_bucket") and s.labels.get("le") == "+Inf" for s in latency.samples)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0


async def test_latest_scrape_per_tag_malformed_records_rejected_and_logs_skipped() -> None:
    port = free_port()
    out = sink(host="127.0.0.1", port=port)
    await out.start()
    try:
        good = {"name": "queue_depth", "type": "gauge", "labels": {"q": 'a"b\\c\nd'}, "value": 3}
        gone = {"name": "old_series", "type": "gauge", "labels": {}, "value": 1}
        await out.write(Batch("m", [Record("m", 0, good), Record("m", 0, gone), Record("m", 0, {"log": "not metric"})]))
        await out.write(Batch("m", [Record("m", 0, {**good, "value": 7.5})]))  # the next scrape of tag m
        bad = [
            {"name": "1bad", "type": "gauge", "labels": {}, "value": 1},
            {"name": "ok", "type": "gauge", "labels": {"bad-label": "x"}, "value": 1},
            {"name": "ok", "type": "gauge", "labels": {}, "value": "many"},
            {"name": "ok", "type": "weird", "labels": {}, "value": 1},
        ]
        with pytest.raises(PermanentError) as info:
            await out.write(
                Batch("n", [Record("n", 0, b) for b in bad] + [Record("n", 0, {"name": "inf", "value": "+Inf"})])
            )
        assert len(info.value.rejected or []) == 4
        page = await asyncio.to_thread(fetch, port)
    finally:
        await out.close()
    families = {f.name: f for f in text_string_to_metric_families(page)}
    (sample,) = families["queue_depth"].samples
    assert sample.value == 7.5 and sample.labels == {"q": 'a"b\\c\nd'}  # escaped and read back
    assert families["inf"].samples[0].value == float("inf")
    assert "1bad" not in page
    assert "old_series" not in families  # not in tag m's latest scrape: gone, as in Fluent Bit


@pytest.mark.parametrize(("props", "key"), [({"port": "0"}, "port"), ({"add_label": "bad-name x"}, "add_label")])
def test_config_errors_name_the_key(props: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        sink(**props)
    assert info.value.key == key
