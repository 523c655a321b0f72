"""The ``forward`` output: the Fluent forward protocol, to Fluentd and Fluent Bit.

Option names are Fluent Bit's (``host``, ``port``, ``unix_path``, ``tag``, ``time_as_integer``,
``send_options``, ``require_ack_response``, ``compress``, ``shared_key``, ``empty_shared_key``,
``self_hostname``, ``username``, ``password``, ``tls``/``tls.*``); two are added:
``ack_response_timeout`` (Fluentd's name, how long to wait for an ack) and ``forward_mode``.

Design decisions:

* **Modes**: PackedForward by default (``[tag, bin(entries), option]``: the entries are a
  msgpack stream the receiver can store as is, the cheapest for both sides);
  ``forward_mode forward`` sends ``[tag, [[time, record], ...], option]`` instead, and
  ``compress gzip`` sends CompressedPackedForward. Each entry is encoded once, so a record
  that msgpack cannot represent is rejected on its own and the rest still go.
* **Time**: EventTime (ext type 0, seconds and nanoseconds) unless ``time_as_integer`` (Fluentd
  v0.12 and older only understand integer seconds).
* **Acknowledgement**: with ``require_ack_response`` every message carries a random ``chunk``
  id and the batch is acknowledged only when ``{"ack": chunk}`` comes back (at-least-once, as
  Fluentd documents it). A missing ack within ``ack_response_timeout`` closes the connection
  and the batch is retried. Without it, a batch counts as delivered once written to the
  connection, which can lose what was in flight when the receiver crashes; the
  documentation recommends ``require_ack_response on`` and so does kubetrail.
* **Handshake**: with ``shared_key`` (or ``empty_shared_key``), each new connection waits for
  the server's ``HELO``, answers ``PING`` (shared-key digest, and the user/password digest when
  the server asks for it) and checks the ``PONG``, including the server's own digest, so a
  server that does not know the key is not trusted with the data. A refused authentication
  is retryable (the credentials are wrong, not the records) and names the server's reason.
* One connection per sink, used by one batch at a time (a lock): the protocol answers acks in
  order per connection and batches stay ordered.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
from typing import Any

import msgpack

from kubetrail.core import forward_protocol as fwd
from kubetrail.core.component import ComponentContext, Sink
from kubetrail.core.errors import ConfigError, PermanentError, RetryableError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.core.secrets import Text, reveal
from kubetrail.sinks.http_base import TLS_OPTIONS
from kubetrail.sinks.stream_base import NET_OPTIONS, StreamConnection, tls_context


class ForwardSink(Sink):
    plugin_name = "forward"
    description = "Sends records to Fluentd or Fluent Bit with the forward protocol"
    options = (
        Option("host", "str", "127.0.0.1", help="Fluentd / Fluent Bit host"),
        Option("port", "int", 24224, help="Forward port"),
        Option("unix_path", help="Unix socket to send to instead of host:port"),
        Option("tag", help="Tag to send instead of the record's tag"),
        Option("time_as_integer", "bool", False, help="Integer seconds instead of EventTime (Fluentd v0.12)"),
        Option("send_options", "bool", False, help="Always send the option map (with size)"),
        Option("require_ack_response", "bool", False, help="Send a chunk id and wait for its ack"),
        Option("ack_response_timeout", "duration", 60.0, help="Seconds to wait for an ack before retrying"),
        Option("compress", "choice", "none", choices=("none", "off", "gzip"), help="gzip: CompressedPackedForward"),
        Option("forward_mode", "choice", "packed_forward", choices=("packed_forward", "forward")),
        Option("shared_key", help="Shared key of the secure-forward handshake", secret=True),
        Option("empty_shared_key", "bool", False, help="Do the handshake with an empty shared key"),
        Option("self_hostname", "str", "localhost", help="Host name sent in the handshake"),
        Option("username", help="User for the handshake's user authentication", secret=True),
        Option("password", "str", "", help="Password for the handshake's user authentication", secret=True),
        *NET_OPTIONS,
        *TLS_OPTIONS,
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        port: int = config["port"]
        if not 0 < port < 65536:
            raise ConfigError(f"port {port} is out of range 1-65535", key="port")
        self.tag: str | None = config["tag"]
        if self.tag is not None and not self.tag.strip():
            raise ConfigError("must not be empty", key="tag")
        self.time_as_integer: bool = config["time_as_integer"]
        self.send_options: bool = config["send_options"]
        self.require_ack: bool = config["require_ack_response"]
        self.ack_timeout: float = config["ack_response_timeout"]
        if self.ack_timeout <= 0:
            raise ConfigError("must be positive", key="ack_response_timeout")
        self.gzip = config["compress"] == "gzip"
        self.packed = config["forward_mode"] == "packed_forward"
        if self.gzip and not self.packed:
            raise ConfigError("compress gzip needs forward_mode packed_forward", key="compress")
        shared_key = config["shared_key"]
        if shared_key is None and config["empty_shared_key"]:
            shared_key = ""
        # Credentials may follow files (${file:...}): revealed at each handshake, i.e. each connection.
        self.shared_key: Text | None = shared_key
        self.self_hostname: str = config["self_hostname"]
        self.username: Text | None = config["username"]
        self.password: Text = config["password"]
        if self.username and self.shared_key is None:
            raise ConfigError(
                "username needs shared_key (user authentication is part of the handshake)", key="username"
            )
        context = tls_context(config, config["tls"], ctx)
        self.conn = StreamConnection(
            config["host"],
            port,
            context,
            config["tls.vhost"],
            config["net.connect_timeout"],
            config["net.io_timeout"],
            unix_path=config["unix_path"],
        )
        self._unpacker: msgpack.Unpacker | None = None
        self._lock = asyncio.Lock()

    # -- encoding ---------------------------------------------------------------------------

    def _entry(self, record: Record, packer: msgpack.Packer) -> bytes:
        when: Any = record.time_ns // 1_000_000_000 if self.time_as_integer else fwd.event_time(record.time_ns)
        return packer.pack([when, record.body])  # type: ignore[no-any-return]

    def encode(self, batch: Batch, chunk: str | None) -> tuple[bytes | None, list[tuple[Record, str]]]:
        """The forward message for ``batch`` (None when every record was rejected) and the rejects."""
        packer = msgpack.Packer(use_bin_type=True)
        entries: list[bytes] = []
        rejected: list[tuple[Record, str]] = []
        for record in batch.records:
            try:
                entries.append(self._entry(record, packer))
            except (TypeError, ValueError, OverflowError) as exc:
                packer.reset()
                rejected.append((record, f"cannot encode the record as msgpack: {exc}"))
        if not entries:
            return None, rejected
        option: dict[str, Any] = {}
        if self.send_options or self.require_ack or self.gzip:
            option["size"] = len(entries)
        if chunk is not None:
            option["chunk"] = chunk
        if self.gzip:
            option["compressed"] = "gzip"
        tag = self.tag or batch.tag
        stream = b"".join(entries)
        parts = [packer.pack_array_header(3 if option else 2), packer.pack(tag)]
        if self.packed:
            parts.append(packer.pack(gzip.compress(stream, 1) if self.gzip else stream))
        else:  # an array of already-encoded [time, record] entries is valid msgpack as it is
            parts += [packer.pack_array_header(len(entries)), stream]
        if option:
            parts.append(packer.pack(option))
        return b"".join(parts), rejected

    # -- connection and handshake -----------------------------------------------------------

    async def _read_object(self, timeout: float, waiting_for: str) -> Any:
        reader = self.conn.reader
        assert reader is not None and self._unpacker is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for item in self._unpacker:
                        return item
                    data = await reader.read(65536)
                    if not data:
                        raise RetryableError(
                            f"{self.conn.endpoint} closed the connection while we waited for {waiting_for}"
                        )
                    self._unpacker.feed(data)
        except TimeoutError:
            raise RetryableError(f"no {waiting_for} from {self.conn.endpoint} within {timeout:g}s") from None
        except (msgpack.UnpackException, ValueError) as exc:
            raise RetryableError(f"{self.conn.endpoint} sent garbage instead of {waiting_for}: {exc}") from None
        except OSError as exc:
            raise RetryableError(f"reading {waiting_for} from {self.conn.endpoint} failed: {exc}") from None

    async def _connect(self) -> None:
        if not await self.conn.ensure():
            return
        self._unpacker = fwd.unpacker(16 * 1024 * 1024)
        if self.shared_key is None:
            return
        try:
            await self._handshake(reveal(self.shared_key) or "")
        except BaseException:
            await self.conn.close()
            raise

    async def _handshake(self, shared_key: str) -> None:
        endpoint = self.conn.endpoint
        helo = await self._read_object(self.conn.io_timeout, "the HELO of the handshake")
        try:
            ping, salt, nonce = fwd.ping(
                helo, self.self_hostname, shared_key, reveal(self.username), reveal(self.password) or ""
            )
        except fwd.ProtocolError as exc:
            raise RetryableError(f"{endpoint} {exc}") from None
        await self.conn.send(msgpack.packb(ping, use_bin_type=True))
        pong = await self._read_object(self.conn.io_timeout, "the PONG of the handshake")
        try:
            fwd.check_pong(pong, salt, nonce, shared_key)
        except fwd.ProtocolError as exc:
            raise RetryableError(f"{endpoint} {exc}") from None

    # -- delivery ---------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._lock:
            await self._connect()

    async def write(self, batch: Batch) -> None:
        chunk = base64.b64encode(os.urandom(16)).decode() if self.require_ack else None
        message, rejected = self.encode(batch, chunk)
        if message is not None:
            async with self._lock:
                await self._connect()
                await self.conn.send(message)
                if chunk is not None:
                    await self._wait_ack(chunk)
        if rejected:
            raise PermanentError(f"{len(rejected)} of {len(batch)} records rejected: {rejected[0][1]}", rejected)

    async def _wait_ack(self, chunk: str) -> None:
        try:
            while True:
                answer = await self._read_object(self.ack_timeout, f"the ack of chunk {chunk}")
                if isinstance(answer, dict) and answer.get("ack") == chunk:
                    return
                if isinstance(answer, list) and answer and answer[0] == "HELO":
                    raise RetryableError(f"{self.conn.endpoint} asks for a handshake (HELO): set shared_key")
                # an ack of an earlier, timed-out chunk or something unknown: keep waiting
                self.log.debug("unexpected answer while waiting for an ack", extra={"answer": repr(answer)[:200]})
        except RetryableError:
            await self.conn.close()  # a late ack must not be taken for the next chunk's
            raise

    async def close(self) -> None:
        async with self._lock:
            await self.conn.close()
