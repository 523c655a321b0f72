"""The ``loki`` sink against a real Loki built from its Go module (tests/servers/loki.py).

Loki runs multi-tenant, and every test writes under its own tenant, so tests share one server
without seeing each other's streams. Entries are counted by their ``n`` after reading back.
"""

from __future__ import annotations

import asyncio
import random
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubetrail.core.config import load_config
from kubetrail.core.errors import ConfigError, PermanentError, RetryableError
from kubetrail.core.record import Batch, Record
from kubetrail.runtime.pipeline import Pipeline
from kubetrail.sinks.loki import LokiSink
from tests.fakes.http_server import Answer, Recorded, ScriptedServer
from tests.servers import running
from tests.servers.loki import Loki
from tests.timing import scaled
from tests.unit.helpers import build

DAY_NS = 86_400 * 1_000_000_000


@pytest.fixture(scope="module")  # not session: the server would outlive this module until pytest ends
def loki() -> Iterator[Loki]:
    with running(lambda: Loki(auth_enabled=True), "no real Loki") as server:
        yield server


def query(server: Loki, tenant: str, logql: str) -> list[tuple[dict[str, str], int, str]]:
    """(labels, time_ns, line) of every entry matching ``logql`` in the last 7 days."""
    now = time.time_ns()
    params = urllib.parse.urlencode(
        {"query": logql, "start": now - 7 * DAY_NS, "end": now + DAY_NS // 24, "limit": 5000, "direction": "forward"}
    )
    request = urllib.request.Request(f"{server.url}/loki/api/v1/query_range?{params}")
    request.add_header("X-Scope-OrgID", tenant)
    with urllib.request.urlopen(request, timeout=scaled(60)) as response:
        result = orjson.loads(response.read())["data"]["result"]
    return [(stream["stream"], int(ts), line) for stream in result for ts, line in stream["values"]]


def sink(url: str, **props: Any) -> LokiSink:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return build(LokiSink, host=host, port=port, **props)  # type: ignore[no-any-return]


def logs(n: int, start: int = 0, at: int | None = None, **extra: Any) -> list[Record]:
    base = at if at is not None else time.time_ns() - 60 * 1_000_000_000
    return [
        Record(
            "kube.var.log",
            base + i * 1_000_000,
            body_={"n": i, "log": f"line {i}", "stream": "stdout", **extra},
        )
        for i in range(start, start + n)
    ]


async def test_entries_labels_and_lines_read_back(loki: Loki) -> None:
    out = sink(loki.url, tenant_id="happy", labels="job=kubetrail, $kubernetes['namespace_name']", label_keys="$stream")
    records = logs(100, kubernetes={"namespace_name": "payments", "pod_name": "api-1"})
    random.Random(7).shuffle(records)  # out of order within the batch: sorted per stream on the way
    try:
        await out.write(Batch("kube.var.log", records))
    finally:
        await out.close()
    entries = query(loki, "happy", '{job="kubetrail"}')
    assert sorted(orjson.loads(line)["n"] for _, _, line in entries) == list(range(100))
    labels, _, line = entries[0]
    assert labels["namespace_name"] == "payments" and labels["stream"] == "stdout"
    body = orjson.loads(line)
    assert "stream" not in body and body["kubernetes"] == {"pod_name": "api-1"}  # label keys leave the line


async def test_replaying_a_batch_stores_each_entry_once(loki: Loki) -> None:
    out = sink(loki.url, tenant_id="replay")
    records = logs(50)
    try:
        await out.write(Batch("t", records))
        await out.write(Batch("t", records))
        await out.write(Batch("t", [*records[25:], *logs(10, start=50, at=records[-1].time_ns + 1_000_000)]))
    finally:
        await out.close()
    entries = query(loki, "replay", '{job="fluent-bit"}')
    assert sorted(orjson.loads(line)["n"] for _, _, line in entries) == list(range(60))


async def test_too_old_entries_are_rejected_with_lokis_reason_and_the_rest_stored_once(loki: Loki) -> None:
    out = sink(loki.url, tenant_id="too-old")
    fresh = logs(20)
    old = logs(3, start=100, at=time.time_ns() - 30 * DAY_NS)  # Loki refuses entries older than 168h
    batch = Batch("t", [fresh[0], old[0], *fresh[1:10], old[1], *fresh[10:], old[2]])
    try:
        with pytest.raises(PermanentError) as info:
            await out.write(batch)
    finally:
        await out.close()
    rejected = info.value.rejected or []
    assert [record for record, _ in rejected] == old
    assert all("timestamp too old" in reason for _, reason in rejected)
    assert "refused 3 of 23 entries" in str(info.value)
    entries = query(loki, "too-old", '{job="fluent-bit"}')
    assert sorted(orjson.loads(line)["n"] for _, _, line in entries) == list(range(20))


async def test_tenant_from_the_record_line_formats_and_drop_single_key(loki: Loki) -> None:
    out = sink(
        loki.url,
        tenant_id="default-tenant",
        tenant_id_key="team",
        remove_keys="team, stream, n",
        line_format="key_value",
        compress="none",
    )
    raw = sink(loki.url, tenant_id="raw", remove_keys="n, stream", drop_single_key="raw")
    records = [*logs(3, team="blue"), *logs(2, start=3)]
    try:
        await out.write(Batch("t", records))
        await raw.write(Batch("t", logs(2)))
    finally:
        await out.close()
        await raw.close()
    assert sorted(line for _, _, line in query(loki, "blue", '{job="fluent-bit"}')) == [
        "log=line 0",
        "log=line 1",
        "log=line 2",
    ]
    assert sorted(line for _, _, line in query(loki, "default-tenant", '{job="fluent-bit"}')) == [
        "log=line 3",
        "log=line 4",
    ]
    assert sorted(line for _, _, line in query(loki, "raw", '{job="fluent-bit"}')) == ["line 0", "line 1"]


async def test_without_a_tenant_a_multi_tenant_loki_is_a_retryable_refusal(loki: Loki) -> None:
    out = sink(loki.url)
    try:
        with pytest.raises(RetryableError, match="HTTP 401"):
            await out.write(Batch("t", logs(1)))
    finally:
        await out.close()


# -- answers the real server does not give on demand ----------------------------------------


@pytest.fixture
async def scripted() -> Any:
    server = await ScriptedServer().start()
    yield server
    await server.stop()


async def test_per_entry_400s_are_isolated_by_halving(scripted: ScriptedServer) -> None:
    """Like Loki: a 400 names some refused entries, the others of that push are stored."""
    stored: list[int] = []

    def handler(request: Recorded) -> Answer:
        push = orjson.loads(request.body)
        bad = 0
        for stream in push["streams"]:
            for _, line in stream["values"]:
                n = orjson.loads(line)["n"]
                if n % 7 == 3:
                    bad += 1
                elif n not in stored:
                    stored.append(n)
        if bad:
            return Answer(400, b"entry with timestamp ... ignored, reason: 'line too long'", "text/plain")
        return Answer(204, b"", "text/plain")

    scripted.handler = handler
    out = sink(scripted.url, bearer_token="tok")
    records = logs(40)
    try:
        with pytest.raises(PermanentError) as info:
            await out.write(Batch("t", records))
    finally:
        await out.close()
    assert [r.body["n"] for r, _ in info.value.rejected or []] == [n for n in range(40) if n % 7 == 3]
    assert sorted(stored) == [n for n in range(40) if n % 7 != 3]
    assert all("line too long" in reason for _, reason in info.value.rejected or [])
    first = scripted.requests[0]
    assert first.headers["Authorization"] == "Bearer tok"
    assert first.headers["Content-Encoding"] == "gzip" and first.path == "/loki/api/v1/push"
    assert 0 < first.wire_size < len(first.body) / 3


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (Answer(429, b"Ingestion rate limit exceeded", "text/plain"), RetryableError, "HTTP 429.*rate limit"),
        (Answer(500, b"<html><h1>Internal error</h1></html>", "text/html"), RetryableError, "HTTP 500.*Internal error"),
        (Answer(302, b"", "text/plain", {"Location": "/login"}), RetryableError, "unexpected status"),
        (Answer(413, b"request too large", "text/plain"), PermanentError, "HTTP 413"),
    ],
)
async def test_whole_push_failures(scripted: ScriptedServer, answer: Answer, error: type, match: str) -> None:
    scripted.default = answer
    out = sink(scripted.url)
    try:
        with pytest.raises(error, match=match):
            await out.write(Batch("t", logs(3)))
    finally:
        await out.close()


@pytest.mark.parametrize(
    ("props", "key"),
    [({"labels": "job"}, "labels"), ({"label_keys": "stream"}, "labels"), ({"line_format": "logfmt"}, "line_format")],
)
def test_config_errors_name_the_option(props: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        sink("http://127.0.0.1:3100", **props)
    assert info.value.key == key


async def test_pipeline_tail_to_loki_dead_letters_only_the_too_old(loki: Loki, tmp_path: Path) -> None:
    """tail -> loki: every line is stored once, or dead-lettered with Loki's reason."""
    now = time.time_ns()
    stamps = [now - (30 * DAY_NS if i % 25 == 0 else 60_000_000_000) + i * 1_000_000 for i in range(300)]
    lines = b"".join(orjson.dumps({"n": i, "ts": stamps[i] / 1e9}) + b"\n" for i in range(300))
    log = tmp_path / "app.log"
    log.write_bytes(lines)
    host, port = loki.url.removeprefix("http://").rsplit(":", 1)
    config = tmp_path / "k.conf"
    config.write_text(
        f"""
[SERVICE]
    grace        5
    storage.path {tmp_path / "storage"}
[PARSER]
    name      epoch
    format    json
    time_key  ts
    time_format %s.%L
[INPUT]
    name           tail
    path           {log}
    tag            app
    read_from_head on
    exit_on_eof    on
    parser         epoch
    db             {tmp_path / "tail.db"}
[OUTPUT]
    name      loki
    match     *
    host      {host}
    port      {port}
    tenant_id pipeline
    labels    job=pipeline
"""
    )
    pipeline = Pipeline(load_config(config))
    assert await asyncio.wait_for(pipeline.run(), 120) == 0
    entries = query(loki, "pipeline", '{job="pipeline"}')
    assert sorted(orjson.loads(line)["n"] for _, _, line in entries) == [i for i in range(300) if i % 25]
    dead = [
        orjson.loads(line)
        for path in (tmp_path / "storage" / "rejected").glob("*.jsonl")
        for line in path.read_bytes().splitlines()
    ]
    assert sorted(d["record"]["n"] for d in dead) == list(range(0, 300, 25))
    assert all("too old" in d["reason"] for d in dead)


async def test_auto_kubernetes_labels_and_label_names(scripted: ScriptedServer) -> None:
    scripted.default = Answer(204, b"", "text/plain")
    out = sink(scripted.url, auto_kubernetes_labels="on", labels="job=k, app.kubernetes.io/x=$meta['v']")
    record = Record(
        "t",
        1_700_000_000_000_000_000,
        body_={
            "log": "hi",
            "meta": {"v": 3},
            "kubernetes": {"labels": {"app.kubernetes.io/name": "api", "9lives": "y"}},
        },
    )
    try:
        await out.write(Batch("t", [record]))
    finally:
        await out.close()
    stream = orjson.loads(scripted.requests[0].body)["streams"][0]
    assert stream["stream"] == {"job": "k", "app_kubernetes_io_x": "3", "app_kubernetes_io_name": "api", "_9lives": "y"}
    assert stream["values"] == [
        [
            "1700000000000000000",
            '{"log":"hi","meta":{},"kubernetes":{"labels":{"app.kubernetes.io/name":"api","9lives":"y"}}}',
        ]
    ]


def test_keys_that_become_labels_or_are_removed_leave_the_shared_record_untouched() -> None:
    out = sink(
        "http://127.0.0.1:1",
        labels="job=x, $kubernetes['labels']['app']",
        remove_keys="$kubernetes['pod_name'], extra, $missing['deeper']",
    )
    body = {
        "log": "hello",
        "extra": 1,
        "kubernetes": {"pod_name": "web-1", "namespace_name": "shop", "labels": {"app": "web", "tier": "f"}},
    }
    record = Record("t", 1, orjson.loads(orjson.dumps(body)))
    line = orjson.loads(out._line(record))
    assert line == {"log": "hello", "kubernetes": {"namespace_name": "shop", "labels": {"tier": "f"}}}
    assert out._labels(record.body) == {"job": "x", "app": "web"}
    assert record.body == body  # other sinks get the record as it came
