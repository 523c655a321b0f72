"""HTTP/1.1 over plain TCP without aiohttp: h11 speaks the protocol, the socket is this module's.

Used by :class:`~kubetrail.sinks.http_base.HttpClient` for the ``http`` output when ``tls`` is
off (TLS connections, and every other HTTP output, go through aiohttp as before). Why:

* **Start-up.** Importing aiohttp cost ~0.1 s of CPU per process here, ~40 ms of it two default
  TLS contexts that ``aiohttp.connector`` builds at import (each loading the system CA bundle),
  which a plain-http output never uses and which cannot be skipped without patching aiohttp.
  That alone was 11% of a 300,000-line run (issue 18's "within 10% of ``plain``"). h11 imports
  in ~7 ms and has no TLS state.
* **The body.** A body that writes itself to a file descriptor (``kubetrail_native.FramedBody``:
  a block's lines and their ``{"date":...,`` prefixes) goes to the socket straight from the
  block, the request's head in the same system call; when the socket would block, the request
  waits for it to be writable (``loop.add_writer`` on a socket no transport owns) and goes on
  from the offset reached. Through aiohttp the rest was copied into a bytes object for its
  transport, and aiohttp's per-request Python (~0.2 ms a request) is more than this module's.

h11 (python-hyper's sans-I/O HTTP/1.1 state machine) frames the request head and parses the
answer: status line, headers, ``Content-Length`` or chunked bodies, ``Connection: close``,
keep-alive. Its ``send_with_data_passthrough`` hands the body object back untouched, so h11
checks the declared length and this module writes the bytes.

Connections are kept alive (``net.keepalive``) in a pool without limit (the sink runner's
workers bound the concurrency); an idle one the server closed meanwhile is noticed before use
(a peek that sees EOF) and dropped. Errors are :class:`PlainHttpError` subclasses that the
client turns into its retryable errors with the same texts as the aiohttp path.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

import h11

READ_BYTES = 256 * 1024  # one recv: answers are small, a large one comes in few reads


class FdWritable(Protocol):
    """A body that writes itself (see :class:`~kubetrail.sinks.http_base.SocketWritable`)."""

    def __len__(self) -> int: ...

    def send(self, fd: int, offset: int, head: bytes | None = None) -> int: ...


PlainBody = bytes | FdWritable


class PlainHttpError(Exception):
    """A request that did not get a complete answer (the client says which kind)."""


class ConnectFailed(PlainHttpError):
    def __init__(self, error: OSError | None, address: str) -> None:
        super().__init__(f"cannot connect to {address}: {error or 'no address'}")
        self.os_error = error


class ConnectTimeout(PlainHttpError):
    pass


class ReadTimeout(PlainHttpError):
    pass


class MalformedAnswer(PlainHttpError):
    pass


@dataclass
class PlainAnswer:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


def request_target(path: str) -> str:
    """The path as it goes on the request line: characters that may not appear there
    percent-encoded (as aiohttp's URL handling does), escapes already written kept."""
    return quote(path, safe="/?&=:;@!$'()*+,%~-._[]")


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Connection:
    """One keep-alive TCP connection and its h11 state."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)

    def close(self) -> None:
        self.sock.close()

    def alive(self) -> bool:
        """Whether an idle connection may carry a request: not closed by the server meanwhile
        (a peek sees EOF) and nothing unasked-for waiting (a stray answer would be taken for
        the next request's)."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    async def writable(self) -> None:
        loop = asyncio.get_running_loop()
        fd = self.sock.fileno()
        future: asyncio.Future[None] = loop.create_future()
        loop.add_writer(fd, _wake, future)
        try:
            await future
        finally:
            loop.remove_writer(fd)

    def write_some(self, head: bytes, body: PlainBody | None, offset: int) -> int:
        """Writes ``head`` + ``body`` from ``offset`` on until the socket would block; the
        offset reached."""
        fd = self.sock.fileno()
        if body is not None and not isinstance(body, bytes):
            return body.send(fd, offset, head)
        pieces: list[bytes | memoryview] = []
        if offset < len(head):
            pieces.append(memoryview(head)[offset:])
        if body:
            pieces.append(memoryview(body)[max(0, offset - len(head)) :])
        while True:
            try:
                return offset + os.writev(fd, pieces)
            except BlockingIOError:
                return offset
            except InterruptedError:
                continue

    async def write(self, head: bytes, body: PlainBody | None) -> None:
        """In the event loop, not a worker thread (the native write releases the GIL all the
        same): handing each large body to a thread, as the file output does, cost ~0.03 s more
        CPU per 266 MB in GIL handoffs with the loop parsing the next block (futex calls 21 ->
        1,627 a run), and the walls did not show a gain on this 2-core machine."""
        total = len(head) + (len(body) if body is not None else 0)
        offset = self.write_some(head, body, 0)
        while offset < total:
            await self.writable()  # the socket is full: wait for it on the loop
            offset = self.write_some(head, body, offset)

    async def read_answer(self, io_timeout: float) -> PlainAnswer:
        loop = asyncio.get_running_loop()
        answer: PlainAnswer | None = None
        chunks: list[bytes] = []
        eof = False
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                if eof:  # h11's word for an answer cut short
                    raise ConnectionResetError(
                        f"the server closed the connection without a whole answer: {exc}"
                    ) from None
                raise MalformedAnswer(str(exc)) from None
            if event is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(io_timeout or None):
                        data = await loop.sock_recv(self.sock, READ_BYTES)
                except TimeoutError:
                    raise ReadTimeout(f"no answer within {io_timeout:g}s") from None
                self.h11.receive_data(data)  # b"": the server closed its side
                eof = not data
            elif isinstance(event, h11.Response):
                headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers]
                answer = PlainAnswer(event.status_code, event.reason.decode("latin-1"), headers, b"")
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert answer is not None  # h11 gives the head first
                answer.body = b"".join(chunks)
                return answer
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("the server closed the connection without a whole answer")
            # h11.InformationalResponse (100 Continue and the like): the final answer follows


class PlainHttpPool:
    """Requests to one ``host:port`` over plain TCP, connections kept alive and reused."""

    def __init__(self, host: str, port: int, *, connect_timeout: float, io_timeout: float, keepalive: bool) -> None:
        self.host, self.port = host, port
        self.connect_timeout, self.io_timeout, self.keepalive = connect_timeout, io_timeout, keepalive
        bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
        self.host_header = bracketed if port == 80 else f"{bracketed}:{port}"
        self._idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        address = f"{self.host}:{self.port}"
        error: OSError | None = None
        try:
            async with asyncio.timeout(self.connect_timeout or None):
                try:
                    infos = await loop.getaddrinfo(self.host.strip("[]"), self.port, type=socket.SOCK_STREAM)
                except OSError as exc:
                    raise ConnectFailed(exc, address) from None
                for family, kind, proto, _, where in infos:
                    sock = socket.socket(family, kind, proto)
                    sock.setblocking(False)
                    try:
                        await loop.sock_connect(sock, where)
                    except OSError as exc:
                        sock.close()
                        error = exc
                        continue
                    except BaseException:
                        sock.close()
                        raise
                    # The head and a small body must not wait for an ACK (Nagle), as aiohttp sets.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    return _Connection(sock)
        except TimeoutError:
            raise ConnectTimeout(f"cannot connect to {address} within {self.connect_timeout:g}s") from None
        raise ConnectFailed(error, address)

    async def _take(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.alive():
                return conn
            conn.close()
        return await self._connect()

    async def request(
        self, method: str, path: str, headers: Sequence[tuple[str, str]], body: PlainBody | None
    ) -> PlainAnswer:
        """One request and its whole answer. ``headers`` are the caller's (Host unless they
        name one, Content-Length and Connection are added here)."""
        all_headers = [(name.encode(), value.encode()) for name, value in headers]
        if not any(name.lower() == b"host" for name, _ in all_headers):  # a configured Host wins
            all_headers.insert(0, (b"Host", self.host_header.encode()))
        if body is not None or method not in ("GET", "HEAD"):
            all_headers.append((b"Content-Length", b"%d" % (len(body) if body is not None else 0)))
        if not self.keepalive:
            all_headers.append((b"Connection", b"close"))
        conn = await self._take()
        try:
            try:
                head = conn.h11.send(h11.Request(method=method, target=request_target(path), headers=all_headers))
                if body is not None and len(body):
                    conn.h11.send_with_data_passthrough(h11.Data(data=body))  # type: ignore[arg-type]
                conn.h11.send(h11.EndOfMessage())  # nothing to write after a Content-Length body
            except h11.LocalProtocolError as exc:
                raise PlainHttpError(f"cannot send this request: {exc}") from None
            assert head is not None
            await conn.write(head, body)
            answer = await conn.read_answer(self.io_timeout)
        except BaseException:
            conn.close()  # a half-written request or half-read answer: the connection is done
            raise
        if self.keepalive and conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            self._idle.append(conn)
        else:
            conn.close()
        return answer

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
