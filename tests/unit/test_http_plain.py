"""The ``http`` output on plain TCP without aiohttp (kubetrail/sinks/http_plain.py: h11 and a
socket of its own). What test_http_body.py and test_http_sink.py check (the bytes of every
format, gzip, retries, auth, headers, status classification) runs on this path already, against
real aiohttp servers; here: that aiohttp is not imported, the body written from the offset the
socket reached when it would block, keep-alive and a connection the server
closed while idle, answers h11 parses (chunked, informational, ``Connection: close``), and
servers that misbehave (garbage, no answer, never reading the body). The misbehaving servers
are small asyncio socket servers scripted here: no real server does these things on demand."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable

import pytest

from kubetrail.core.errors import PermanentError, RetryableError
from kubetrail.core.record import Batch, Record
from kubetrail.sinks.http import HttpOutputSink
from kubetrail.sinks.json_format import encode_batch
from tests.unit.helpers import build
from tests.unit.test_http_body import (
    FramedBody,
    block_batch,
    lines_of,
    recording,
    records_batch,
    slow_reader,
    times_for,
)

pytestmark = pytest.mark.skipif(FramedBody is None, reason="kubetrail_native is not built")

T0 = 1_700_000_000_123_456_789


def small_batch(n: int = 3) -> Batch:
    return Batch("t", [Record("t", T0 + i, body_={"n": i}) for i in range(n)])


class RawServer:
    """An asyncio TCP server whose ``serve(reader, writer)`` is the test's script; counts
    connections and keeps what each one sent."""

    def __init__(self, serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.serve = serve
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.serve(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self._server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request with a Content-Length body: (head, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


def test_a_plain_http_output_does_not_import_aiohttp() -> None:
    """The whole point at start-up (~0.1 s of CPU): a process whose only network output is a
    plain-http ``http`` output sends its batches without aiohttp in ``sys.modules``. The
    receiver is the standard library's HTTP server, in the same process."""
    script = r"""
import asyncio, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from kubetrail.core.record import Batch, Record
from kubetrail.sinks.http import HttpOutputSink
from kubetrail.sinks.json_format import encode_batch
from tests.unit.helpers import build

def small_batch(n):
    return Batch("t", [Record("t", 1_700_000_000_123_456_789 + i, body_={"n": i}) for i in range(n)])

bodies = []
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(204)
        self.end_headers()
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
out = build(HttpOutputSink, host="127.0.0.1", port=server.server_address[1], format="json_lines")
async def main():
    try:
        await out.write(small_batch(3))
        await out.write(small_batch(5))
    finally:
        await out.close()
asyncio.run(main())
server.shutdown()
assert bodies == [encode_batch(small_batch(n), "json_lines", "date", "double") for n in (3, 5)], bodies
print("aiohttp" in sys.modules, sorted(m for m in sys.modules if m.startswith("aiohttp"))[:3])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False []"


@pytest.mark.parametrize("fmt", ["json", "json_lines"])
async def test_a_body_the_socket_cannot_take_goes_on_from_the_offset_reached(fmt: str) -> None:
    """A server that reads late: each write takes what the socket takes; the request waits on
    the event loop for the socket to be writable and goes on from the offset reached (no copy
    of the rest). Same bytes; the next request on the connection too."""
    lines, times = lines_of(3000, 7, 4), times_for(3000, 7)  # ~15 MB
    async with slow_reader() as (port, received):
        out = build(HttpOutputSink, host="127.0.0.1", port=port, format=fmt)
        made = recording(out)
        try:
            await out.write(block_batch(lines, times))
            await out.write(block_batch(lines[:10], times[:10]))
        finally:
            await out.close()
    expected = [
        encode_batch(records_batch(ls, ts), fmt, "date", "double")
        for ls, ts in ((lines, times), (lines[:10], times[:10]))
    ]
    assert received == expected
    sends = made[0].sends  # (offset asked, head bytes, offset reached)
    assert len(sends) > 2, "the socket would block: several writes"
    assert sends[0][0] == 0 and all(sends[k][0] == sends[k - 1][2] for k in range(1, len(sends)))
    head = sends[0][1]
    assert head > 0 and sends[-1][2] == head + len(expected[0]), "the request's head went with the body"
    ((offset, head, reached),) = made[1].sends
    assert offset == 0 and head > 0 and reached == head + len(expected[1]), "the next request: all in one call"


async def test_keepalive_one_connection_and_an_idle_one_the_server_closed() -> None:
    """Requests reuse one connection; with ``net.keepalive off`` each opens its own and says
    ``Connection: close``. A connection the server closed while idle is not used: the next
    request opens a new one and succeeds (no error, no retry)."""
    heads: list[bytes] = []

    async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            heads.append(head)
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
            if b"connection: close" in head.lower():
                return

    async with RawServer(keep) as server:
        for keepalive, connections in (("on", 1), ("off", 3)):
            server.connections = 0
            out = build(
                HttpOutputSink, host="127.0.0.1", port=server.port, format="json", **{"net.keepalive": keepalive}
            )
            try:
                for _ in range(3):
                    await out.write(small_batch())
            finally:
                await out.close()
            assert server.connections == connections
    assert [b"Connection: close" in head for head in heads] == [False] * 3 + [True] * 3
    assert all(head.startswith(b"POST / HTTP/1.1\r\n") and b"\r\nHost: 127.0.0.1:" in head for head in heads)

    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # keep-alive, then gone
        await writer.drain()

    async with RawServer(one_answer) as server:
        out = build(HttpOutputSink, host="127.0.0.1", port=server.port, format="json")
        try:
            await out.write(small_batch())
            await asyncio.sleep(0.1)  # the server has closed the idle connection
            await out.write(small_batch())
        finally:
            await out.close()
        assert server.connections == 2


async def test_answers_chunked_informational_and_connection_close() -> None:
    """A 100 Continue before the answer, a chunked 400 whose body the error quotes, an answer
    that closes the connection: h11 reads each; the next request opens a new connection."""
    script = [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfield \r\n9\r\nrejected!\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ]

    async def scripted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while script:
            await read_request(reader)
            answer = script.pop(0)
            writer.write(answer)
            await writer.drain()
            if b"Connection: close" in answer:
                return

    async with RawServer(scripted) as server:
        out = build(HttpOutputSink, host="127.0.0.1", port=server.port, format="json")
        try:
            await out.write(small_batch())
            with pytest.raises(PermanentError, match="HTTP 400 Bad Request: field rejected!"):
                await out.write(small_batch())
            await out.write(small_batch())
            await out.write(small_batch())
        finally:
            await out.close()
        assert server.connections == 2


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"garbage that is not HTTP\r\n\r\n", "malformed HTTP answer"),
        (b"", "closed the connection without a whole answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "closed the connection without a whole answer"),
    ],
)
async def test_a_bad_or_missing_answer_is_retryable(answer: bytes, error: str) -> None:
    async def scripted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async with RawServer(scripted) as server:
        out = build(HttpOutputSink, host="127.0.0.1", port=server.port, format="json")
        try:
            with pytest.raises(RetryableError, match=error):
                await out.write(small_batch())
        finally:
            await out.close()


async def test_a_server_that_never_reads_times_out_and_the_connection_is_closed() -> None:
    """The body cannot be written (the server reads nothing): the request's deadline ends it
    with a retryable error, and the client closes the connection (the server sees EOF once it
    reads) rather than leaving a half-written request on it."""
    closed = asyncio.Event()

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(1.0)
        while await reader.read(1 << 20):  # everything the client wrote, then its EOF
            pass
        closed.set()

    lines, times = lines_of(3000, 7, 4), times_for(3000, 7)  # ~15 MB: more than the socket takes
    async with RawServer(deaf) as server:
        out = build(
            HttpOutputSink,
            host="127.0.0.1",
            port=server.port,
            format="json_lines",
            **{"net.io_timeout": "0.2", "net.connect_timeout": "0.2"},
        )
        try:
            with pytest.raises(RetryableError, match=r"no answer within 0\.4s"):
                await out.write(block_batch(lines, times))
        finally:
            await out.close()
        await asyncio.wait_for(closed.wait(), 10)


async def test_a_host_name_and_a_refused_port() -> None:
    """``localhost`` is resolved (each address tried in turn); a port nobody listens on is a
    retryable 'cannot connect'."""
    heads: list[bytes] = []

    async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append((await read_request(reader))[0])
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    async with RawServer(keep) as server:
        out = build(HttpOutputSink, host="localhost", port=server.port, format="json", uri="/a b/c%20d")
        try:
            await out.write(small_batch())
        finally:
            await out.close()
    assert heads[0].startswith(b"POST /a%20b/c%20d HTTP/1.1\r\n")
    assert f"\r\nHost: localhost:{server.port}\r\n".encode() in heads[0]
    out = build(HttpOutputSink, host="127.0.0.1", port=server.port, format="json")  # now closed
    try:
        with pytest.raises(RetryableError, match="cannot connect"):
            await out.write(small_batch())
    finally:
        await out.close()


async def test_configured_headers_replace_the_defaults() -> None:
    """A configured ``Host``, ``User-Agent`` or ``Accept`` header is sent instead of the
    default one, never beside it (a second Host is a 400 at most servers), as aiohttp did."""
    heads: list[bytes] = []

    async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append((await read_request(reader))[0])
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    async with RawServer(keep) as server:
        for header in ([], ["Host logs.example", "User-Agent fluent-bit", "accept application/json"]):
            out = build(HttpOutputSink, host="127.0.0.1", port=server.port, format="json", header=header)
            try:
                await out.write(small_batch())
            finally:
                await out.close()
    default, configured = ([line.lower() for line in head.split(b"\r\n")] for head in heads)
    assert b"host: 127.0.0.1:%d" % server.port in default and b"accept: */*" in default
    assert any(line.startswith(b"user-agent: kubetrail/") for line in default)
    for name, value in ((b"host", b"logs.example"), (b"user-agent", b"fluent-bit"), (b"accept", b"application/json")):
        assert [line for line in configured if line.startswith(name + b":")] == [name + b": " + value]
