"""The ``http`` output's body from a block (``kubetrail_native.FramedBody``, written with ``writev``
from the block to the socket; kubetrail/sinks/http_base.py ``StreamedBody``) against what it sent
before: ``encode_batch``'s bytes, which for records is the Python formatter. Real loopback aiohttp
servers (tests/fakes/http_server.py, and one here that reads slowly), TLS from a test CA."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from kubetrail.core.block import ReadyBlock
from kubetrail.core.dates import DATE_FORMATS
from kubetrail.core.errors import RetryableError
from kubetrail.core.record import Batch, Record
from kubetrail.sinks import http as http_sink
from kubetrail.sinks.http import HttpOutputSink
from kubetrail.sinks.json_format import date_key_option, encode_batch
from tests.fakes.http_server import Answer, ScriptedServer
from tests.unit import test_http_sink
from tests.unit.helpers import build
from tests.unit.test_http_sink import server_ctx, tls_files  # noqa: F401 - the fixture

# test_http_sink's fixture (a server answering 204), bound here rather than imported so that the
# tests' ``server`` parameters do not read as redefinitions of an unused import.
server = test_http_sink.server

FramedBody = http_sink.FramedBody
pytestmark = pytest.mark.skipif(FramedBody is None, reason="kubetrail_native is not built")

T0 = 1_795_867_200_001_800_000


def lines_of(count: int, seed: int, big_every: int = 0) -> list[bytes]:
    """Compact JSON lines (orjson's own bytes, so the record path re-encodes them unchanged):
    escapes, non-ASCII, nesting, empty objects, now and then a line of 20 KB."""
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        if i % 17 == 5:
            out.append(b"{}")
            continue
        doc: dict[str, Any] = {
            "i": i,
            "verb": rnd.choice(["get", "list", "watch"]),
            "msg": 'caf\u00e9 "quoted" \\ tab\t' * rnd.randint(0, 3),
            "nested": {"a": [1, 2.5, None, True], "b": {"c": "x" * rnd.randint(0, 200)}},
        }
        if big_every and i % big_every == 3:
            doc["blob"] = "y" * 20_000
        out.append(orjson.dumps(doc))
    return out


def times_for(count: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    # Whole seconds, odd nanoseconds, microseconds: the date texts differ in length.
    return [T0 + rnd.choice([0, 1, 999_999_999, rnd.randrange(10**9)]) + i * 10**9 for i in range(count)]


def block_batch(lines: list[bytes], times: list[int], tag: str = "app.log") -> Batch:
    """A lazy batch, as a json parser hands one over: the block, its times, records on demand."""
    block = ReadyBlock(
        b"".join(line + b"\n" for line in lines),
        len(lines),
        lambda: [Record(tag, t, None, line) for t, line in zip(times, lines, strict=True)],
    )
    block.times = array("q", times)  # what a parser's validation sets
    return Batch(tag, None, block=block)


def records_batch(lines: list[bytes], times: list[int], tag: str = "app.log") -> Batch:
    """The same records without a block: the Python formatter's path (the reference)."""
    return Batch(tag, [Record(tag, t, orjson.loads(line)) for t, line in zip(times, lines, strict=True)])


def sink(server: ScriptedServer, **props: Any) -> HttpOutputSink:
    return build(HttpOutputSink, host="127.0.0.1", port=server.port, **props)  # type: ignore[no-any-return]


# Three batches in a row: small (headers and body joined), ~1.3 MB with 20 KB lines, one line.
BATCHES = [(lines_of(40, 1), times_for(40, 1)), (lines_of(900, 2, 50), times_for(900, 2)), ([b"{}"], [T0])]


def expected_bodies(fmt: str, date_key: str | None, date_format: str) -> list[bytes]:
    bodies = [encode_batch(records_batch(lines, times), fmt, date_key, date_format) for lines, times in BATCHES]
    # What was sent before this body type: encode_batch of the block (natively framed bytes).
    before = [encode_batch(block_batch(lines, times), fmt, date_key, date_format) for lines, times in BATCHES]
    assert before == bodies
    return bodies


@pytest.mark.parametrize("compress", ["none", "gzip"])
@pytest.mark.parametrize(
    ("date_key", "date_format"),
    [*(("date", f) for f in DATE_FORMATS), ("@timestamp", "double"), ("false", "double")],
)
@pytest.mark.parametrize("fmt", ["json", "json_lines", "json_stream"])
async def test_bodies_from_a_block_are_the_bytes_sent_before(
    server: ScriptedServer, fmt: str, date_key: str, date_format: str, compress: str
) -> None:
    expected = expected_bodies(fmt, date_key_option(date_key), date_format)
    out = sink(server, format=fmt, json_date_key=date_key, json_date_format=date_format, compress=compress)
    try:
        for lines, times in BATCHES:
            await out.write(block_batch(lines, times))
    finally:
        await out.close()
    assert [r.body for r in server.requests] == expected
    for request, body in zip(server.requests, expected, strict=True):
        assert "Transfer-Encoding" not in request.headers
        if compress == "gzip":
            assert request.headers["Content-Encoding"] == "gzip"
            assert request.wire_size < len(body) or len(body) < 1000  # a tiny body does not shrink
        else:
            assert request.wire_size == len(body)


async def test_a_retried_batch_sends_the_same_bytes_again(server: ScriptedServer) -> None:
    """The sink runner retries by calling ``write`` again with the same batch."""
    server.answers = [Answer(503, b"busy", "text/plain"), Answer(500, b"", "text/plain")]
    lines, times = BATCHES[1]
    batch = block_batch(lines, times)
    (expected, *_) = [encode_batch(records_batch(lines, times), "json", "date", "double")]
    out = sink(server, format="json")
    try:
        for _ in range(2):
            with pytest.raises(RetryableError, match="HTTP 50"):
                await out.write(batch)
        await out.write(batch)
    finally:
        await out.close()
    assert [r.body for r in server.requests] == [expected] * 3


class Recording:
    """A FramedBody that records what its ``send`` calls wrote (the type is native: no patching)."""

    def __init__(self, body: Any) -> None:
        self.body = body
        self.sends: list[tuple[int, int, int]] = []  # (offset asked, header bytes, offset reached)

    def __len__(self) -> int:
        return len(self.body)

    def tobytes(self, offset: int = 0) -> bytes:
        return self.body.tobytes(offset)  # type: ignore[no-any-return]

    def send(self, fd: int, offset: int, head: bytes | None = None) -> int:
        reached: int = self.body.send(fd, offset, head)
        self.sends.append((offset, len(head or b""), reached))
        return reached


def recording(out: HttpOutputSink) -> list[Recording]:
    made: list[Recording] = []

    def body(batch: Batch) -> Any:
        framed = HttpOutputSink.body(out, batch)
        assert isinstance(framed, FramedBody), "a block with a date is framed natively"
        made.append(Recording(framed))
        return made[-1]

    out.body = body  # type: ignore[method-assign]
    return made


@contextlib.asynccontextmanager
async def slow_reader() -> AsyncIterator[tuple[int, list[bytes]]]:
    """An aiohttp server on a free port that waits 0.3 s before reading each request's body,
    so that a large body fills the socket; yields the port and the bodies it received."""
    received: list[bytes] = []

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)  # aiohttp stops reading the socket once its buffer is full
        received.append(await request.read())
        return web.Response(status=200)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_post("/", slow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner.addresses[0][1], received
    finally:
        await runner.cleanup()


async def test_tls_bodies_go_through_the_tls_layer(tls_files: dict[str, Path]) -> None:  # noqa: F811
    srv = await ScriptedServer().start(server_ctx(tls_files))
    srv.default = Answer(204, b"", "text/plain")
    lines, times = BATCHES[1]
    out = sink(srv, format="json", tls="on", **{"tls.ca_file": str(tls_files["ca.crt"])})
    made = recording(out)
    try:
        await out.write(block_batch(lines, times))
    finally:
        await out.close()
        await srv.stop()
    assert [r.body for r in srv.requests] == [encode_batch(records_batch(lines, times), "json", "date", "double")]
    assert made[0].sends == [], "never written to the raw socket under TLS"


def test_send_goes_on_from_where_the_socket_stopped() -> None:
    """FramedBody.send on a socket with small buffers: each call writes what fits and returns
    the offset reached; called again from there, the pieces follow on byte for byte."""
    lines, times = lines_of(600, 3, 40), times_for(600, 3)
    batch = block_batch(lines, times)
    body = HttpOutputSink.body(build(HttpOutputSink, format="json"), batch)
    assert isinstance(body, FramedBody)
    whole = body.tobytes()
    assert whole == encode_batch(records_batch(lines, times), "json", "date", "double")
    assert len(body) == body.size == len(whole)
    for offset in (0, 1, 17, len(whole) // 2, len(whole) - 1, len(whole)):
        assert body.tobytes(offset) == whole[offset:]
    writer, reader = socket.socketpair()
    with writer, reader:
        writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        writer.setblocking(False)
        reader.settimeout(1)
        for head in (None, b"POST / HTTP/1.1\r\n\r\n"):
            total = len(head or b"") + len(whole)
            got = bytearray()
            offset, calls = 0, 0
            while offset < total:
                reached = body.send(writer.fileno(), offset, head)
                assert offset <= reached <= total
                offset, calls = reached, calls + 1
                got += reader.recv(1 << 20)
            while len(got) < total:
                got += reader.recv(1 << 20)
            assert bytes(got) == (head or b"") + whole and calls > 3
        reader.close()
        with pytest.raises(OSError):  # the peer is gone: EPIPE / ECONNRESET, not a signal
            for _ in range(100):
                body.send(writer.fileno(), 0)


def test_a_block_natively_unframeable_is_encoded_as_before() -> None:
    """A line that is not an object cannot take a date, nor a time the native double writer
    leaves to orjson: the body is encode_batch's bytes (from records), as before."""
    out = build(HttpOutputSink, format="json")
    for lines, times in (([b'{"a":1}', b"[1,2]"], [T0, T0]), ([b'{"a":1}'], [5])):
        body = out.body(block_batch(lines, times))
        assert isinstance(body, bytes) and body == encode_batch(block_batch(lines, times), "json", "date", "double")


async def test_headers_method_and_uri_on_the_direct_path(server: ScriptedServer) -> None:
    """The headers taken from aiohttp's buffer into the body's writev are the request's own."""
    lines, times = BATCHES[1]
    out = sink(
        server,
        format="json_lines",
        http_user="user",
        http_passwd="p@ss",
        header=["X-Tenant team-a"],
        header_tag="X-Tag",
        http_method="put",
        uri="/ingest/v1",
    )
    made = recording(out)
    try:
        await out.write(block_batch(lines, times))
    finally:
        await out.close()
    (request,) = server.requests
    assert (request.method, request.path) == ("PUT", "/ingest/v1")
    assert request.headers["Authorization"] == "Basic dXNlcjpwQHNz"
    assert (request.headers["X-Tenant"], request.headers["X-Tag"]) == ("team-a", "app.log")
    assert request.headers["Content-Type"] == "application/x-ndjson"
    assert request.body == encode_batch(records_batch(lines, times), "json_lines", "date", "double")
    ((offset, head, reached),) = made[0].sends
    assert offset == 0 and head > 0 and reached == head + len(request.body)
