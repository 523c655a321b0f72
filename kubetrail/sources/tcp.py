"""The ``tcp`` input: records from plain TCP connections, as Fluent Bit's ``in_tcp`` takes them.

``format json`` (the default): a stream of JSON values, one after the other with or without
whitespace or newlines between them, each possibly split over several reads. An object is a
record; an array becomes ``{"msg": [...]}``; anything else is dropped (counted). ``format
none``: the bytes between ``separator`` (default a newline; ``\\n``, ``\\r``, ``\\t`` escapes are
understood) are one record ``{"log": "..."}``. Records are stamped with their arrival time;
``source_address_key`` adds ``tcp://IP:PORT`` of the client.

Limits, as Fluent Bit: a connection's unparsed data may grow by ``chunk_size`` up to
``buffer_size``; a client whose unfinished record passes that is disconnected (counted and
logged), the other connections go on.

Bad input, differently from Fluent Bit and why: Fluent Bit throws away the whole connection
buffer at the first invalid JSON, which loses the valid records that arrived with it. Here only
the bad part goes, up to the next newline after the error (an error is taken as final only once a
newline follows it, since before that more data may complete the value), and every drop is
counted (``kubetrail_errors_total{type="tcp_invalid_json"}``) and logged at most once a minute.
Data left when a client closes is still emitted (``none``) or counted as truncated (``json``).

Delivery: there is no acknowledgement in this protocol, so nothing can be replayed; what this
input can do is never read faster than the pipeline takes: each read is sent (``send`` waits
while the sink buffers are full) before the next read, so a full pipeline pushes back on the
clients through TCP flow control instead of growing memory or dropping.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import re
import time
from typing import Any

from kubetrail.core.component import ComponentContext, Emitter, Source
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.sources.server_base import (
    SERVER_TLS_OPTIONS,
    Warnings,
    bound_port,
    peer_address,
    server_tls,
    start_stream_server,
)

_WHITESPACE = re.compile(r"[ \t\r\n]*")
_DECODER = json.JSONDecoder()
_ESCAPES = {"\\n": "\n", "\\r": "\r", "\\t": "\t", "\\0": "\0", "\\\\": "\\"}


def unescape_separator(text: str) -> bytes:
    """The ``separator`` option as bytes: ``\\n``-style escapes become the characters."""
    out = re.sub(r"\\[nrt0\\]", lambda m: _ESCAPES[m.group(0)], text)
    if not out:
        raise ValueError("must not be empty")
    return out.encode()


class JsonStream:
    """Splits a text stream into JSON values (see the module docstring for the error rule)."""

    def __init__(self) -> None:
        self.text = ""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> None:
        self.text += self._utf8.decode(data)

    def values(self, final: bool = False) -> tuple[list[Any], list[str]]:
        """Complete values taken from the buffer, and the reasons of the parts thrown away."""
        text = self.text
        size = len(text)
        pos = 0
        values: list[Any] = []
        errors: list[str] = []
        while True:
            pos = _WHITESPACE.match(text, pos).end()  # type: ignore[union-attr]
            if pos >= size:
                break
            try:
                value, pos = _DECODER.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                newline = text.find("\n", max(exc.pos, pos))
                if newline < 0:
                    if not final:
                        break  # more data may complete it
                    errors.append(f"truncated JSON at the end of the connection: {exc.msg}")
                    pos = size
                    break
                errors.append(f"invalid JSON: {exc.msg} (column {exc.colno})")
                pos = newline + 1
                continue
            values.append(value)
        self.text = text[pos:]
        return values, errors

    def __len__(self) -> int:
        return len(self.text)


class TcpSource(Source):
    plugin_name = "tcp"
    description = "Receives JSON or separated text records over TCP"
    options = (
        Option("listen", "str", "0.0.0.0", help="Address to listen on"),
        Option("port", "int", 5170, help="TCP port (0: any free port)"),
        Option("format", "choice", "json", choices=("json", "none"), help="json values, or text split by separator"),
        Option("separator", "str", "\\n", help="Record separator for format none (escapes \\n \\r \\t)"),
        Option("chunk_size", "size", 32 * 1024, help="Bytes read at a time; the buffer grows by this much"),
        Option("buffer_size", "size", 64 * 1024, help="Most unparsed bytes per connection (else it is closed)"),
        Option("source_address_key", help="Key that receives the client's tcp://IP:PORT"),
        *SERVER_TLS_OPTIONS,
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.tag: str = config["tag"]
        self.host: str = config["listen"]
        self.port: int = config["port"]
        self.json = config["format"] == "json"
        try:
            self.separator = unescape_separator(config["separator"])
        except ValueError as exc:
            raise ConfigError(str(exc), key="separator") from None
        self.chunk_size: int = config["chunk_size"]
        self.buffer_size: int = config["buffer_size"]
        if self.chunk_size < 1 or self.buffer_size < self.chunk_size:
            raise ConfigError("buffer_size must be at least chunk_size (and both positive)", key="buffer_size")
        self.address_key: str | None = config["source_address_key"]
        self.tls = server_tls(config, self.log)
        self.warn = Warnings(self.log, self.metrics)
        self.started = asyncio.Event()
        self.bound_port: int | None = None
        self._stop = asyncio.Event()
        self._connections: set[asyncio.Task[Any]] = set()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, emitter: Emitter) -> None:
        self._emitter = emitter
        server = await start_stream_server(
            self._serve, host=self.host, port=self.port, unix_path=None, unix_perm=None, tls=self.tls
        )
        self.bound_port = bound_port(server)
        self.started.set()
        self.log.info("tcp input listening", extra={"listen": self.host, "port": self.bound_port})
        try:
            await self._stop.wait()
        finally:
            self.started.clear()
            server.close()
            for task in list(self._connections):
                task.cancel()
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        address = peer_address(writer, "tcp", None) if self.address_key else None
        try:
            if self.json:
                await self._serve_json(reader, address)
            else:
                await self._serve_text(reader, address)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve_json(self, reader: asyncio.StreamReader, address: str | None) -> None:
        stream = JsonStream()
        while True:
            data = await reader.read(self.chunk_size)
            stream.feed(data)
            values, errors = stream.values(final=not data)
            await self._emit_values(values, len(data), address)
            for reason in errors:
                self.warn("tcp_invalid_json", f"tcp input: dropped part of a client's data: {reason}", client=address)
            if not data:
                return
            if len(stream) > self.buffer_size:
                self._overflow(len(stream), address)
                return

    async def _serve_text(self, reader: asyncio.StreamReader, address: str | None) -> None:
        buffer = b""
        sep = self.separator
        while True:
            data = await reader.read(self.chunk_size)
            buffer += data
            pieces = buffer.split(sep)
            buffer = pieces.pop()  # the unfinished rest
            if not data and buffer:
                pieces.append(buffer)  # the client closed: its last record ends there
                buffer = b""
            lines = [p.decode("utf-8", "replace") for p in pieces if p]
            await self._emit_values([{"log": line} for line in lines], len(data), address)
            if not data:
                return
            if len(buffer) > self.buffer_size:
                self._overflow(len(buffer), address)
                return

    def _overflow(self, size: int, address: str | None) -> None:
        self.warn(
            "tcp_buffer_size",
            f"tcp input: a record passed buffer_size ({self.buffer_size} bytes, had {size}); connection closed",
            client=address,
        )

    async def _emit_values(self, values: list[Any], size: int, address: str | None) -> None:
        now = time.time_ns()
        records: list[Record] = []
        dropped = 0
        for value in values:
            if isinstance(value, dict):
                body = value
            elif isinstance(value, list):
                body = {"msg": value}
            else:
                dropped += 1
                continue
            if address is not None:
                body[self.address_key] = address
            records.append(Record(self.tag, now, body))
        if dropped:
            self.warn("tcp_not_a_map", "tcp input: dropped JSON values that are not an object or array", dropped)
        if records:
            await self._emitter.send(Batch(self.tag, records, None, size))
