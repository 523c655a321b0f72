"""A Fluent forward protocol server (the receiving side of Fluentd's ``in_forward``) for tests.

Why a fake: neither Fluentd nor Fluent Bit can be installed here (not in Debian bookworm's
archive, RubyGems is not reachable). This implements the documented protocol, Forward Protocol
Specification v1 (https://github.com/fluent/fluentd/wiki/Forward-Protocol-Specification-v1):

* all four event modes: Message ``[tag, time, record, option?]``, Forward
  ``[tag, [[time, record], ...], option?]``, PackedForward ``[tag, bin, option?]`` and
  CompressedPackedForward (``option.compressed == "gzip"``, the bin gzip-compressed);
* time as an integer or as EventTime (msgpack ext type 0: uint32 seconds, uint32 nanoseconds,
  big endian);
* ``option.chunk`` answered with ``{"ack": chunk}`` once the events are stored; ``option.size``
  checked against the number of events;
* the handshake: ``HELO`` with a nonce (and a user-auth salt when users are configured),
  ``PING`` verified (``sha512_hex(shared_key_salt + hostname + nonce + shared_key)``,
  ``sha512_hex(auth_salt + username + password)``), ``PONG`` with the result, the reason and
  the server's own digest; a failed authentication closes the connection after the PONG;
* its error answers, which in this protocol are closing the connection: on a malformed message
  (not an array, unknown mode, a bad time, size mismatch, corrupt gzip), as Fluentd does.

Knobs for fault tests: ``ack`` (answer chunks or not), ``close_before_ack`` (store nothing and
close the connection for the next N messages), ``accept_any_key`` (an impostor server).

The message decoding and the handshake's digests are kubetrail's own
(:mod:`kubetrail.core.forward_protocol`, shared with the ``forward`` input and output); the
``forward`` input itself is tested against independent clients (tests/unit/test_input_forward.py).
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack

from kubetrail.core import forward_protocol as fwd
from kubetrail.core.forward_protocol import ProtocolError


@dataclass(frozen=True)
class Event:
    tag: str
    time_ns: int
    record: dict[str, Any]
    event_time: bool  # sent as EventTime (True) or as an integer (False)


@dataclass
class FakeForwardServer:
    shared_key: str | None = None
    users: dict[str, str] = field(default_factory=dict)
    hostname: str = "fake-fluentd"
    tls: ssl.SSLContext | None = None
    ack: bool = True
    accept_any_key: bool = False  # an impostor: says yes to every PING (its PONG digest gives it away)
    close_before_ack: int = 0
    events: list[Event] = field(default_factory=list)
    modes: Counter[str] = field(default_factory=Counter)
    chunks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    auth_failures: list[str] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _server: asyncio.base_events.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port or self.port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.close()
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        unpacker = fwd.unpacker()
        try:
            if self.shared_key is not None and not await self._handshake(reader, writer, unpacker):
                return
            while True:
                for message in unpacker:
                    await self._message(message, writer)
                data = await reader.read(65536)
                if not data:
                    return
                unpacker.feed(data)
        except ProtocolError as exc:
            self.errors.append(str(exc))  # Fluentd logs it and closes the connection
        except (ConnectionError, ssl.SSLError, msgpack.UnpackException, ValueError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _next(self, reader: asyncio.StreamReader, unpacker: msgpack.Unpacker) -> Any:
        while True:
            for item in unpacker:
                return item
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            unpacker.feed(data)

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, unpacker: msgpack.Unpacker
    ) -> bool:
        assert self.shared_key is not None
        nonce = os.urandom(16)
        auth_salt = os.urandom(16) if self.users else b""
        writer.write(msgpack.packb(fwd.helo(nonce, auth_salt)))
        await writer.drain()
        ping = await self._next(reader, unpacker)
        reason, salt, _client = fwd.check_ping(ping, nonce, auth_salt, self.shared_key, self.users)
        ok = not reason or self.accept_any_key
        answer = fwd.pong("" if ok else reason, self.hostname, salt, nonce, self.shared_key)
        writer.write(msgpack.packb(answer))
        await writer.drain()
        if not ok:
            self.auth_failures.append(reason)
        return ok

    async def _message(self, message: Any, writer: asyncio.StreamWriter) -> None:
        tag, mode, entries, option = fwd.decode_message(message)
        events = []
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], dict)):
                raise ProtocolError(f"bad entry {entry!r:.100}")
            time_ns, is_event_time = fwd.decode_time(entry[0])
            events.append(Event(tag, time_ns, entry[1], is_event_time))
        if "size" in option and option["size"] != len(events):
            raise ProtocolError(f"option.size {option['size']} but {len(events)} events")
        if self.close_before_ack > 0:
            self.close_before_ack -= 1
            raise ProtocolError("closing before the ack (fault injection)")
        self.events.extend(events)
        self.modes[mode] += 1
        chunk = option.get("chunk")
        if chunk is not None:
            self.chunks.append(chunk)
            if self.ack:
                writer.write(msgpack.packb({"ack": chunk}))
                await writer.drain()
