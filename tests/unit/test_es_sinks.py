"""The ``es`` and ``opensearch`` sinks against real servers (tests/servers/search.py): every
real-server test runs against OpenSearch 2.19 with the ``opensearch`` sink and against
Elasticsearch 7.10 with the ``es`` sink; a scripted server gives the answers a real one does not
give on demand.

Documents are counted by id: after every scenario the index holds each record exactly once.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubetrail.core.config import load_config
from kubetrail.core.errors import ConfigError, PermanentError, RetryableError
from kubetrail.core.record import Batch, Record, identity_key
from kubetrail.runtime.pipeline import Pipeline
from kubetrail.sinks.es import EsSink
from kubetrail.sinks.http_base import BadResponseError
from kubetrail.sinks.opensearch import OpenSearchSink
from tests.fakes.http_server import Answer, ScriptedServer
from tests.servers import running
from tests.servers.search import SearchServer
from tests.timing import scaled

T0 = 1_700_000_000_123_456_789  # 2023-11-14T22:13:20.123Z


# Module scope: a session-scoped server outlives this module until pytest ends (an Elasticsearch
# JVM was seen alive 13 minutes after its last test, beside the next modules' servers).
@pytest.fixture(scope="module", params=["opensearch", "elasticsearch"])
def search(request: pytest.FixtureRequest) -> Iterator[SearchServer]:
    with running(lambda: SearchServer(request.param), f"no real {request.param}") as server:
        yield server


def real_sink(server: SearchServer, **props: Any) -> EsSink:
    """The sink made for ``server``: ``opensearch`` for OpenSearch, ``es`` for Elasticsearch.

    Its ``net.io_timeout`` (60 s by default) stretches on a loaded machine (tests/timing.py):
    creating an index took a loaded OpenSearch over 70 s in CI, and a timeout here is the
    machine, not the sink; what the server answers is asserted as before."""
    props.setdefault("net.io_timeout", f"{scaled(60):.0f}s")
    return sink(OpenSearchSink if server.kind == "opensearch" else EsSink, server.url, **props)


def api(server: SearchServer, method: str, path: str, body: Any = None) -> Any:
    data = orjson.dumps(body) if body is not None else None
    request = urllib.request.Request(server.url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=scaled(60)) as response:
        return orjson.loads(response.read())


def stored(server: SearchServer, index: str) -> dict[str, dict[str, Any]]:
    """_id -> _source of every document in ``index`` (after a refresh)."""
    api(server, "POST", f"/{index}/_refresh")
    hits = api(server, "POST", f"/{index}/_search?size=10000", {"query": {"match_all": {}}})["hits"]["hits"]
    return {hit["_id"]: hit["_source"] for hit in hits}


def events(n: int, start: int = 0, **extra: Any) -> list[Record]:
    """Records like the Events source makes: identity (uid, resourceVersion)."""
    return [
        Record(
            "kube.events",
            T0 + i * 1_000_000,
            body_={"uid": f"uid-{i}", "resourceVersion": str(1000 + i), "n": i, **extra},
            identity=(f"uid-{i}", str(1000 + i)),
        )
        for i in range(start, start + n)
    ]


def sink(cls: type[EsSink], url: str, **props: Any) -> EsSink:
    from tests.unit.helpers import build

    host, port = url.removeprefix("http://").rsplit(":", 1)
    return build(cls, host=host, port=port, **props)  # type: ignore[no-any-return]


async def test_stores_each_record_with_its_identity_as_id(search: SearchServer) -> None:
    out = real_sink(search, index="happy", include_tag_key="on")
    records = events(50)
    try:
        await out.write(Batch("kube.events", records))
    finally:
        await out.close()
    docs = stored(search, "happy")
    assert set(docs) == {identity_key(r) for r in records}
    doc = docs[identity_key(records[1])]  # type: ignore[index]
    assert doc["n"] == 1 and doc["uid"] == "uid-1"
    assert doc["@timestamp"] == "2023-11-14T22:13:20.124Z"  # T0 + 1 ms, milliseconds like Fluent Bit
    assert doc["_flb-key"] == "kube.events"


async def test_replaying_a_batch_stores_nothing_twice(search: SearchServer) -> None:
    out = real_sink(search, index="replay", compress="gzip", suppress_type_name="on", type="_doc")
    try:
        await out.write(Batch("t", events(30)))
        await out.write(Batch("t", events(30)))  # the whole batch again, as after a crash
        await out.write(Batch("t", events(40, start=10)))  # overlapping the first
    finally:
        await out.close()
    docs = stored(search, "replay")
    assert sorted(doc["n"] for doc in docs.values()) == list(range(50))


async def test_id_key_and_generate_id(search: SearchServer) -> None:
    keyed = real_sink(search, index="ids", id_key="$meta['key']")
    plain = [Record("t", T0, body_={"meta": {"key": f"k{i}"}, "n": i}) for i in range(5)]
    generated = real_sink(search, index="generated", generate_id="on")
    anonymous = [Record("t", T0 + i, body_={"n": i}) for i in range(5)]
    try:
        for _ in range(2):
            await keyed.write(Batch("t", plain))
            await generated.write(Batch("t", anonymous))
    finally:
        await keyed.close()
        await generated.close()
    assert sorted(stored(search, "ids")) == [f"k{i}" for i in range(5)]
    assert sorted(doc["n"] for doc in stored(search, "generated").values()) == list(range(5))


async def test_logstash_format_index_per_day_and_prefix_key(search: SearchServer) -> None:
    out = real_sink(
        search,
        logstash_format="on",
        logstash_prefix="ls",
        logstash_prefix_key="team",
        time_key="ts",
        time_key_nanos="on",
    )
    day = 86_400 * 1_000_000_000
    records = [
        Record("t", T0, body_={"n": 0}, identity=("a", 0)),
        Record("t", T0 + day, body_={"n": 1}, identity=("a", 1)),
        Record("t", T0, body_={"n": 2, "team": "payments"}, identity=("a", 2)),
    ]
    try:
        await out.write(Batch("t", records))
    finally:
        await out.close()
    assert [d["n"] for d in stored(search, "ls-2023.11.14").values()] == [0]
    assert [d["n"] for d in stored(search, "ls-2023.11.15").values()] == [1]
    only = list(stored(search, "payments-2023.11.14").values())
    assert only == [{"ts": "2023-11-14T22:13:20.123456789Z", "n": 2, "team": "payments"}]


async def test_mapping_errors_are_rejected_per_item_and_the_rest_is_stored(search: SearchServer) -> None:
    api(search, "PUT", "/typed", {"mappings": {"properties": {"n": {"type": "long"}}}})
    out = real_sink(search, index="typed", trace_error="on")
    records = events(10)
    bad = [records[3], records[7]]
    for record in bad:
        record.replace_body({**record.body, "n": "not a number"})
    try:
        with pytest.raises(PermanentError) as info:
            await out.write(Batch("t", records))
    finally:
        await out.close()
    rejected = info.value.rejected
    assert rejected is not None and [r for r, _ in rejected] == bad
    assert all("mapper_parsing_exception" in reason for _, reason in rejected)
    assert "2 of 10 documents rejected" in str(info.value)
    docs = stored(search, "typed")
    assert set(docs) == {identity_key(r) for r in records if r not in bad}


async def test_items_failing_retryably_are_retried_alone(search: SearchServer) -> None:
    """A write-blocked index answers per item; only those items go out again, once unblocked."""
    api(search, "PUT", "/blocked-2023.11.14", {})
    api(search, "PUT", "/blocked-2023.11.14/_settings", {"index.blocks.write": True})
    out = real_sink(search, logstash_format="on", logstash_prefix_key="target")
    records = [*events(6, target="open"), *events(4, start=6, target="blocked")]
    sent: list[int] = []
    real_request = out.http.request

    async def counting(*args: Any, **kwargs: Any) -> Any:
        sent.append(args[2].count(b'{"create"'))
        return await real_request(*args, **kwargs)

    out.http.request = counting  # type: ignore[method-assign]
    batch = Batch("t", records)
    try:
        with pytest.raises(RetryableError, match="4 of 10 documents failed"):
            await out.write(batch)
        api(search, "PUT", "/blocked-2023.11.14/_settings", {"index.blocks.write": False})
        await out.write(batch)  # the runner retries the same batch object
    finally:
        await out.close()
    assert sent == [10, 4]
    assert set(stored(search, "open-2023.11.14")) == {identity_key(r) for r in records[:6]}
    assert set(stored(search, "blocked-2023.11.14")) == {identity_key(r) for r in records[6:]}


async def test_type_name_is_sent_only_when_set(search: SearchServer) -> None:
    """Elasticsearch 7 still takes ``_type: _doc``; OpenSearch 2 refuses the whole request."""
    out = real_sink(search, index="typed-name", type="_doc")
    try:
        if search.kind == "elasticsearch":
            await out.write(Batch("t", events(2)))
            assert len(stored(search, "typed-name")) == 2
        else:
            with pytest.raises(PermanentError, match=r"HTTP 400 .*unknown parameter \[_type\]"):
                await out.write(Batch("t", events(2)))
    finally:
        await out.close()


# -- answers a real server does not give on demand ------------------------------------------


@pytest.fixture
async def scripted() -> Any:
    server = await ScriptedServer().start()
    yield server
    await server.stop()


async def test_bad_answers_are_retryable_and_say_what_came_back(scripted: ScriptedServer) -> None:
    out = sink(EsSink, scripted.url, http_user="elastic", http_passwd="secret", path="/proxy")
    batch = Batch("t", events(3))
    scripted.answers = [
        Answer(200, b"<html><body>Please log in</body></html>", "text/html"),
        Answer(200, b'{"took": 1, "items": [', "application/json"),
        Answer(200, b'{"took": 1, "errors": false, "items": []}'),
        Answer(503, b'{"error": "unavailable"}', headers={"Retry-After": "7"}),
        Answer(429, b"slow down", "text/plain"),
    ]
    try:
        with pytest.raises(BadResponseError, match=r"expected a JSON answer, got text/html.*Please log in"):
            await out.write(batch)
        with pytest.raises(BadResponseError, match="expected a JSON answer"):
            await out.write(batch)
        with pytest.raises(BadResponseError, match="bulk answer has 0 items for 3 actions"):
            await out.write(batch)
        with pytest.raises(RetryableError, match="HTTP 503") as info:
            await out.write(batch)
        assert info.value.retry_after == 7.0  # type: ignore[attr-defined]
        with pytest.raises(RetryableError, match="HTTP 429"):
            await out.write(batch)
    finally:
        await out.close()
    request = scripted.requests[0]
    assert request.path == "/proxy/_bulk"
    assert request.headers["Authorization"] == "Basic ZWxhc3RpYzpzZWNyZXQ="
    assert request.headers["Content-Type"] == "application/x-ndjson"
    lines = request.body.splitlines()
    assert orjson.loads(lines[0]) == {"create": {"_index": "fluent-bit", "_id": identity_key(batch.records[0])}}


async def test_item_level_5xx_and_429_are_retried_and_409_on_create_counts_as_stored(scripted: ScriptedServer) -> None:
    def bulk(*statuses: int) -> Answer:
        items = [
            {"create": {"status": s, **({"error": {"type": "x", "reason": "r"}} if s >= 300 else {})}} for s in statuses
        ]
        return Answer(200, orjson.dumps({"errors": True, "items": items}))

    scripted.answers = [bulk(201, 503, 409, 429, 400), bulk(201, 201)]
    out = sink(EsSink, scripted.url, http_api_key="a2V5")
    batch = Batch("t", events(5))
    try:
        with pytest.raises(RetryableError, match="2 of 5 documents failed"):
            await out.write(batch)
        with pytest.raises(PermanentError) as info:
            await out.write(batch)
    finally:
        await out.close()
    assert [len(r.body.splitlines()) // 2 for r in scripted.requests] == [5, 2]
    resent = [orjson.loads(line)["create"]["_id"] for line in scripted.requests[1].body.splitlines()[::2]]
    assert resent == [identity_key(batch.records[1]), identity_key(batch.records[3])]
    assert [r for r, _ in info.value.rejected or []] == [batch.records[4]]
    assert scripted.requests[0].headers["Authorization"] == "ApiKey a2V5"


async def test_a_413_splits_the_batch(scripted: ScriptedServer) -> None:
    def handler(request: Any) -> Answer:
        actions = len(request.body.splitlines()) // 2
        if actions > 2:
            return Answer(413, b"too large", "text/plain")
        return Answer(200, orjson.dumps({"errors": False, "items": [{"create": {"status": 201}}] * actions}))

    scripted.handler = handler
    out = sink(OpenSearchSink, scripted.url)
    try:
        await out.write(Batch("t", events(5)))
    finally:
        await out.close()
    stored_ids = [
        orjson.loads(line)["create"]["_id"]
        for r in scripted.requests
        if len(r.body.splitlines()) <= 4
        for line in r.body.splitlines()[::2]
    ]
    assert sorted(stored_ids) == sorted(identity_key(r) for r in events(5))


@pytest.mark.parametrize(
    ("props", "key"),
    [
        ({"write_operation": "update"}, "write_operation"),
        ({"buffer_size": "lots"}, "buffer_size"),
        ({"header": "NoValue"}, "header"),
        ({"tls": "on", "tls.ca_file": "/nonexistent/ca.pem"}, "tls.ca_file"),
        ({"http_passwd": "x"}, "http_passwd"),
    ],
)
def test_config_errors_name_the_option(props: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        sink(EsSink, "http://127.0.0.1:9200", **props)
    assert info.value.key == key


# -- through the whole pipeline ---------------------------------------------------------------


async def test_pipeline_tail_to_search_server_dead_letters_only_the_rejected(
    search: SearchServer, tmp_path: Path
) -> None:
    """tail -> es/opensearch: every line is stored once or dead-lettered with the server's reason."""
    api(search, "PUT", "/pipeline", {"mappings": {"properties": {"n": {"type": "long"}}}})
    lines = [orjson.dumps({"n": i} if i % 10 else {"n": f"bad {i}"}) + b"\n" for i in range(200)]
    log = tmp_path / "app.log"
    log.write_bytes(b"".join(lines))
    host, port = search.url.removeprefix("http://").rsplit(":", 1)
    config = tmp_path / "k.conf"
    config.write_text(
        f"""
[SERVICE]
    grace        5
    storage.path {tmp_path / "storage"}
[INPUT]
    name           tail
    path           {log}
    tag            app
    read_from_head on
    exit_on_eof    on
    parser         json
    db             {tmp_path / "tail.db"}
[OUTPUT]
    name          {"opensearch" if search.kind == "opensearch" else "es"}
    match         *
    host          {host}
    port          {port}
    index         pipeline
    id_key        n
    compress      gzip
"""
    )
    pipeline = Pipeline(load_config(config))
    assert await asyncio.wait_for(pipeline.run(), 120) == 0
    docs = stored(search, "pipeline")
    assert sorted(doc["n"] for doc in docs.values()) == [i for i in range(200) if i % 10]
    dead = [
        orjson.loads(line)
        for path in (tmp_path / "storage" / "rejected").glob("*.jsonl")
        for line in path.read_bytes().splitlines()
    ]
    assert sorted(d["record"]["n"] for d in dead) == sorted(f"bad {i}" for i in range(0, 200, 10))
    assert all("mapper_parsing_exception" in d["reason"] for d in dead)
