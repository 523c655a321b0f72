"""The ``kubernetes_audit`` webhook input, run inside a real pipeline over real TLS sockets.

Every test talks HTTPS to the receiver with aiohttp's client, as the API server would, and
checks both the HTTP answer and what the sinks got: 2xx only after delivery, the status of
each kind of bad request, credentials and certificates rotated on disk, and that one bad or
slow client never stops the others.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import ssl
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from kubetrail.core.config import load_config
from kubetrail.core.errors import ConfigError
from kubetrail.core.record import Batch
from kubetrail.runtime.pipeline import Pipeline
from kubetrail.sources.kubernetes_audit import KubernetesAuditSource
from tests.unit.helpers import write

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cluster"))
from localcluster import pki


def event(stage: str = "ResponseComplete", audit_id: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": "Metadata",
        "auditID": audit_id or str(uuid.uuid4()),
        "stage": stage,
        "requestURI": "/api/v1/namespaces/default/pods",
        "verb": "list",
        "user": {"username": "admin", "groups": ["system:masters"]},
        "requestReceivedTimestamp": "2026-11-28T12:00:00.000100Z",
        "stageTimestamp": "2026-11-28T12:00:00.123456Z",
        **extra,
    }


def event_list(events: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "metadata": {}, "items": events})


@dataclass
class Pki:
    dir: Path
    ca: pki.KeyPair
    ca_file: Path
    crt: Path
    key: Path
    client_crt: Path
    client_key: Path
    token_file: Path
    token: str

    def client_ctx(self, cert: bool = True, other_ca: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if cert:
            if other_ca:
                stranger = pki.issue(pki.make_ca("stranger"), "apiserver", client=True)
                stranger.write(self.dir / "stranger.crt", self.dir / "stranger.key")
                ctx.load_cert_chain(self.dir / "stranger.crt", self.dir / "stranger.key")
            else:
                ctx.load_cert_chain(self.client_crt, self.client_key)
        return ctx


@pytest.fixture
def certs(tmp_path: Path) -> Pki:
    ca = pki.make_ca("audit-test-ca")
    ca_file = tmp_path / "ca.crt"
    pki.write_cert(ca_file, ca.cert)
    pki.serving_cert(ca, "receiver-1").write(tmp_path / "tls.crt", tmp_path / "tls.key")
    pki.issue(ca, "kube-apiserver", client=True).write(tmp_path / "client.crt", tmp_path / "client.key")
    token = uuid.uuid4().hex
    pki.write_secret(tmp_path / "token", token + "\n")
    return Pki(
        tmp_path,
        ca,
        ca_file,
        tmp_path / "tls.crt",
        tmp_path / "tls.key",
        tmp_path / "client.crt",
        tmp_path / "client.key",
        tmp_path / "token",
        token,
    )


class GatedSink:
    """A sink whose writes wait for ``gate`` (None: deliver at once); records what it delivered."""

    def __init__(self) -> None:
        self.gate: asyncio.Event | None = None
        self.delivered: list[Batch] = []
        self.arrived = asyncio.Event()

    async def start(self) -> None:
        return None

    async def write(self, batch: Batch) -> None:
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        self.delivered.append(batch)

    async def close(self) -> None:
        return None

    def identities(self) -> list[tuple[str, str]]:
        return [r.identity for b in self.delivered for r in b.records]  # type: ignore[misc]


@dataclass
class Receiver:
    pipeline: Pipeline
    source: KubernetesAuditSource
    sink: GatedSink
    url: str
    certs: Pki
    task: asyncio.Task[int]

    async def post(
        self,
        body: bytes,
        *,
        token: str | None = "default",
        cert: bool = True,
        headers: dict[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> tuple[int, dict[str, Any], Any]:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if token == "default":
            token = self.certs.token
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        own = session is None
        if session is None:
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.certs.client_ctx(cert=cert)))
        try:
            async with session.post(self.url, data=body, headers=hdrs) as resp:
                return resp.status, dict(resp.headers), await resp.json(content_type=None)
        finally:
            if own:
                await session.close()


def receiver_config(tmp_path: Path, certs: Pki, extra: str = "", filters: str = "") -> Path:
    return write(
        tmp_path / "audit.conf",
        f"""
[SERVICE]
    grace 5
[INPUT]
    name              kubernetes_audit
    tag               audit
    listen            127.0.0.1
    port              0
    tls.crt_file      {certs.crt}
    tls.key_file      {certs.key}
    tls.ca_file       {certs.ca_file}
    bearer_token_file {certs.token_file}
{extra}
{filters}
[OUTPUT]
    name  stdout
    match *
""",
    )


@pytest.fixture
async def start(tmp_path: Path, certs: Pki) -> AsyncIterator[Any]:
    """``await start(extra=..., filters=...)`` -> a running receiver; stopped after the test."""
    started: list[Receiver] = []

    async def _start(extra: str = "", filters: str = "", queue_size: int | None = None) -> Receiver:
        pipeline = Pipeline(load_config(receiver_config(tmp_path, certs, extra, filters)))
        sink = GatedSink()
        pipeline.runners[0].sink = sink  # type: ignore[assignment]
        if queue_size is not None:  # a tiny sink buffer fills quickly (+1: the batch the worker holds)
            pipeline.runners[0]._slots = asyncio.Semaphore(queue_size + 1)
        source = pipeline.sources[0].instance
        task = asyncio.create_task(pipeline.run())
        for _ in range(200):
            if source.started.is_set():
                break
            await asyncio.sleep(0.02)
        assert source.started.is_set(), "receiver did not start"
        rec = Receiver(pipeline, source, sink, f"https://127.0.0.1:{source.bound_port}/audit", certs, task)
        started.append(rec)
        return rec

    yield _start
    for rec in started:
        if rec.sink.gate is not None:
            rec.sink.gate.set()
        rec.pipeline.request_stop()
        assert await asyncio.wait_for(rec.task, 30) == 0


@pytest.fixture
async def receiver(start: Any) -> Receiver:
    return await start()  # type: ignore[no-any-return]


# --- accepted payloads ----------------------------------------------------------------------


async def test_event_list_is_answered_200_after_delivery_with_one_record_per_event(receiver: Receiver) -> None:
    events = [event("RequestReceived", "a1"), event("ResponseComplete", "a1"), event(audit_id="b2")]
    status, _, _ = await receiver.post(event_list(events))
    assert status == 200
    assert receiver.sink.identities() == [
        ("a1", "RequestReceived"),
        ("a1", "ResponseComplete"),
        ("b2", "ResponseComplete"),
    ]
    records = receiver.sink.delivered[0].records
    # stageTimestamp, to the microsecond
    assert records[0].time_ns == 1_795_867_200_123_456_000
    # the body is the event's original bytes, not a re-serialisation
    assert records[0].raw == orjson.dumps(events[0])
    assert receiver.sink.delivered[0].raw_block == b"".join(orjson.dumps(e) + b"\n" for e in events)


async def test_single_event_and_json_array_are_accepted(receiver: Receiver) -> None:
    assert (await receiver.post(orjson.dumps(event(audit_id="single"))))[0] == 200
    assert (await receiver.post(orjson.dumps([event(audit_id="x"), event(audit_id="y")])))[0] == 200
    assert receiver.sink.identities() == [
        ("single", "ResponseComplete"),
        ("x", "ResponseComplete"),
        ("y", "ResponseComplete"),
    ]


async def test_pretty_printed_body_keeps_events_intact(receiver: Receiver) -> None:
    ev = event(audit_id="pretty")
    body = orjson.dumps(
        {"kind": "EventList", "apiVersion": "audit.k8s.io/v1", "items": [ev]}, option=orjson.OPT_INDENT_2
    )
    assert (await receiver.post(body))[0] == 200
    record = receiver.sink.delivered[0].records[0]
    assert record.body == ev and b"\n" not in record.json_bytes()


async def test_timestamp_fallbacks(receiver: Receiver) -> None:
    ev = event(audit_id="old")
    del ev["stageTimestamp"]
    assert (await receiver.post(event_list([ev])))[0] == 200
    assert receiver.sink.delivered[0].records[0].time_ns == 1_795_867_200_000_100_000


async def test_gzip_body(receiver: Receiver) -> None:
    body = gzip.compress(event_list([event(audit_id="zipped")]))
    status, _, _ = await receiver.post(body, headers={"Content-Encoding": "gzip"})
    assert status == 200 and receiver.sink.identities() == [("zipped", "ResponseComplete")]


async def test_empty_list_is_fine(receiver: Receiver) -> None:
    assert (await receiver.post(event_list([])))[0] == 200
    assert receiver.sink.delivered == []


# --- delivery and backpressure ------------------------------------------------------------------


async def test_answer_waits_for_the_sink(receiver: Receiver) -> None:
    receiver.sink.gate = asyncio.Event()
    post = asyncio.create_task(receiver.post(event_list([event(audit_id="wait")])))
    await asyncio.wait_for(receiver.sink.arrived.wait(), 5)
    await asyncio.sleep(0.2)
    assert not post.done(), "answered before the sink delivered"
    receiver.sink.gate.set()
    assert (await asyncio.wait_for(post, 5))[0] == 200


async def test_sink_down_gives_503_then_full_buffers_429(start: Any) -> None:
    receiver = await start(extra="    ack_timeout 0.5\n    max_pending 1\n    retry_after 7", queue_size=1)
    receiver.sink.gate = asyncio.Event()
    status, headers, body = await receiver.post(event_list([event(audit_id="first")]))
    assert status == 503 and headers["Retry-After"] == "7" and "ack_timeout" in body["error"]
    # the worker holds "first"; one more fills the queue; the next cannot be admitted in time
    statuses = [(await receiver.post(event_list([event(audit_id=f"n{i}")])))[0] for i in range(3)]
    assert statuses[0] == 503 and 429 in statuses[1:], statuses
    receiver.sink.gate.set()
    # admitted batches are still delivered; the API server's retries are what dedupe removes
    for _ in range(100):
        if len(receiver.sink.identities()) >= 2:
            break
        await asyncio.sleep(0.05)
    assert ("first", "ResponseComplete") in receiver.sink.identities()
    assert (await receiver.post(event_list([event(audit_id="after")])))[0] == 200


async def test_retry_after_503_is_delivered_once_and_waits_for_its_twin(start: Any) -> None:
    receiver = await start(
        extra="    ack_timeout 0.5",
        filters="[FILTER]\n    name kubernetes_audit\n    match *\n",
    )
    receiver.sink.gate = asyncio.Event()
    batch = event_list([event("RequestReceived", "r1"), event("ResponseComplete", "r1")])
    assert (await receiver.post(batch))[0] == 503  # not delivered in time: the API server retries
    retry = asyncio.create_task(receiver.post(batch))
    await asyncio.sleep(0.3)
    assert not retry.done(), "the retry was answered before its twin was delivered"
    receiver.sink.gate.set()
    assert (await asyncio.wait_for(retry, 5))[0] == 200
    assert (await receiver.post(batch))[0] == 200  # a late duplicate: already delivered
    assert sorted(receiver.sink.identities()) == [("r1", "RequestReceived"), ("r1", "ResponseComplete")]


# --- bad requests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"kind":"EventList","items":[{"auditID":', "malformed JSON"),
        (b"not json", "malformed JSON"),
        (b'{"kind":"PodList","apiVersion":"audit.k8s.io/v1","items":[]}', "kind must be EventList or Event"),
        (b'{"kind":"EventList","apiVersion":"v1","items":[]}', "apiVersion must be audit.k8s.io/v1"),
        (b'{"kind":"EventList","apiVersion":"audit.k8s.io/v1","items":[{"stage":"Panic"}]}', "auditID"),
        (
            b'{"kind":"EventList","apiVersion":"audit.k8s.io/v1","items":[{"auditID":1,"stage":"x"}]}',
            "$.items[0].auditID",
        ),
        (b'[{"kind":"Pod","auditID":"a","stage":"Panic"}]', "items[0]: kind must be Event"),
        (
            b'{"kind":"EventList","apiVersion":"audit.k8s.io/v1","items":[{"auditID":"a","stage":"Panic","x":'
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}]}",
            "nested too deeply",
        ),
    ],
)
async def test_bad_payloads_get_400_naming_the_problem(receiver: Receiver, body: bytes, fragment: str) -> None:
    status, _, answer = await receiver.post(body)
    assert status == 400 and fragment in answer["error"], answer
    assert receiver.sink.delivered == []


async def test_wrong_content_type_and_encoding_get_415(receiver: Receiver) -> None:
    body = event_list([event()])
    assert (await receiver.post(body, headers={"Content-Type": "text/plain"}))[0] == 415
    assert (await receiver.post(body, headers={"Content-Encoding": "br"}))[0] == 415


async def test_bodies_over_the_limit_get_413(start: Any) -> None:
    receiver = await start(extra="    buffer_max_size 64k")
    big = event_list([event(requestURI="x" * 1000) for _ in range(100)])
    assert (await receiver.post(big))[0] == 413

    async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to refuse up front
        for _ in range(20):
            yield b" " * 16384

    assert (await receiver.post(chunks()))[0] == 413  # type: ignore[arg-type]
    bomb = gzip.compress(b"[" + b" " * (50 * 1024 * 1024) + b"]", compresslevel=9)
    assert len(bomb) < 64 * 1024
    status, _, answer = await receiver.post(bomb, headers={"Content-Encoding": "gzip"})
    assert status == 413 and "decompressed" in answer["error"]
    assert (await receiver.post(event_list([event(audit_id="ok")])))[0] == 200


async def test_authentication(receiver: Receiver) -> None:
    body = event_list([event()])
    assert (await receiver.post(body, token=None))[0] == 401
    status, headers, _ = await receiver.post(body, token="wrong")
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert (await receiver.post(body, cert=False))[0] == 403
    with pytest.raises(aiohttp.ClientError):  # a certificate from another CA: the handshake fails
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=receiver.certs.client_ctx(other_ca=True)))
        try:
            await receiver.post(body, session=session)
        finally:
            await session.close()
    assert receiver.sink.delivered == []
    assert (await receiver.post(body))[0] == 200


async def test_token_rotation_is_picked_up_without_restart(receiver: Receiver) -> None:
    body = event_list([event()])
    new = uuid.uuid4().hex
    # Kubernetes swaps a secret volume atomically: write aside, rename over.
    write(receiver.certs.dir / "token.new", new + "\n")
    os.replace(receiver.certs.dir / "token.new", receiver.certs.token_file)
    assert (await receiver.post(body, token=new))[0] == 200
    assert (await receiver.post(body))[0] == 401  # the old token no longer works


class RawConnection:
    """One keep-alive TLS connection speaking HTTP/1.1 by hand, to watch a connection outlive a rotation."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, receiver: Receiver) -> RawConnection:
        host = "127.0.0.1"
        reader, writer = await asyncio.open_connection(
            host, receiver.source.bound_port, ssl=receiver.certs.client_ctx(), server_hostname=host
        )
        return cls(reader, writer)

    @property
    def server_cn(self) -> str:
        peer = self.writer.get_extra_info("peercert")
        return dict(x[0] for x in peer["subject"])["commonName"]  # type: ignore[no-any-return]

    async def post(self, token: str, body: bytes) -> int:
        head = (
            f"POST /audit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def test_certificate_rotation_keeps_connections_in_flight(receiver: Receiver) -> None:
    certs = receiver.certs
    old = await RawConnection.open(receiver)
    try:
        assert old.server_cn == "receiver-1"
        assert await old.post(certs.token, event_list([event()])) == 200
        rotated = pki.serving_cert(certs.ca, "receiver-2")
        rotated.write(certs.dir / "tls2.crt", certs.dir / "tls2.key")
        os.replace(certs.dir / "tls2.key", certs.key)
        os.replace(certs.dir / "tls2.crt", certs.crt)
        fresh = await RawConnection.open(receiver)
        assert fresh.server_cn == "receiver-2"
        assert await fresh.post(certs.token, event_list([event()])) == 200
        fresh.close()
        # the keep-alive connection made before the rotation still works
        assert await old.post(certs.token, event_list([event()])) == 200
    finally:
        old.close()
    assert receiver.source.tls is not None and receiver.source.tls.reloads == 1
    assert len(receiver.sink.identities()) == 3


async def test_half_written_rotation_keeps_the_old_certificate(receiver: Receiver) -> None:
    certs = receiver.certs
    rotated = pki.serving_cert(certs.ca, "receiver-2")
    rotated.write(certs.dir / "tls2.crt", certs.dir / "tls2.key")
    os.replace(certs.dir / "tls2.crt", certs.crt)  # certificate first, key not yet
    assert (await receiver.post(event_list([event()])))[0] == 200
    os.replace(certs.dir / "tls2.key", certs.key)
    assert (await receiver.post(event_list([event()])))[0] == 200
    assert receiver.source.tls is not None and receiver.source.tls.reloads == 1


async def test_slow_client_gets_408_and_others_are_served_meanwhile(start: Any) -> None:
    receiver = await start(extra="    read_timeout 0.5")
    host, port = "127.0.0.1", receiver.source.bound_port
    reader, writer = await asyncio.open_connection(host, port, ssl=receiver.certs.client_ctx(), server_hostname=host)
    writer.write(
        b"POST /audit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {receiver.certs.token}\r\n".encode()
        + b'Content-Length: 1000\r\n\r\n{"kind":'
    )
    await writer.drain()
    # while it dawdles, the API server's own requests go through
    assert (await receiver.post(event_list([event(audit_id="meanwhile")])))[0] == 200
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert b" 408 " in status_line
    writer.close()
    assert receiver.sink.identities() == [("meanwhile", "ResponseComplete")]


async def test_stop_lets_requests_in_flight_finish(receiver: Receiver) -> None:
    receiver.sink.gate = asyncio.Event()
    post = asyncio.create_task(receiver.post(event_list([event(audit_id="late")])))
    await asyncio.wait_for(receiver.sink.arrived.wait(), 5)
    receiver.pipeline.request_stop()
    await asyncio.sleep(0.2)
    receiver.sink.gate.set()
    assert (await asyncio.wait_for(post, 5))[0] == 200


async def test_request_bodies_are_not_logged(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    secret = "c3VwZXJzZWNyZXQ="
    await receiver.post(b'{"kind":"EventList","items":[{"auditID":"' + secret.encode() + b'"')
    await receiver.post(event_list([event(requestObject={"data": {"k": secret}})]), token="wrong")
    assert secret not in caplog.text


# --- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("listen 0.0.0.0", "without TLS"),
        ("listen 10.1.2.3\n    tls.crt_file {crt}\n    tls.key_file {key}", "without client authentication"),
        ("listen 127.0.0.1\n    tls.crt_file {crt}", "go together"),
        ("listen 127.0.0.1\n    tls.ca_file {ca}", "need TLS"),
        ("listen 127.0.0.1\n    bearer_token_file /nonexistent/token", "cannot read"),
        ("listen 127.0.0.1\n    tls.crt_file {key}\n    tls.key_file {key}", "cannot load the TLS files"),
    ],
)
def test_config_errors(tmp_path: Path, certs: Pki, options: str, message: str) -> None:
    text = options.format(crt=certs.crt, key=certs.key, ca=certs.ca_file)
    config = write(
        tmp_path / "c.conf", f"[INPUT]\n    name kubernetes_audit\n    {text}\n[OUTPUT]\n    name stdout\n    match *\n"
    )
    with pytest.raises(ConfigError, match=message):
        Pipeline(load_config(config))


def test_insecure_allows_plain_http_on_any_address(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.conf",
        "[INPUT]\n    name kubernetes_audit\n    listen 0.0.0.0\n    insecure on\n"
        "[OUTPUT]\n    name stdout\n    match *\n",
    )
    Pipeline(load_config(config))
