"""One TCP/TLS (or Unix socket) connection for the stream sinks: ``syslog`` and ``forward``.

Both speak a framed protocol over a long-lived connection, so they share:

* Fluent Bit's TLS option names (``tls``, ``tls.verify``, ``tls.ca_file``, ...; the context is
  built by :func:`kubetrail.sinks.http_base.build_ssl_context`, shared with the HTTP sinks, and
  rebuilt when its files rotate: :class:`~kubetrail.core.tls_files.ClientTls` is asked at each
  connect, so a reconnect after a rotation presents the new certificate while an open
  connection keeps its session) and networking names (``net.connect_timeout``, ``net.io_timeout``);
* connecting with a timeout, writing with a timeout, and noticing a peer that went away.

Why check for a dead peer before each write: TCP accepts a write into the kernel buffer even
when the other side has already closed (a restarted receiver), and the loss shows only on a
later write. The reader side of the connection sees the peer's FIN at once, so a batch is
never written into a connection already known to be closed; the sink reconnects first.
Every failure is a :class:`RetryableError` naming the endpoint and the cause, and drops the
connection so that the next attempt starts clean.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Mapping
from typing import Any

from kubetrail.core.component import ComponentContext
from kubetrail.core.errors import ConfigError, RetryableError
from kubetrail.core.options import Option
from kubetrail.core.tls_files import ClientTls
from kubetrail.sinks.http_base import client_tls

NET_OPTIONS: tuple[Option, ...] = (
    Option("net.connect_timeout", "duration", 10.0, help="Seconds to wait for a connection"),
    Option("net.io_timeout", "duration", 60.0, help="Seconds a write (or an expected answer) may take"),
)


def tls_context(config: Mapping[str, Any], enabled: bool, ctx: ComponentContext | None = None) -> ClientTls | None:
    """The client TLS context from the ``tls.*`` options (built by the HTTP sinks' code, so every
    sink reads them the same way), following its files as they rotate, or None when TLS is off.
    Missing files are configuration errors at start, not a retry loop at the first write; with
    ``ctx`` a bad rotated file logs and counts as that sink."""
    for key in ("tls.ca_file", "tls.crt_file", "tls.key_file"):
        path = config.get(key)
        if path and not os.path.isfile(path):
            raise ConfigError(f"file {path!r} does not exist", key=key)
    if not enabled:
        return None
    tls = client_tls(config)
    if ctx is not None:
        tls.bind(ctx.logger, ctx.metrics)
    return tls


class StreamConnection:
    """A reconnecting byte stream to ``host:port`` (or ``unix_path``), optionally TLS."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ClientTls | ssl.SSLContext | None,
        server_hostname: str | None,
        connect_timeout: float,
        io_timeout: float,
        unix_path: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.server_hostname = server_hostname or host
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self.unix_path = unix_path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @property
    def endpoint(self) -> str:
        scheme = "tls" if self.tls else "tcp"
        return f"unix:{self.unix_path}" if self.unix_path else f"{scheme}://{self.host}:{self.port}"

    def usable(self) -> bool:
        """Connected, and the peer has not closed its side (see the module docstring)."""
        writer, reader = self.writer, self.reader
        if writer is None or reader is None:
            return False
        return not (writer.is_closing() or reader.at_eof() or reader.exception() is not None)

    async def ensure(self) -> bool:
        """Connect if needed; True when a new connection was opened (a handshake may follow)."""
        if self.usable():
            return False
        await self.close()
        # A rotated certificate/key/CA is picked up here, at connect (checked at most once a second).
        context = self.tls.context() if isinstance(self.tls, ClientTls) else self.tls
        try:
            if self.unix_path:
                opened = asyncio.open_unix_connection(self.unix_path)
            else:
                opened = asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=context,
                    server_hostname=self.server_hostname if self.tls else None,
                    ssl_handshake_timeout=self.connect_timeout if self.tls else None,
                )
            self.reader, self.writer = await asyncio.wait_for(opened, self.connect_timeout)
        except TimeoutError:
            raise RetryableError(f"connecting to {self.endpoint} timed out after {self.connect_timeout:g}s") from None
        except ssl.SSLError as exc:
            raise RetryableError(f"TLS handshake with {self.endpoint} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise RetryableError(f"cannot connect to {self.endpoint}: {exc.strerror or exc}") from None
        return True

    async def send(self, data: bytes) -> None:
        writer = self.writer
        assert writer is not None, "ensure() first"
        try:
            writer.write(data)
            await asyncio.wait_for(writer.drain(), self.io_timeout)
        except TimeoutError:
            await self.close()
            raise RetryableError(f"writing to {self.endpoint} timed out after {self.io_timeout:g}s") from None
        except (OSError, ssl.SSLError, RuntimeError) as exc:
            await self.close()
            raise RetryableError(f"writing to {self.endpoint} failed: {exc}") from None

    async def close(self) -> None:
        writer = self.writer
        self.reader = self.writer = None
        if writer is None:
            return
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2.0)
        except (TimeoutError, OSError, ssl.SSLError):
            pass


class UdpSender:
    """A connected UDP socket for datagram outputs (syslog, gelf): opened when first needed,
    closed and reopened after a failed send, which is retried as a whole batch."""

    def __init__(self, host: str, port: int, io_timeout: float) -> None:
        self.host, self.port, self.io_timeout = host, port, io_timeout
        self._sock: socket.socket | None = None

    async def open(self) -> None:
        if self._sock is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            sock.connect(address)  # connected: an ICMP "port unreachable" surfaces as an error
        except OSError as exc:
            raise RetryableError(f"cannot open UDP socket to {self.host}:{self.port}: {exc.strerror or exc}") from None
        self._sock = sock

    async def send(self, datagrams: list[bytes]) -> None:
        await self.open()
        sock = self._sock
        assert sock is not None
        loop = asyncio.get_running_loop()
        try:
            for datagram in datagrams:
                await asyncio.wait_for(loop.sock_sendall(sock, datagram), self.io_timeout)
        except (OSError, TimeoutError) as exc:
            self.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
            raise RetryableError(f"UDP send to {self.host}:{self.port} failed: {reason}") from None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
