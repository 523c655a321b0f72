"""The forward sink against a real forward-protocol server and against a fake.

Neither Fluentd nor Fluent Bit can be installed from the registries this machine reaches. The
real server is the OpenTelemetry Collector's ``fluentforward`` receiver (built from its Go
module, tests/servers/otelcol.py): every event mode, EventTime, chunk acks, Unix sockets. It has
no TLS and no handshake, so those, lost acks, servers that close early and bad input are tested
against tests/fakes/forward_server.py, which implements the documented protocol.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kubetrail.core.errors import ConfigError, PermanentError, RetryableError
from kubetrail.core.metrics import MetricsRegistry
from kubetrail.core.record import Batch, Record
from kubetrail.runtime.plugins import COMMON_OUTPUT_OPTIONS
from kubetrail.runtime.sink_runner import SinkRunner
from kubetrail.sinks.forward import ForwardSink
from tests.fakes.forward_server import FakeForwardServer
from tests.servers import otelcol
from tests.unit.helpers import build

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cluster"))
from localcluster import pki

T0 = 1_704_164_645_123_456_789


def sink(server: FakeForwardServer | None = None, **props: Any) -> ForwardSink:
    if server is not None:
        props.setdefault("port", server.port)
    return build(ForwardSink, COMMON_OUTPUT_OPTIONS, **props)  # type: ignore[no-any-return]


def rec(i: int, tag: str = "kube.events", **extra: Any) -> Record:
    return Record(tag, T0 + i, {"id": f"r{i}", "message": f"event {i}", **extra}, identity=(f"r{i}",))


def ids(server: FakeForwardServer) -> Counter[str]:
    return Counter(event.record["id"] for event in server.events)


@pytest.fixture
async def server() -> Any:
    srv = FakeForwardServer()
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.mark.parametrize(
    ("props", "mode"),
    [
        ({}, "packed_forward"),
        ({"forward_mode": "forward"}, "forward"),
        ({"compress": "gzip"}, "compressed_packed_forward"),
    ],
)
async def test_modes_event_time_and_records(server: FakeForwardServer, props: dict[str, str], mode: str) -> None:
    out = sink(server, **props)
    await out.write(Batch("kube.events", [rec(i, nested={"a": [1, 2.5, None, True]}) for i in range(100)]))
    await out.close()
    await wait(lambda: len(server.events) == 100)
    assert server.modes == Counter({mode: 1})
    first = server.events[0]
    assert (first.tag, first.time_ns, first.event_time) == ("kube.events", T0, True)  # nanoseconds kept
    assert first.record == {"id": "r0", "message": "event 0", "nested": {"a": [1, 2.5, None, True]}}
    assert ids(server) == Counter({f"r{i}": 1 for i in range(100)})


async def test_time_as_integer_and_tag_override(server: FakeForwardServer) -> None:
    out = sink(server, time_as_integer="on", tag="k8s.override", send_options="on")
    await out.write(Batch("kube.events", [rec(0)]))
    await out.close()
    await wait(lambda: len(server.events) == 1)
    event = server.events[0]
    assert (event.tag, event.time_ns, event.event_time) == ("k8s.override", T0 // 10**9 * 10**9, False)


async def test_ack_required_and_waited_for(server: FakeForwardServer) -> None:
    out = sink(server, require_ack_response="on")
    await out.write(Batch("t", [rec(i) for i in range(10)]))
    assert len(server.chunks) == 1 and len(server.events) == 10  # stored before write() returned
    await out.close()


async def test_missing_ack_is_retryable_and_redelivered(server: FakeForwardServer) -> None:
    server.ack = False
    out = sink(server, require_ack_response="on", ack_response_timeout="0.3s")
    with pytest.raises(RetryableError, match=r"no the ack of chunk .* within 0\.3s"):
        await out.write(Batch("t", [rec(0)]))
    server.ack = True
    await out.write(Batch("t", [rec(0)]))  # the retry: at least once, the server has it twice
    await out.close()
    assert ids(server) == Counter({"r0": 2})
    assert len(set(server.chunks)) == 2


async def test_connection_closed_before_ack_retried_without_loss(server: FakeForwardServer) -> None:
    server.close_before_ack = 2
    out = sink(server, require_ack_response="on")
    metrics = MetricsRegistry().component("forward.0", "output", "forward")
    runner = SinkRunner(out, "forward.0", metrics, logging.getLogger("test"), None, backoff_base=0.05)
    runner.start()
    for start in range(0, 300, 100):
        await runner.enqueue(Batch("t", [rec(i) for i in range(start, start + 100)]))
    await asyncio.wait_for(runner.drain(), 30)
    await out.close()
    assert metrics.retries._value.get() == 2
    assert ids(server) == Counter({f"r{i}": 1 for i in range(300)})  # the dropped ones were not stored


async def test_server_down_then_back_loses_nothing(server: FakeForwardServer) -> None:
    port = server.port
    out = sink(server, require_ack_response="on", **{"net.connect_timeout": "1s"})
    metrics = MetricsRegistry().component("forward.0", "output", "forward")
    runner = SinkRunner(out, "forward.0", metrics, logging.getLogger("test"), None, backoff_base=0.05)
    runner.start()
    await runner.enqueue(Batch("t", [rec(i) for i in range(50)]))
    await wait(lambda: len(server.events) == 50)
    await server.stop()
    for start in (50, 100, 150):
        await runner.enqueue(Batch("t", [rec(i) for i in range(start, start + 50)]))
    await wait(lambda: metrics.retries._value.get() >= 3)
    await server.start(port)
    await asyncio.wait_for(runner.drain(), 30)
    await out.close()
    assert ids(server) == Counter({f"r{i}": 1 for i in range(200)})


async def test_unencodable_record_rejected_alone(server: FakeForwardServer) -> None:
    out = sink(server, require_ack_response="on")
    bad = rec(1, huge=2**70)  # msgpack integers stop at 64 bits
    with pytest.raises(PermanentError) as info:
        await out.write(Batch("t", [rec(0), bad, rec(2)]))
    await out.close()
    assert info.value.rejected is not None and [r for r, _ in info.value.rejected] == [bad]
    assert "cannot encode the record as msgpack" in info.value.rejected[0][1]
    assert ids(server) == Counter({"r0": 1, "r2": 1})


async def test_shared_key_and_user_handshake() -> None:
    srv = FakeForwardServer(shared_key="s3cret", users={"alice": "pw"})
    await srv.start()
    try:
        good = sink(srv, shared_key="s3cret", username="alice", password="pw", require_ack_response="on")
        await good.write(Batch("t", [rec(0)]))
        await good.close()
        assert ids(srv) == Counter({"r0": 1})

        wrong_key = sink(srv, shared_key="nope", username="alice", password="pw")
        with pytest.raises(RetryableError, match="refused the handshake: shared_key mismatch"):
            await wrong_key.write(Batch("t", [rec(1)]))
        wrong_password = sink(srv, shared_key="s3cret", username="alice", password="bad")
        with pytest.raises(RetryableError, match="refused the handshake: username/password mismatch"):
            await wrong_password.write(Batch("t", [rec(2)]))
        no_user = sink(srv, shared_key="s3cret")
        with pytest.raises(RetryableError, match="requires user authentication"):
            await no_user.write(Batch("t", [rec(3)]))
        no_key = sink(srv, require_ack_response="on", ack_response_timeout="2s")
        with pytest.raises(RetryableError, match=r"asks for a handshake \(HELO\): set shared_key"):
            await no_key.write(Batch("t", [rec(4)]))
        for out in (wrong_key, wrong_password, no_user, no_key):
            await out.close()
        assert ids(srv) == Counter({"r0": 1})
        # no_user gave up before its PING (no credentials to send); no_key never answered the HELO
        assert srv.auth_failures == ["shared_key mismatch", "username/password mismatch"]
    finally:
        await srv.stop()


async def test_server_that_does_not_know_the_key_is_not_trusted() -> None:
    """An impostor answers PONG "yes" to any key; its digest, made with another key, betrays it."""
    srv = FakeForwardServer(shared_key="other", accept_any_key=True)
    await srv.start()
    try:
        out = sink(srv, shared_key="mine")
        with pytest.raises(RetryableError, match="does not know our shared_key; not sending to it"):
            await out.write(Batch("t", [rec(0)]))
        await out.close()
        assert srv.events == []
    finally:
        await srv.stop()


async def test_tls(tmp_path: Path) -> None:
    ca = pki.make_ca("forward-test-ca")
    server_cert = pki.serving_cert(ca, "localhost")
    pki.write_cert(tmp_path / "ca.crt", ca.cert)
    server_cert.write(tmp_path / "srv.crt", tmp_path / "srv.key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "srv.crt", tmp_path / "srv.key")
    srv = FakeForwardServer(tls=context)
    await srv.start()
    try:
        out = sink(srv, tls="on", **{"tls.ca_file": str(tmp_path / "ca.crt")}, require_ack_response="on")
        await out.write(Batch("t", [rec(0), rec(1)]))
        await out.close()
        assert ids(srv) == Counter({"r0": 1, "r1": 1})
        untrusting = sink(srv, tls="on", require_ack_response="on")
        with pytest.raises(RetryableError, match=r"TLS handshake with tls://127\.0\.0\.1"):
            await untrusting.write(Batch("t", [rec(2)]))
        await untrusting.close()
    finally:
        await srv.stop()


async def test_unix_socket(tmp_path: Path) -> None:
    srv = FakeForwardServer()
    server = await asyncio.start_unix_server(srv._handle, str(tmp_path / "fwd.sock"))
    try:
        out = sink(unix_path=str(tmp_path / "fwd.sock"), require_ack_response="on")
        await out.write(Batch("t", [rec(0)]))
        await out.close()
        assert ids(srv) == Counter({"r0": 1})
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("props", "key"),
    [
        ({"port": "0"}, "port"),
        ({"port": "abc"}, "port"),
        ({"compress": "zstd"}, "compress"),
        ({"compress": "gzip", "forward_mode": "forward"}, "compress"),
        ({"forward_mode": "message"}, "forward_mode"),
        ({"require_ack_response": "maybe"}, "require_ack_response"),
        ({"ack_response_timeout": "0"}, "ack_response_timeout"),
        ({"username": "alice"}, "username"),
        ({"tls": "on", "tls.crt_file": "/nonexistent.pem"}, "tls.crt_file"),
        ({"shared_keys": "x"}, "shared_keys"),
    ],
)
def test_bad_config(props: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        sink(**{k.replace(".", "__"): v for k, v in props.items()})
    assert info.value.key == key


async def wait(condition: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# -- against a real forward-protocol server: the OpenTelemetry Collector's fluentforward receiver --


def received(collector: otelcol.Collector, count: int) -> list[tuple[str, dict[str, Any], int]]:
    """(body, attributes, time in ns) of each log record the collector received."""
    got = collector.wait_for(count)
    return [
        (otelcol.any_value(r.get("body", {})), otelcol.attributes(r.get("attributes", [])), int(r["timeUnixNano"]))
        for _, r in got
    ]


@pytest.mark.parametrize(
    "props",
    [
        {},
        {"forward_mode": "forward"},
        {"compress": "gzip"},
        {"require_ack_response": "on"},
        {"compress": "gzip", "require_ack_response": "on", "send_options": "on"},
        {"time_as_integer": "on", "tag": "k8s.override"},
    ],
)
async def test_the_collector_s_forward_receiver_gets_every_record_once(
    collector: otelcol.Collector, props: dict[str, str]
) -> None:
    out = sink(port=collector.forward_port, **props)
    try:
        for start in range(0, 600, 200):
            batch = [rec(i, nested={"a": [1, 2.5, True]}) for i in range(start, start + 200)]
            await out.write(Batch("kube.events", batch))
    finally:
        await out.close()
    got = received(collector, 600)
    assert Counter(attrs["id"] for _, attrs, _ in got) == Counter({f"r{i}": 1 for i in range(600)})
    integer = props.get("time_as_integer") == "on"
    for body, attrs, time_ns in got:
        i = int(attrs["id"][1:])
        assert body == f"event {i}"  # the receiver takes "message" (or "log") as the body
        assert attrs["fluent.tag"] == props.get("tag", "kube.events")
        assert attrs["nested"] == {"a": [1, 2.5, True]}
        assert time_ns == ((T0 + i) // 10**9 * 10**9 if integer else T0 + i)  # EventTime keeps ns


async def test_the_collector_s_forward_receiver_on_a_unix_socket(collector: otelcol.Collector) -> None:
    out = sink(unix_path=str(collector.forward_socket), require_ack_response="on")
    try:
        await out.write(Batch("t", [rec(i) for i in range(50)]))
    finally:
        await out.close()
    assert Counter(attrs["id"] for _, attrs, _ in received(collector, 50)) == Counter({f"r{i}": 1 for i in range(50)})
