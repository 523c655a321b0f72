"""The opentelemetry sink against a real OpenTelemetry Collector (built from its Go modules,
see tests/servers/otelcol.py): what the collector's file exporter wrote is compared with the
records sent. Partial success is the one answer the collector's OTLP receiver never gives, so
that case alone runs against a small aiohttp server returning the documented response.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import orjson
import pytest
from aiohttp import web
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

from kubetrail.core.errors import ConfigError, PermanentError, RetryableError
from kubetrail.core.metrics import MetricsRegistry
from kubetrail.core.record import Batch, Record, identity_key
from kubetrail.runtime.plugins import COMMON_OUTPUT_OPTIONS
from kubetrail.runtime.sink_runner import SinkRunner
from kubetrail.sinks.opentelemetry import OpenTelemetrySink
from tests.servers import free_port, otelcol
from tests.unit.helpers import build

T0 = 1_704_164_645_123_456_789


def sink(port: int, **props: Any) -> OpenTelemetrySink:
    return build(OpenTelemetrySink, COMMON_OUTPUT_OPTIONS, port=port, **props)  # type: ignore[no-any-return]


def container_log(i: int, **extra: Any) -> Record:
    body = {
        "time": "ignored",
        "stream": "stdout",
        "message": f"line {i}",
        "id": f"r{i}",
        "level": "warn",
        "kubernetes": {
            "namespace_name": "shop",
            "pod_name": "web-7d9f",
            "pod_id": "7b0c-uid",
            "container_name": "nginx",
            "host": "node-1",
            "docker_id": "abc123",
            "container_image": "docker.io/library/nginx:1.27",
            "labels": {"app": "web"},
        },
        **extra,
    }
    return Record("kube.var.log", T0 + i, body, identity=("file", i))


def k8s_event(i: int, kind: str = "Warning") -> Record:
    body = {
        "kind": "Event",
        "apiVersion": "v1",
        "metadata": {"name": f"web-7d9f.{i}", "namespace": "shop", "uid": f"ev-{i}", "resourceVersion": "42"},
        "involvedObject": {"kind": "Pod", "name": "web-7d9f", "namespace": "shop", "uid": "7b0c-uid",
                           "apiVersion": "v1", "fieldPath": "spec.containers{nginx}"},
        "reason": "BackOff",
        "message": "Back-off restarting failed container",
        "type": kind,
        "count": 3,
        "firstTimestamp": "2024-01-02T03:00:00Z",
        "source": {"component": "kubelet", "host": "node-1"},
    }  # fmt: skip
    return Record("kube.events", T0 + i, body, identity=(f"ev-{i}", "42"))


@pytest.mark.parametrize(
    "props",
    [{}, {"encoding": "json"}, {"compress": "gzip"}, {"encoding": "json", "compress": "gzip"}],
    ids=["protobuf", "json", "protobuf-gzip", "json-gzip"],
)
async def test_container_logs_and_events_read_back(collector: otelcol.Collector, props: dict[str, str]) -> None:
    out = sink(collector.port, add_label="k8s.cluster.name prod-1", **props)
    await out.start()
    await out.write(Batch("mixed", [container_log(0), container_log(1, level="error"), k8s_event(2)]))
    await out.close()
    got = collector.wait_for(3)
    assert len(got) == 3
    by_body = {record["body"]["stringValue"]: (resource, record) for resource, record in got}

    resource, log = by_body["line 0"]
    assert resource == {
        "k8s.cluster.name": "prod-1",
        "k8s.namespace.name": "shop",
        "k8s.pod.name": "web-7d9f",
        "k8s.pod.uid": "7b0c-uid",
        "k8s.container.name": "nginx",
        "k8s.node.name": "node-1",
        "container.id": "abc123",
        "container.image.name": "docker.io/library/nginx",
        "container.image.tag": "1.27",
        "k8s.pod.label.app": "web",
    }
    assert log["timeUnixNano"] == str(T0)  # nanoseconds, all nine digits
    assert int(log["observedTimeUnixNano"]) > T0
    assert (log["severityNumber"], log["severityText"]) == (13, "warn")
    attrs = otelcol.attributes(log["attributes"])
    assert attrs == {
        "time": "ignored",
        "stream": "stdout",
        "id": "r0",
        "log.record.uid": identity_key(container_log(0)),
    }
    assert by_body["line 1"][1]["severityNumber"] == 17
    assert by_body["line 1"][0] == resource  # same resource, one ResourceLogs

    resource, log = by_body["Back-off restarting failed container"]
    assert resource == {
        "k8s.cluster.name": "prod-1",
        "k8s.namespace.name": "shop",
        "k8s.pod.name": "web-7d9f",
        "k8s.pod.uid": "7b0c-uid",
        "k8s.object.kind": "Pod",
        "k8s.object.name": "web-7d9f",
        "k8s.object.uid": "7b0c-uid",
        "k8s.object.fieldpath": "spec.containers{nginx}",
        "k8s.object.api_version": "v1",
    }
    assert log["eventName"] == "k8s.event"
    assert (log["severityNumber"], log["severityText"]) == (13, "Warning")
    assert otelcol.attributes(log["attributes"]) == {
        "k8s.event.uid": "ev-2",
        "k8s.event.name": "web-7d9f.2",
        "k8s.event.reason": "BackOff",
        "k8s.event.count": 3,
        "k8s.event.start_time": "2024-01-02T03:00:00Z",
        "k8s.event.reporting_component": "kubelet",
        "log.record.uid": identity_key(k8s_event(2)),
    }
    assert len(collector.requests()) == 1
    assert len(collector.requests()[0]["resourceLogs"]) == 2


async def test_whole_record_as_body_nested_values_and_ids(collector: otelcol.Collector) -> None:
    record = Record(
        "app",
        T0,
        {
            "a": {"b": [1, 2.5, True, None, "x"]},
            "traceId": "5b8efff798038103d269b633813fc60c",
            "spanId": "eee19b7ec3c1b174",
        },
    )
    out = sink(collector.port, encoding="json")
    await out.write(Batch("app", [record, Record("app", T0, {"msg": "m", "severityNumber": 21, "big": 2**70})]))
    await out.close()
    got = collector.wait_for(2)
    first = next(r for _, r in got if "kvlistValue" in r["body"])
    assert otelcol.any_value(first["body"]) == {"a": {"b": [1, 2.5, True, None, "x"]}}
    assert (first["traceId"], first["spanId"]) == ("5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174")
    second = next(r for _, r in got if "stringValue" in r["body"])
    assert second["severityNumber"] == 21
    assert otelcol.attributes(second["attributes"]) == {"big": str(2**70)}  # beyond int64: kept as text


async def test_collector_down_then_back_loses_nothing(collector: otelcol.Collector) -> None:
    out = sink(collector.port, **{"net.connect_timeout": "2s"})
    metrics = MetricsRegistry().component("otel.0", "output", "opentelemetry")
    runner = SinkRunner(out, "otel.0", metrics, logging.getLogger("test"), None, backoff_base=0.05)
    runner.start()
    await runner.enqueue(Batch("t", [container_log(i) for i in range(100)]))
    await asyncio.to_thread(collector.wait_for, 100)
    await asyncio.to_thread(collector.stop)
    for start in (100, 200):
        await runner.enqueue(Batch("t", [container_log(i) for i in range(start, start + 100)]))
    async with asyncio.timeout(30):
        while metrics.retries._value.get() < 2:
            await asyncio.sleep(0.05)
    await asyncio.to_thread(collector.start)  # same port, same output file
    await asyncio.wait_for(runner.drain(), 60)
    await out.close()
    got = await asyncio.to_thread(collector.wait_for, 300)
    ids = Counter(otelcol.attributes(r["attributes"])["id"] for _, r in got)
    assert ids == Counter({f"r{i}": 1 for i in range(300)})


async def test_wrong_logs_uri_is_retryable_with_the_status(collector: otelcol.Collector) -> None:
    out = sink(collector.port, logs_uri="/v1/nothing")
    with pytest.raises(RetryableError, match="HTTP 404"):
        await out.write(Batch("t", [container_log(0)]))
    await out.close()


async def test_unencodable_record_rejected_alone(collector: otelcol.Collector) -> None:
    out = sink(collector.port)
    bad = Record("t", T0, {"message": "bad \ud800 surrogate"})
    with pytest.raises(PermanentError) as info:
        await out.write(Batch("t", [container_log(0), bad, container_log(1)]))
    await out.close()
    assert info.value.rejected is not None and [r for r, _ in info.value.rejected] == [bad]
    assert "cannot encode as OTLP" in info.value.rejected[0][1]
    got = collector.wait_for(2)
    assert sorted(r["body"]["stringValue"] for _, r in got) == ["line 0", "line 1"]


@pytest.mark.parametrize("encoding", ["protobuf", "json"])
async def test_partial_success_reported_as_permanent(encoding: str) -> None:
    requests: list[bytes] = []

    async def export(request: web.Request) -> web.Response:
        assert request.headers.get("Content-Encoding") == "gzip"
        requests.append(await request.read())  # aiohttp has gunzipped it
        if encoding == "json":
            answer = {"partialSuccess": {"rejectedLogRecords": "1", "errorMessage": "timestamp too old"}}
            return web.json_response(answer)
        response = logs_service_pb2.ExportLogsServiceResponse()
        response.partial_success.rejected_log_records = 1
        response.partial_success.error_message = "timestamp too old"
        return web.Response(body=response.SerializeToString(), content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/logs", export)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        out = sink(port, encoding=encoding, compress="gzip")
        records = [container_log(0), container_log(1)]
        with pytest.raises(PermanentError) as info:
            await out.write(Batch("t", records))
        await out.close()
        assert info.value.rejected is not None
        assert [r for r, _ in info.value.rejected] == records
        assert "rejected 1 of 2 log records" in info.value.rejected[0][1]
        assert "timestamp too old" in info.value.rejected[0][1]
        assert len(requests) == 1
        if encoding == "json":
            assert orjson.loads(requests[0])["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]["timeUnixNano"] == str(
                T0
            )
    finally:
        await runner.cleanup()


async def test_garbage_answer_is_retryable_and_named() -> None:
    async def export(request: web.Request) -> web.Response:
        return web.Response(body=b"<html>proxy says hi</html>", content_type="text/html")

    app = web.Application()
    app.router.add_post("/v1/logs", export)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        out = sink(port)
        with pytest.raises(RetryableError, match="expected an ExportLogsServiceResponse, got text/html"):
            await out.write(Batch("t", [container_log(0)]))
        await out.close()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("props", "key"),
    [
        ({"encoding": "avro"}, "encoding"),
        ({"logs_uri": "v1/logs"}, "logs_uri"),
        ({"compress": "zstd"}, "compress"),
        ({"add_label": "novalue"}, "add_label"),
        ({"batch_size": "0"}, "batch_size"),
        ({"header": "X-Only-Name"}, "header"),
        ({"logs_urii": "/x"}, "logs_urii"),
    ],
)
def test_bad_config(props: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        sink(4318, **props)
    assert info.value.key == key
