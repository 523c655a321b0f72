"""The ``gelf`` output against an independent decoder: graygelf's GELF UDP server (npm), run by
Node (see tests/servers/gelf.py); TCP and TLS framing read by the same receiver process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest

from kubetrail.core.errors import ConfigError, PermanentError
from kubetrail.core.record import Batch, Record
from kubetrail.runtime.plugins import COMMON_OUTPUT_OPTIONS, SINKS
from kubetrail.sinks.gelf import GelfSink
from tests.servers import running
from tests.servers.gelf import GelfReceiver
from tests.unit.helpers import build

T0 = 1_704_164_645_123_456_789  # 2024-01-02T03:04:05.123456789Z


@pytest.fixture(scope="module")
def receiver() -> Iterator[GelfReceiver]:
    with running(lambda: GelfReceiver(tls=True), "no GELF receiver", build_hint=False) as server:
        yield server


@pytest.fixture
def gelf(receiver: GelfReceiver) -> GelfReceiver:
    receiver.messages.clear()
    return receiver


def sink(**props: Any) -> GelfSink:
    return build(GelfSink, COMMON_OUTPUT_OPTIONS, **props)  # type: ignore[no-any-return]


def received(server: GelfReceiver, count: int) -> list[dict[str, Any]]:
    items = server.wait_for(count)
    assert not [item for item in items if "error" in item], items
    assert len(items) == count, items
    return [item["message"] for item in items]


async def test_fields_as_fluent_bit_maps_them_over_udp(gelf: GelfReceiver) -> None:
    assert SINKS["gelf"] is GelfSink
    out = sink(port=gelf.udp_port, gelf_short_message_key="log", gelf_host_key="node", gelf_level_key="severity",
               gelf_full_message_key="stack", gelf_tag_key="fluent_tag")  # fmt: skip
    await out.start()
    body = {
        "log": "request failed",
        "node": "worker-1",
        "severity": "Warning",
        "stack": "trace\nline 2",
        "id": "dropped",
        "nothing": None,
        "ok": True,
        "count": 3,
        "ratio": 0.25,
        "kubernetes": {"pod_name": "web-1", "labels": {"app.kubernetes.io/name": "web"}},
        "tags": ["a", 1, {"k": "v"}],
        "bad key!": "x",
    }
    try:
        await out.write(Batch("kube.web", [Record("kube.web", T0, body)]))
    finally:
        await out.close()
    (message,) = received(gelf, 1)
    assert message == {
        "version": "1.1",
        "short_message": "request failed",
        "host": "worker-1",
        "level": 4,
        "full_message": "trace\nline 2",
        "_ok": "true",
        "_count": 3,
        "_ratio": 0.25,
        "_kubernetes_pod_name": "web-1",
        "_kubernetes_labels_app.kubernetes.io_name": "web",
        "_tags": "a, 1, k=v",
        "_bad_key_": "x",
        "_fluent_tag": "kube.web",
        "timestamp": 1704164645.123,
    }


async def test_large_messages_are_gzipped_and_chunked(gelf: GelfReceiver) -> None:
    out = sink(port=gelf.udp_port, packet_size=500)
    await out.start()
    noise = os.urandom(20_000).hex()  # 40 KB that gzip cannot shrink below ~20 KB: ~40 chunks
    records = [Record("t", T0 + i, {"short_message": f"m{i}", "blob": noise, "i": i}) for i in range(5)]
    plain = [Record("t", T0, {"short_message": "small", "i": 99})]
    try:
        assert len(out.datagrams(out.encode(records[0]))) > 30
        for record in records + plain:  # one message at a time: the receiver's UDP buffer is not endless
            await out.write(Batch("t", [record]))
            await asyncio.sleep(0.1)
    finally:
        await out.close()
    messages = received(gelf, 6)
    assert sorted(m["_i"] for m in messages) == [0, 1, 2, 3, 4, 99]
    assert all(m["_blob"] == noise for m in messages if m["_i"] != 99)


async def test_uncompressed_udp_and_a_record_without_short_message(gelf: GelfReceiver) -> None:
    out = sink(port=gelf.udp_port, compress="off")
    await out.start()
    try:
        assert out.datagrams(b'{"version":"1.1"}') == [b'{"version":"1.1"}']  # sent as plain JSON
        with pytest.raises(PermanentError) as info:
            await out.write(Batch("t", [Record("t", T0, {"short_message": "a"}), Record("t", T0, {"msg": "b"})]))
    finally:
        await out.close()
    assert [record.body for record, _ in info.value.rejected or []] == [{"msg": "b"}]
    assert "no 'short_message' key" in (info.value.rejected or [])[0][1]
    assert [m["short_message"] for m in received(gelf, 1)] == ["a"]


async def test_a_message_over_128_chunks_is_rejected(gelf: GelfReceiver) -> None:
    out = sink(port=gelf.udp_port, packet_size=100)
    await out.start()
    try:
        with pytest.raises(PermanentError, match="more than 128 chunks"):
            await out.write(Batch("t", [Record("t", T0, {"short_message": os.urandom(20_000).hex()})]))
    finally:
        await out.close()


@pytest.mark.parametrize("mode", ["tcp", "tls"])
async def test_tcp_and_tls_nul_framing(gelf: GelfReceiver, mode: str) -> None:
    if mode == "tcp":
        out = sink(port=gelf.tcp_port, mode="tcp")
    else:
        out = sink(port=gelf.tls_port, mode="tls", tls="on", tls__ca_file=str(gelf.ca_file), tls__vhost="localhost")
    await out.start()
    try:
        await out.write(Batch("t", [Record("t", T0 + i, {"short_message": f"line\n{i}", "i": i}) for i in range(50)]))
    finally:
        await out.close()
    messages = received(gelf, 50)
    assert [m["short_message"] for m in messages] == [f"line\n{i}" for i in range(50)]
    assert {item["transport"] for item in gelf.messages} == {mode}


@pytest.mark.parametrize(
    ("props", "key"),
    [({"port": "0"}, "port"), ({"packet_size": "0"}, "packet_size"), ({"tls": "on"}, "tls")],
)
def test_config_errors_name_the_key(props: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        sink(**props)
    assert info.value.key == key
