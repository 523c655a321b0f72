"""The ``syslog`` input: RFC 3164 / RFC 5424 messages over UDP, TCP (optionally TLS) or Unix sockets.

Options are Fluent Bit's: ``mode`` (``unix_udp`` by default, ``unix_tcp``, ``tcp``, ``udp``),
``listen``, ``port`` (5140), ``path``, ``unix_perm`` (0644), ``parser``, ``buffer_chunk_size``
(32000), ``buffer_max_size`` (``buffer_chunk_size`` when unset), ``receive_buffer_size``,
``source_address_key``, ``raw_message_key``, the TCP framing (``format``, as the
documentation names it, or ``frame``, as the source does: ``newline`` or ``octet_counting``)
and the ``tls.*`` options of :mod:`kubetrail.sources.server_base` for ``mode tcp``.

Design decisions:

* **Parsers**: the default is ``syslog-rfc5424`` for ``tcp``/``udp`` and ``syslog-rfc3164-local``
  for the Unix socket modes, as in Fluent Bit. Those two and ``syslog-rfc3164`` are built in
  here with the regular expressions and time formats of Fluent Bit's stock ``parsers.conf``, so
  they work without a parsers file; a ``[PARSER]`` of the same name (or any other parser by
  name) takes precedence. One difference, on purpose: ``.`` also matches a newline (``(?s)``),
  so a message that spans lines (octet counting carries them) is kept whole; under Onigmo's
  rules ``$`` would end it at its first newline and the rest would be lost. The fields stay
  strings as that regex parser makes them (``pri`` "34"), the time is taken from ``time`` and
  kept (``Time_Keep On``); an RFC 3164 time has no year and gets the current one.
* **Framing**: UDP and ``unix_udp`` take one message per datagram (a datagram longer than
  ``buffer_chunk_size`` is cut there, as Fluent Bit's receive buffer does, and counted as
  ``kubetrail_errors_total{type="truncated"}``). TCP is newline-framed by default; with
  ``format octet_counting`` it is RFC 6587 ``LEN SP MSG``, which carries newlines inside a
  message. A message longer than ``buffer_max_size`` is skipped up to its end and counted
  (``type="too_long"``); the connection and everything after it go on. A broken octet count
  (not digits) closes that connection (``type="protocol_error"``): its framing is lost.
* **A message the parser does not match** is kept whole under ``log`` and counted
  (``type="unparsed"``, logged once a minute). Fluent Bit drops it with a warning; kubetrail
  does not lose a message for a format problem, the same choice as ``tail`` with a parser.
* **Delivery**: syslog has no acknowledgement. Over TCP a connection's next read waits while
  the pipeline cannot take the batch (backpressure, nothing dropped). UDP cannot be slowed
  down: datagrams wait in a queue of ``UDP_QUEUE_LIMIT`` and, past it, are dropped and counted
  (``kubetrail_records_dropped_total{reason="overflow"}``); ``receive_buffer_size`` (the
  socket's ``SO_RCVBUF``) absorbs bursts in the kernel. Use TCP for what must not be lost.
* ``source_address_key`` adds the sender as ``udp://IP:PORT`` or ``tcp://IP:PORT`` (Unix
  sockets: ``unix://PATH``); ``raw_message_key`` adds the message as received.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections import deque
from typing import Any

from kubetrail.core.component import ComponentContext, Emitter, Source
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch
from kubetrail.parsers.base import Parser
from kubetrail.parsers.regex_parser import RegexParser
from kubetrail.sources.server_base import (
    SERVER_TLS_OPTIONS,
    Warnings,
    bound_port,
    parse_unix_perm,
    peer_address,
    prepare_unix_path,
    remove_unix_path,
    server_tls,
    start_stream_server,
)

UDP_QUEUE_LIMIT = 50_000  # datagrams waiting for the pipeline before new ones are dropped
_MAX_OCTET_DIGITS = 10

# Fluent Bit's stock parsers.conf, same regular expressions and time formats.
RFC5424_REGEX = (
    r"(?s)^\<(?<pri>[0-9]{1,5})\>1 (?<time>[^ ]+) (?<host>[^ ]+) (?<ident>[^ ]+) (?<pid>[-0-9]+) "
    r"(?<msgid>[^ ]+) (?<extradata>(\[(.*?)\]|-)) (?<message>.+)$"
)
RFC3164_REGEX = (
    r"(?s)^\<(?<pri>[0-9]+)\>(?<time>[^ ]* {1,2}[^ ]* [^ ]*) (?<host>[^ ]*) (?<ident>[a-zA-Z0-9_\/\.\-]*)"
    r"(?:\[(?<pid>[0-9]+)\])?(?:[^\:]*\:)? *(?<message>.*)$"
)
RFC3164_LOCAL_REGEX = (
    r"(?s)^\<(?<pri>[0-9]+)\>(?<time>[^ ]* {1,2}[^ ]* [^ ]*) (?<ident>[a-zA-Z0-9_\/\.\-]*)"
    r"(?:\[(?<pid>[0-9]+)\])?(?:[^\:]*\:)? *(?<message>.*)$"
)


def builtin_syslog_parsers() -> dict[str, Parser]:
    return {
        "syslog-rfc5424": RegexParser(
            "syslog-rfc5424", RFC5424_REGEX, time_key="time", time_format="%Y-%m-%dT%H:%M:%S.%L%z", time_keep=True
        ),
        "syslog-rfc3164": RegexParser(
            "syslog-rfc3164", RFC3164_REGEX, time_key="time", time_format="%b %d %H:%M:%S", time_keep=True
        ),
        "syslog-rfc3164-local": RegexParser(
            "syslog-rfc3164-local", RFC3164_LOCAL_REGEX, time_key="time", time_format="%b %d %H:%M:%S", time_keep=True
        ),
    }


class FrameError(ValueError):
    """The stream's framing is broken; the connection cannot be read further."""


class Framer:
    """Splits a TCP byte stream into messages: newline-terminated or octet-counted."""

    def __init__(self, octet_counting: bool, max_size: int) -> None:
        self.octet_counting = octet_counting
        self.max_size = max_size
        self._buf = bytearray()
        self._skip = 0  # octet counting: bytes of an over-long message still to discard
        self._skip_line = False  # newline: discarding an over-long line up to its newline
        self.too_long = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        return self._octets() if self.octet_counting else self._lines()

    def _lines(self) -> list[bytes]:
        buf = self._buf
        out: list[bytes] = []
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            if self._skip_line:
                self._skip_line = False
            else:
                line = bytes(buf[start:end]).rstrip(b"\r\0")
                if len(line) > self.max_size:
                    self.too_long += 1
                elif line:
                    out.append(line)
            start = end + 1
        del buf[:start]
        if len(buf) > self.max_size:  # no end in sight: drop what we have, skip to the newline
            if not self._skip_line:
                self.too_long += 1
            self._skip_line = True
            buf.clear()
        return out

    def _octets(self) -> list[bytes]:
        buf = self._buf
        out: list[bytes] = []
        pos = 0
        while pos < len(buf):
            if self._skip:
                taken = min(self._skip, len(buf) - pos)
                self._skip -= taken
                pos += taken
                continue
            while pos < len(buf) and buf[pos] in b"\r\n":  # tolerated between frames
                pos += 1
            space = buf.find(b" ", pos, pos + _MAX_OCTET_DIGITS + 1)
            if space < 0:
                if len(buf) - pos > _MAX_OCTET_DIGITS:
                    raise FrameError(f"expected an octet count ('LEN '), got {bytes(buf[pos : pos + 20])!r}")
                break
            digits = bytes(buf[pos:space])
            if not digits.isdigit():
                raise FrameError(f"expected an octet count ('LEN '), got {bytes(buf[pos : pos + 20])!r}")
            length = int(digits)
            if length > self.max_size:
                self.too_long += 1
                self._skip = length
                pos = space + 1
                continue
            if len(buf) < space + 1 + length:
                break
            message = bytes(buf[space + 1 : space + 1 + length]).rstrip(b"\r\n\0")
            if message:
                out.append(message)
            pos = space + 1 + length
        del buf[:pos]
        return out


class _DatagramQueue(asyncio.DatagramProtocol):
    def __init__(self, source: SyslogSource) -> None:
        self.source = source

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.source._datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.source.warn("connection_error", f"UDP receive error: {exc}")


class SyslogSource(Source):
    plugin_name = "syslog"
    description = "Receives syslog messages (RFC 3164/5424) over UDP, TCP or Unix sockets"
    options = (
        Option("mode", "choice", "unix_udp", choices=("unix_udp", "unix_tcp", "tcp", "udp"), help="Transport"),
        Option("listen", "str", "0.0.0.0", help="Address to listen on (tcp, udp)"),
        Option("port", "int", 5140, help="Port (tcp, udp; 0: any free port)"),
        Option("path", help="Unix socket path (unix_tcp, unix_udp)"),
        Option("unix_perm", "str", "0644", help="Mode of the Unix socket file, octal"),
        Option("parser", help="Parser name (default: syslog-rfc5424 for tcp/udp, syslog-rfc3164-local for unix)"),
        Option("buffer_chunk_size", "size", 32000, help="Bytes read at a time; the largest UDP message"),
        Option("buffer_max_size", "size", None, help="Largest TCP message (default: buffer_chunk_size)"),
        Option("receive_buffer_size", "size", None, help="Socket receive buffer (SO_RCVBUF)"),
        Option("source_address_key", help="Key for the sender's address (udp://IP:PORT, tcp://IP:PORT)"),
        Option("raw_message_key", help="Key for the message as received"),
        Option("format", "choice", None, choices=("newline", "octet_counting"), help="TCP framing"),
        Option("frame", "choice", None, choices=("newline", "octet_counting"), help="TCP framing (same as format)"),
        *SERVER_TLS_OPTIONS,
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.tag: str = config["tag"]
        self.mode: str = config["mode"]
        self.unix = self.mode.startswith("unix_")
        self.stream = self.mode.endswith("tcp")
        self.host: str = config["listen"]
        self.port: int = config["port"]
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port {self.port} is out of range 0-65535", key="port")
        self.path: str | None = config["path"]
        if self.unix and not self.path:
            raise ConfigError(f"mode {self.mode} needs 'path' (the Unix socket to create)", key="path")
        self.unix_perm = parse_unix_perm(config["unix_perm"], 0o644)
        self.chunk_size: int = config["buffer_chunk_size"]
        if self.chunk_size <= 0:
            raise ConfigError("must be positive", key="buffer_chunk_size")
        self.max_size: int = config["buffer_max_size"] or self.chunk_size
        self.rcvbuf: int | None = config["receive_buffer_size"]
        self.address_key: str | None = config["source_address_key"]
        self.raw_key: str | None = config["raw_message_key"]
        framing = config["format"] or config["frame"] or "newline"
        if config["format"] and config["frame"] and config["format"] != config["frame"]:
            raise ConfigError("format and frame disagree; set one of them", key="frame")
        self.octet_counting = framing == "octet_counting"
        name = config["parser"] or ("syslog-rfc3164-local" if self.unix else "syslog-rfc5424")
        parser = ctx.parsers.get(name) or builtin_syslog_parsers().get(name)
        if parser is None:
            known = sorted({*ctx.parsers.names(), *builtin_syslog_parsers()})
            raise ConfigError(f"unknown parser {name!r}; known: {', '.join(known)}", key="parser")
        self.parser: Parser = parser
        if config["tls"] and not self.stream:
            raise ConfigError(f"TLS needs a stream mode (tcp or unix_tcp), not {self.mode}", key="tls")
        self.tls: ssl.SSLContext | None = server_tls(config, self.log)
        self.warn = Warnings(self.log, self.metrics)
        self._stop = asyncio.Event()
        self._emitter: Emitter | None = None
        self._datagrams: deque[tuple[bytes, str]] = deque()
        self._arrived = asyncio.Event()
        self._connections: set[asyncio.Task[Any]] = set()
        self.bound_port: int | None = None
        self.started = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, emitter: Emitter) -> None:
        self._emitter = emitter
        where = f"unix://{self.path}" if self.unix else f"{self.host}:{self.port}"
        if self.stream:
            server = await start_stream_server(
                self._serve,
                host=self.host,
                port=self.port,
                unix_path=self.path if self.unix else None,
                unix_perm=self.unix_perm,
                tls=self.tls,
            )
            self.bound_port = bound_port(server)
            try:
                await self._serving(where)
            finally:
                server.close()
                tasks = list(self._connections)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                remove_unix_path(self.path if self.unix else None)
            return
        transport = await self._open_datagram()
        consumer = asyncio.create_task(self._consume_datagrams())
        try:
            await self._serving(where)
        finally:
            transport.close()
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            if self._datagrams:  # received before the stop: still sent on
                await self._emit_datagrams()
            remove_unix_path(self.path if self.unix else None)

    async def _serving(self, where: str) -> None:
        self.started.set()
        self.log.info("syslog input listening", extra={"mode": self.mode, "address": where, "port": self.bound_port})
        try:
            await self._stop.wait()
        finally:
            self.started.clear()
            self.log.info("syslog input stopped")

    async def _open_datagram(self) -> asyncio.DatagramTransport:
        loop = asyncio.get_running_loop()
        family = socket.AF_UNIX if self.unix else (socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if self.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            if self.unix:
                assert self.path is not None
                prepare_unix_path(self.path)
                sock.bind(self.path)
                if self.unix_perm is not None:
                    os.chmod(self.path, self.unix_perm)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.port))
                self.bound_port = sock.getsockname()[1]
            sock.setblocking(False)
            transport, _ = await loop.create_datagram_endpoint(lambda: _DatagramQueue(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        return transport

    # -- UDP -----------------------------------------------------------------------------------

    def _datagram(self, data: bytes, addr: Any) -> None:
        if len(self._datagrams) >= UDP_QUEUE_LIMIT:
            self.metrics.dropped(1, "overflow")
            self.warn("overflow", f"UDP queue full ({UDP_QUEUE_LIMIT} datagrams): dropping; the pipeline is behind")
            return
        if len(data) > self.chunk_size:
            self.warn("truncated", f"datagram of {len(data)} bytes cut to buffer_chunk_size ({self.chunk_size})")
            data = data[: self.chunk_size]
        if self.unix:
            sender = f"unix://{self.path}"
        elif isinstance(addr, tuple):
            sender = f"udp://[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"udp://{addr[0]}:{addr[1]}"
        else:
            sender = "udp://unknown"
        self._datagrams.append((data, sender))
        self._arrived.set()

    async def _consume_datagrams(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            await self._emit_datagrams()

    async def _emit_datagrams(self) -> None:
        while self._datagrams:
            taken = [self._datagrams.popleft() for _ in range(min(len(self._datagrams), 5000))]
            messages = [data.rstrip(b"\r\n\0") for data, _ in taken]
            kept = [(m, sender) for m, (_, sender) in zip(messages, taken, strict=True) if m]
            await self._emit([m for m, _ in kept], [sender for _, sender in kept])

    # -- TCP -------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = peer_address(writer, "tcp", self.path if self.unix else None)
        if self.rcvbuf:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        framer = Framer(self.octet_counting, self.max_size)
        try:
            while not self._stop.is_set():
                data = await reader.read(self.chunk_size)
                if not data:
                    break
                messages = framer.feed(data)
                if framer.too_long:
                    self.warn(
                        "too_long",
                        f"message from {peer} longer than buffer_max_size ({self.max_size}) skipped",
                        count=framer.too_long,
                        peer=peer,
                    )
                    framer.too_long = 0
                if messages:
                    await self._emit(messages, [peer] * len(messages))
        except FrameError as exc:
            self.warn("protocol_error", f"closing the connection of {peer}: {exc}", peer=peer)
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            self.warn("connection_error", f"connection of {peer} failed: {exc}", peer=peer)
        except asyncio.CancelledError:
            pass  # stopping
        finally:
            self._connections.discard(task)
            writer.close()

    # -- records ---------------------------------------------------------------------------------

    async def _emit(self, messages: list[bytes], senders: list[str]) -> None:
        if not messages:
            return
        records, failed = self.parser.parse_lines(messages, self.tag)
        if failed:
            self.warn(
                "unparsed",
                f"{failed} messages did not match parser {self.parser.name!r}; kept under 'log'",
                count=failed,
            )
        if self.address_key or self.raw_key:
            for record, message, sender in zip(records, messages, senders, strict=True):
                body = record.mutable_body()
                if self.raw_key:
                    body[self.raw_key] = message.decode("utf-8", "replace")
                if self.address_key:
                    body[self.address_key] = sender
        assert self._emitter is not None
        await self._emitter.send(Batch(self.tag, records, None, sum(len(m) for m in messages)))
