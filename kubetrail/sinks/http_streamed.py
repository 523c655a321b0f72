"""Large request bodies through aiohttp without its join of headers and body (used by
:class:`~kubetrail.sinks.http_base.HttpClient` on its aiohttp connections: TLS, and every HTTP
output but ``http`` on plain TCP, which :mod:`kubetrail.sinks.http_plain` serves).

aiohttp 3.12+ on Python before 3.12.9 joins the request's headers and body into a new bytes
object, a copy of every body into fresh memory. :class:`StreamedBody` writes the headers and a
body of 64 KiB and more with one ``writev`` on a plain TCP connection whose transport has
nothing queued, straight from the body's own bytes (a :class:`~kubetrail.sinks.http_base.
SocketWritable` from the block it frames); what the socket does not take, and everything on
TLS, goes to aiohttp's writer (the transport queues it). A module of its own so that importing
:mod:`kubetrail.sinks.http_base` does not import aiohttp (its payload class is the base here).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import aiohttp.payload

if TYPE_CHECKING:
    from kubetrail.sinks.http_base import Body

STREAMED_BODY_BYTES = 64 * 1024  # below this, aiohttp's join of headers and body costs next to nothing


def plain_socket_fd(writer: Any) -> int | None:
    """The socket under aiohttp's ``writer`` when bytes may be written to it directly: a plain
    TCP connection (not TLS) whose transport has nothing queued; None otherwise."""
    transport = getattr(writer, "transport", None)
    if transport is None or transport.is_closing() or transport.get_write_buffer_size():
        return None
    if transport.get_extra_info("sslcontext") is not None or transport.get_extra_info("ssl_object") is not None:
        return None  # TLS: the bytes must go through the TLS layer
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else None


def take_headers(writer: Any) -> bytes | None:
    """The request's serialised headers, taken from aiohttp's writer (3.12+ buffers them until
    the body's first write, as ``send_headers`` does) so that one ``writev`` carries them with
    the body; None where this aiohttp has no such buffer (then ``send_headers`` writes them)."""
    buf = getattr(writer, "_headers_buf", None)
    if not isinstance(buf, bytes) or not buf or getattr(writer, "_headers_written", True):
        return None
    writer._headers_buf, writer._headers_written = None, True
    return buf


def writev_nonblocking(fd: int, pieces: list[bytes | memoryview]) -> int:
    """``os.writev`` on a non-blocking socket: the bytes it took (0 when it would block)."""
    while True:
        try:
            return os.writev(fd, pieces)
        except BlockingIOError:
            return 0
        except InterruptedError:
            continue


class StreamedBody(aiohttp.payload.Payload):
    """A body written with the request's headers by one ``writev`` on a plain TCP connection
    (:func:`plain_socket_fd`), straight from its own bytes (a :class:`SocketWritable` from the
    block it frames): not joined with the headers into a new bytes object. What the socket does
    not take, and everything on TLS, goes to aiohttp's writer (the transport queues it).
    Stateless: aiohttp may write it again (a retry on a new connection)."""

    def __init__(self, value: Body, content_type: str | None = None) -> None:
        super().__init__(value, content_type=content_type)
        self._size = len(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        value = self._value
        return (value if isinstance(value, bytes) else value.tobytes()).decode(encoding, errors)

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        value: Body = self._value
        size = len(value) if content_length is None else min(len(value), content_length)
        # Only where the bytes go out as they are: no chunked framing, no aiohttp compression.
        plain = not getattr(writer, "chunked", False) and getattr(writer, "_compress", None) is None
        if size and size == len(value) and plain:
            fd = plain_socket_fd(writer)
            head = take_headers(writer) if fd is not None else None
            if fd is not None and head is not None:
                reached = writev_nonblocking(fd, [head, value]) if isinstance(value, bytes) else value.send(fd, 0, head)
                if reached < len(head):  # the socket took not even the headers: the rest, queued
                    writer.transport.write(head[reached:])
                    reached = len(head)
                await self._write_rest(writer, value, reached - len(head), size)
                return
        send_headers = getattr(writer, "send_headers", None)
        if send_headers is not None and size:
            send_headers()  # alone, not joined with the body
        await self._write_rest(writer, value, 0, size)

    @staticmethod
    async def _write_rest(writer: Any, value: Body, sent: int, size: int) -> None:
        if sent >= size:
            return
        if isinstance(value, bytes):
            await writer.write(value if (sent, size) == (0, len(value)) else memoryview(value)[sent:size])
        else:
            await writer.write(value.tobytes(sent)[: size - sent])
