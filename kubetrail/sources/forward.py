"""The ``forward`` input: a Fluentd / Fluent Bit forward protocol server.

Options are Fluent Bit's: ``listen``, ``port``, ``unix_path``, ``unix_perm``,
``buffer_chunk_size``, ``buffer_max_size``, ``tag`` (replaces the incoming tag), ``tag_prefix``
(prepended to it), ``shared_key``, ``empty_shared_key``, ``self_hostname``, ``security.users``
(repeatable ``USER PASSWORD``) and the ``tls.*`` options of
:mod:`kubetrail.sources.server_base`. The protocol itself (all four event modes, EventTime,
the handshake) is :mod:`kubetrail.core.forward_protocol`, shared with the ``forward`` output.

Design decisions:

* **Acknowledgement**: a message whose option carries ``chunk`` is answered ``{"ack": chunk}``
  only once its batch's :class:`~kubetrail.core.acks.AckToken` completes, as the audit webhook
  answers 200: with the memory buffer that is once every sink delivered it, with
  ``storage.type filesystem`` once it is in every output's disk queue. A client that waits for
  acks (``require_ack_response``) therefore gets at-least-once delivery end to end. A batch a
  sink dropped is not acknowledged (the client sends it again); nor is one in flight when the
  connection closes. Acks are matched by chunk id, so a connection keeps reading while earlier
  chunks wait for theirs.
* **Backpressure**: a connection's next read waits while the pipeline cannot take its batch
  (sink buffers full, ``mem_buf_limit``), so TCP slows the client down; nothing is dropped.
* **Batches**: the messages that one read completes, with the same tag and no ``chunk``, go
  out as one batch (a Message-mode client sends one record per message); a chunked message is
  always a batch of its own, so its ack covers exactly it.
* **Bad input**: bytes that are not msgpack, a message that is not a forward message, corrupt
  or oversized gzip, a message larger than ``buffer_max_size``: the connection is closed
  (Fluentd's answer; there is no error message in this protocol), the problem is counted in
  ``kubetrail_errors_total{type}`` and logged once a minute per kind; other connections go on.
  An *entry* that is malformed (a bad time, a record that is not a map) is dropped on its own
  and counted as ``kubetrail_records_dropped_total{reason="invalid"}``; the rest of its message
  is kept and acknowledged.
* **Handshake**: with ``shared_key`` (or ``empty_shared_key``) each connection starts with
  HELO; a wrong key or user is answered with a PONG saying why and the connection is closed
  (``kubetrail_errors_total{type="auth_failed"}``). ``security.users`` needs a shared key, as
  in Fluent Bit.
* **Records**: each record is kept with its JSON bytes (so JSON sinks do not encode it again);
  msgpack values JSON has no form for are converted: bin to text (UTF-8, invalid bytes
  replaced), non-string map keys to strings, other ext types to hex text.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from typing import Any

import msgpack
import orjson

from kubetrail.core import forward_protocol as fwd
from kubetrail.core.acks import AckToken
from kubetrail.core.component import ComponentContext, Emitter, Source
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.core.secrets import Secret, Text, reveal
from kubetrail.sources.server_base import (
    SERVER_TLS_OPTIONS,
    Warnings,
    bound_port,
    parse_unix_perm,
    peer_address,
    remove_unix_path,
    server_tls,
    start_stream_server,
)

HANDSHAKE_TIMEOUT = 30.0  # a client that connects and never answers HELO holds one coroutine this long
STOP_ACK_WAIT = 3.0  # at shutdown, how long a connection waits for its routed chunks' acks


class _Connection:
    """One client: its writer (shared by the reading loop and the ack writers) and its acks."""

    def __init__(self, writer: asyncio.StreamWriter, peer: str) -> None:
        self.writer = writer
        self.peer = peer
        self.lock = asyncio.Lock()
        self.acks: set[asyncio.Task[None]] = set()

    async def send(self, obj: Any) -> None:
        async with self.lock:
            self.writer.write(msgpack.packb(obj, use_bin_type=True))
            await self.writer.drain()


def _jsonable(value: Any) -> Any:
    """A msgpack value JSON can carry (see the module docstring)."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, msgpack.ExtType):
        if value.code == 0 and len(value.data) == 8:  # an EventTime inside a record: seconds
            return fwd.decode_time(value)[0] / 1e9
        return value.data.hex()
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return str(value)
    return value


class ForwardSource(Source):
    plugin_name = "forward"
    description = "Receives records from Fluentd and Fluent Bit (forward protocol); acks chunks once accepted"
    options = (
        Option("listen", "str", "0.0.0.0", help="Address to listen on"),
        Option("port", "int", 24224, help="TCP port (0: any free port)"),
        Option("unix_path", help="Unix socket to listen on instead of listen/port"),
        Option("unix_perm", help="Mode of the Unix socket file, octal (e.g. 0660)"),
        Option("buffer_chunk_size", "size", 1024000, help="Bytes read from a connection at a time"),
        Option("buffer_max_size", "size", 6144000, help="Largest message, also after gzip (larger: connection closed)"),
        Option("tag_prefix", help="Prefix added to the incoming tag"),
        Option("shared_key", help="Shared key of the secure-forward handshake", secret=True),
        Option("empty_shared_key", "bool", False, help="Do the handshake with an empty shared key"),
        Option("self_hostname", "str", "localhost", help="Host name sent in the handshake's PONG"),
        Option(
            "security.users",
            multiple=True,
            help="'USER PASSWORD' accepted in the handshake (repeatable)",
            secret=True,
        ),
        *SERVER_TLS_OPTIONS,
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        # The pipeline fills in the instance name as the tag when none is given; only a tag the
        # user wrote replaces the incoming one.
        explicit_tag = ctx.section is not None and ctx.section.get("tag") is not None
        self.override_tag: str | None = config["tag"] if explicit_tag else None
        self.tag_prefix: str = config["tag_prefix"] or ""
        self.host: str = config["listen"]
        self.port: int = config["port"]
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port {self.port} is out of range 0-65535", key="port")
        self.unix_path: str | None = config["unix_path"]
        self.unix_perm = parse_unix_perm(config["unix_perm"], None)
        self.chunk_size: int = config["buffer_chunk_size"]
        self.max_size: int = config["buffer_max_size"]
        if self.chunk_size <= 0:
            raise ConfigError("must be positive", key="buffer_chunk_size")
        if self.max_size < self.chunk_size:
            raise ConfigError(
                f"buffer_max_size ({self.max_size}) is smaller than buffer_chunk_size ({self.chunk_size})",
                key="buffer_max_size",
            )
        shared_key: Text | None = config["shared_key"]
        if shared_key is None and config["empty_shared_key"]:
            shared_key = ""
        # Credentials may follow files (${file:...}): revealed at each handshake.
        self.shared_key = shared_key
        self.self_hostname: str = config["self_hostname"]
        self._user_entries: list[Text] = list(config["security.users"] or [])
        self.users = self._users()
        if self.users and self.shared_key is None:
            raise ConfigError(
                "security.users needs shared_key (or empty_shared_key on): users are checked in the handshake",
                key="security.users",
            )
        self.tls: ssl.SSLContext | None = server_tls(config, self.log)
        self.warn = Warnings(self.log, self.metrics)
        self._stop = asyncio.Event()
        self._connections: dict[asyncio.Task[Any], _Connection] = {}
        self._emitter: Emitter | None = None
        self.server: asyncio.Server | None = None
        self.bound_port: int | None = None
        self.started = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(self, emitter: Emitter) -> None:
        self._emitter = emitter
        self.server = await start_stream_server(
            self._serve,
            host=self.host,
            port=self.port,
            unix_path=self.unix_path,
            unix_perm=self.unix_perm,
            tls=self.tls,
        )
        self.bound_port = bound_port(self.server)
        self.started.set()
        where = f"unix://{self.unix_path}" if self.unix_path else f"{self.host}:{self.bound_port}"
        self.log.info("forward input listening", extra={"address": where, "tls": self.tls is not None})
        try:
            await self._stop.wait()
        finally:
            self.started.clear()
            self.server.close()
            # Stop reading: a batch being routed when cancelled stays in flight (not acknowledged,
            # so the client sends it again); batches already routed still get their acks.
            readers = list(self._connections)
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            remove_unix_path(self.unix_path)
            self.log.info("forward input stopped")

    # -- connections -------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = _Connection(writer, peer_address(writer, "tcp", self.unix_path))
        self._connections[task] = conn
        unpacker = fwd.unpacker(self.max_size)
        try:
            if self.shared_key is not None and not await self._handshake(reader, conn, unpacker):
                return
            while not self._stop.is_set():
                data = await reader.read(self.chunk_size)
                if not data:
                    break
                try:
                    unpacker.feed(data)
                except msgpack.BufferFull:
                    raise fwd.ProtocolError(f"message larger than buffer_max_size ({self.max_size} bytes)") from None
                await self._process(unpacker, conn)
            # Batches already routed: answer their chunks before closing (the pipeline's grace
            # bounds this when the sinks are down).
            if conn.acks:
                await asyncio.gather(*list(conn.acks), return_exceptions=True)
        except fwd.ProtocolError as exc:
            self.warn("protocol_error", f"closing the connection of {conn.peer}: {exc}", peer=conn.peer)
        except (msgpack.UnpackException, ValueError) as exc:
            self.warn("protocol_error", f"closing the connection of {conn.peer}: not msgpack ({exc})", peer=conn.peer)
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            self.warn("connection_error", f"connection of {conn.peer} failed: {exc}", peer=conn.peer)
        except asyncio.CancelledError:
            pass  # stopping
        finally:
            self._connections.pop(task, None)
            if conn.acks and self._stop.is_set():
                # Stopping: the sinks keep delivering meanwhile, so most routed chunks can still
                # be acknowledged instead of being sent again after the restart.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait(list(conn.acks), timeout=STOP_ACK_WAIT)
            for ack in list(conn.acks):
                ack.cancel()
            writer.close()

    async def _next(self, reader: asyncio.StreamReader, unpacker: msgpack.Unpacker) -> Any:
        while True:
            for item in unpacker:
                return item
            data = await reader.read(self.chunk_size)
            if not data:
                raise ConnectionError("closed during the handshake")
            unpacker.feed(data)

    def _users(self) -> dict[str, str]:
        """``security.users`` as user -> password, with the current content of their files."""
        users: dict[str, str] = {}
        for entry in self._user_entries:
            user, _, password = (reveal(entry) or "").strip().partition(" ")
            if not user or not password.strip():
                shown = entry.text if isinstance(entry, Secret) else entry
                raise ConfigError(f"{shown!r} is not 'USER PASSWORD'", key="security.users")
            users[user] = password.strip()
        return users

    async def _handshake(self, reader: asyncio.StreamReader, conn: _Connection, unpacker: msgpack.Unpacker) -> bool:
        assert self.shared_key is not None
        shared_key = reveal(self.shared_key) or ""
        if any(isinstance(entry, Secret) for entry in self._user_entries):
            try:
                self.users = self._users()
            except ConfigError as exc:  # a rotated file that is not 'USER PASSWORD': keep the last good list
                self.warn("bad_users", f"security.users: {exc.message}; keeping the last good list")
        nonce = os.urandom(16)
        auth_salt = os.urandom(16) if self.users else b""
        await conn.send(fwd.helo(nonce, auth_salt))
        try:
            ping = await asyncio.wait_for(self._next(reader, unpacker), HANDSHAKE_TIMEOUT)
        except TimeoutError:
            raise fwd.ProtocolError(f"no PING within {HANDSHAKE_TIMEOUT:g}s of the HELO") from None
        reason, salt, client = fwd.check_ping(ping, nonce, auth_salt, shared_key, self.users)
        await conn.send(fwd.pong(reason, self.self_hostname, salt, nonce, shared_key))
        if reason:
            self.warn("auth_failed", f"handshake refused for {conn.peer} ({client}): {reason}", peer=conn.peer)
            return False
        return True

    # -- messages ----------------------------------------------------------------------------

    async def _process(self, unpacker: msgpack.Unpacker, conn: _Connection) -> None:
        """Every complete message buffered: coalesced into batches (see the module docstring)."""
        pending: list[Record] = []
        size = 0
        try:
            for message in unpacker:
                tag, _mode, entries, option = fwd.decode_message(message, self.max_size)
                records, nbytes = self._records(self._tag(tag), entries, conn)
                chunk = option.get("chunk")
                if chunk is not None or (pending and records and pending[0].tag != records[0].tag):
                    if pending:
                        await self._emit(Batch(pending[0].tag, pending, None, size))
                    pending, size = [], 0
                if chunk is not None:
                    await self._emit_chunk(records, nbytes, str(chunk), conn)
                else:
                    pending.extend(records)
                    size += nbytes
        finally:
            # What came before a bad message is kept (it was valid); the bad one closes the connection.
            if pending:
                await self._emit(Batch(pending[0].tag, pending, None, size))

    def _tag(self, tag: str) -> str:
        return self.override_tag if self.override_tag is not None else self.tag_prefix + tag

    def _records(self, tag: str, entries: list[Any], conn: _Connection) -> tuple[list[Record], int]:
        records: list[Record] = []
        size = 0
        bad = 0
        for entry in entries:
            if not (isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[1], dict)):
                bad += 1
                continue
            try:
                time_ns, _ = fwd.decode_time(entry[0])
            except fwd.ProtocolError:
                bad += 1
                continue
            body = entry[1]
            try:
                raw = orjson.dumps(body)
            except TypeError:
                body = _jsonable(body)
                raw = orjson.dumps(body)
            size += len(raw)
            records.append(Record(tag, time_ns, body, raw))
        if bad:
            self.metrics.dropped(bad, "invalid")
            self.warn(
                "invalid_entry",
                f"{bad} entries from {conn.peer} dropped: not [time, map] with EventTime or seconds",
                peer=conn.peer,
            )
        return records, size

    async def _emit(self, batch: Batch) -> None:
        assert self._emitter is not None
        batch.raw_block = b"".join(r.raw + b"\n" for r in batch.records)  # type: ignore[operator]
        await self._emitter.send(batch)

    async def _emit_chunk(self, records: list[Record], size: int, chunk: str, conn: _Connection) -> None:
        if not records:  # nothing valid to keep: nothing to wait for
            await conn.send({"ack": chunk})
            return
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[bool] = loop.create_future()

        def complete(ok: bool) -> None:
            if not accepted.done():
                accepted.set_result(ok)

        task = asyncio.ensure_future(self._ack_when(accepted, chunk, conn))
        conn.acks.add(task)
        task.add_done_callback(conn.acks.discard)
        await self._emit(Batch(records[0].tag, records, AckToken(complete), size))

    async def _ack_when(self, accepted: asyncio.Future[bool], chunk: str, conn: _Connection) -> None:
        if not await accepted:
            self.warn("not_acknowledged", f"a sink dropped chunk {chunk} of {conn.peer}; not acknowledging it")
            return
        try:
            await conn.send({"ack": chunk})
        except (ConnectionError, OSError, RuntimeError):
            pass  # the client went away; it sends the chunk again (at least once)
