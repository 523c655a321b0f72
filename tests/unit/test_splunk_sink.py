"""The ``splunk`` sink against a fake HEC (tests/fakes/splunk.py): Splunk cannot be installed
from the registries this machine reaches, so the fake implements HEC's documented answers."""

from __future__ import annotations

from typing import Any

import pytest

from kubetrail.core.errors import ConfigError, PermanentError, RetryableError
from kubetrail.core.record import Batch, Record
from kubetrail.sinks.http_base import BadResponseError
from kubetrail.sinks.splunk import SplunkSink
from tests.fakes.http_server import Answer, ScriptedServer
from tests.fakes.splunk import FakeHec
from tests.unit.helpers import build

T0 = 1_700_000_000_123_456_789


def sink(url: str, **props: Any) -> SplunkSink:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    props.setdefault("splunk_token", "hec-token")
    return build(SplunkSink, host=host, port=port, **props)  # type: ignore[no-any-return]


def records(n: int, start: int = 0, **extra: Any) -> list[Record]:
    return [
        Record("kube.audit", T0 + i, body_={"n": i, "verb": "get", "kubernetes": {"namespace_name": "ns1"}, **extra})
        for i in range(start, start + n)
    ]


@pytest.fixture
async def hec() -> Any:
    server = await FakeHec().start()
    yield server
    await server.stop()


async def test_events_with_metadata_and_fields(hec: FakeHec) -> None:
    out = sink(
        hec.url,
        event_host="node-1",
        event_source="$kubernetes['namespace_name']",
        event_sourcetype="k8s:audit",
        event_index="k8s",
        event_field=["verb $verb", "cluster prod"],
        compress="gzip",
    )
    try:
        await out.write(Batch("t", records(20)))
    finally:
        await out.close()
    assert [e.event["event"]["n"] for e in hec.indexed] == list(range(20))
    first = hec.indexed[0].event
    assert first["time"] == 1700000000.123456
    assert (first["host"], first["source"], first["sourcetype"], first["index"]) == (
        "node-1",
        "ns1",
        "k8s:audit",
        "k8s",
    )
    assert first["fields"] == {"verb": "get", "cluster": "prod"}
    assert hec.requests[0]["headers"]["Content-Encoding"] == "gzip"
    assert int(hec.requests[0]["headers"]["Content-Length"]) < hec.requests[0]["size"] / 3


async def test_event_key_and_send_raw(hec: FakeHec) -> None:
    keyed = sink(hec.url, event_key="$kubernetes")
    raw = sink(hec.url, splunk_send_raw="on")
    try:
        await keyed.write(Batch("t", records(1)))
        await raw.write(Batch("t", [Record("t", T0, body_={"event": {"x": 1}, "sourcetype": "raw"})]))
    finally:
        await keyed.close()
        await raw.close()
    assert hec.indexed[0].event["event"] == {"namespace_name": "ns1"}
    assert hec.indexed[1].event == {"event": {"x": 1}, "sourcetype": "raw"}


async def test_indexer_ack_is_awaited_before_the_batch_counts_as_delivered(hec: FakeHec) -> None:
    hec.ack_enabled = True
    hec.ack_after_polls = 3
    out = sink(hec.url, splunk_ack="on", channel="11111111-2222-3333-4444-555555555555", splunk_ack_interval="0.01")
    try:
        await out.write(Batch("t", records(5)))
    finally:
        await out.close()
    assert hec.polls == 3
    assert {e.channel for e in hec.indexed} == {"11111111-2222-3333-4444-555555555555"}


async def test_a_lost_ack_is_retryable(hec: FakeHec) -> None:
    hec.ack_enabled = True
    hec.lose_acks = {0}
    out = sink(hec.url, splunk_ack="on", splunk_ack_timeout="0.2", splunk_ack_interval="0.05")
    try:
        with pytest.raises(RetryableError, match="did not confirm ackId 0"):
            await out.write(Batch("t", records(2)))
        await out.write(Batch("t", records(2)))  # the runner's retry: ackId 1 is confirmed
    finally:
        await out.close()
    assert hec.polls >= 3


async def test_ack_on_against_a_token_without_ack_says_so(hec: FakeHec) -> None:
    out = sink(hec.url, splunk_ack="on")
    try:
        with pytest.raises(BadResponseError, match="no ackId"):
            await out.write(Batch("t", records(1)))
    finally:
        await out.close()


async def test_an_invalid_event_is_rejected_alone_and_the_rest_is_indexed(hec: FakeHec) -> None:
    batch = records(10)
    batch[3].replace_body({**batch[3].body, "idx": "nope"})
    batch[7].replace_body({**batch[7].body, "idx": "nope"})
    out = sink(hec.url, event_index="$idx")
    try:
        with pytest.raises(PermanentError) as info:
            await out.write(Batch("t", batch))
    finally:
        await out.close()
    assert [r for r, _ in info.value.rejected or []] == [batch[3], batch[7]]
    assert all("HEC code 7: Incorrect index" in reason for _, reason in info.value.rejected or [])
    assert sorted(e.event["event"]["n"] for e in hec.indexed) == [0, 1, 2, 4, 5, 6, 8, 9]


async def test_token_and_busy_errors_are_retryable(hec: FakeHec) -> None:
    wrong = sink(hec.url, splunk_token="wrong")
    busy = sink(hec.url)
    hec.busy = 1
    try:
        with pytest.raises(RetryableError, match="HEC code 4: Invalid token"):
            await wrong.write(Batch("t", records(1)))
        with pytest.raises(RetryableError, match="HTTP 503"):
            await busy.write(Batch("t", records(1)))
        await busy.write(Batch("t", records(1)))
    finally:
        await wrong.close()
        await busy.close()
    assert len(hec.indexed) == 1


async def test_garbage_answers() -> None:
    server = await ScriptedServer().start()
    server.answers = [Answer(400, b"<html>Bad Request</html>", "text/html")]
    out = sink(server.url)
    try:
        with pytest.raises(PermanentError, match=r"HTTP 400.*Bad Request"):
            await out.write(Batch("t", records(1)))
    finally:
        await out.close()
        await server.stop()


def test_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        sink("http://127.0.0.1:8088", event_field="lonely")
    assert info.value.key == "event_field"
    with pytest.raises(ConfigError) as info:
        sink("http://127.0.0.1:8088", http_user="u")
    assert info.value.key == "splunk_token"
