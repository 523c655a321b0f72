"""What the network-server inputs (``forward``, ``syslog``) share: listening sockets, TLS, and
warnings about bad clients that cannot flood the log.

* **Sockets**: TCP on ``listen``/``port`` or a Unix socket at a path, whose mode is set from
  Fluent Bit's ``unix_perm`` (octal text such as ``0644``). A stale socket file left by a
  killed process is replaced; anything else at that path is a configuration error, never
  deleted.
* **TLS** (Fluent Bit's ``tls``, ``tls.crt_file``, ``tls.key_file``, ``tls.ca_file``,
  ``tls.verify``, ``tls.verify_client_cert``): client certificates are *required* with
  ``tls.verify_client_cert on``, and also with ``tls.verify on`` (the default) when a
  ``tls.ca_file`` is given, as Fluent Bit 4.2 does; without a CA nothing is asked of the
  client. The files are reloaded when they change on disk (the audit webhook's
  :class:`~kubetrail.sources.kubernetes_audit.TlsFiles`: mounted secrets rotate), and a
  client certificate must verify or the TLS handshake fails.
* **Warnings**: one log line per kind of problem per minute; every occurrence is counted in
  ``kubetrail_errors_total{type=...}``.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.sources.kubernetes_audit import TlsFiles

WARNING_INTERVAL = 60.0

SERVER_TLS_OPTIONS: tuple[Option, ...] = (
    Option("tls", "bool", False, help="Serve TLS (needs tls.crt_file and tls.key_file)"),
    Option("tls.verify", "bool", True, help="With tls.ca_file: require client certificates signed by it"),
    Option("tls.verify_client_cert", "bool", False, help="Require client certificates signed by tls.ca_file"),
    Option("tls.crt_file", help="Server certificate (PEM); reloaded when it changes"),
    Option("tls.key_file", help="Private key of tls.crt_file; reloaded when it changes"),
    Option("tls.ca_file", help="CA bundle that client certificates must be signed by"),
    Option("tls.key_passwd", help="Not supported: use an unencrypted key file (a mounted secret)"),
    Option("tls.vhost", help="Accepted for Fluent Bit compatibility (a client-side option)"),
    Option("tls.debug", "int", 1, help="Accepted for Fluent Bit compatibility"),
)


class _ServerTlsFiles(TlsFiles):
    """The webhook's reloading TLS files, with client certificates required rather than optional
    (these protocols have no way to answer "403, send a certificate")."""

    def _build(self) -> ssl.SSLContext:
        ctx = super()._build()
        if self.ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def server_tls(config: Mapping[str, Any], log: Any) -> ssl.SSLContext | None:
    """The listening TLS context from the ``tls.*`` options, or None when ``tls`` is off."""
    if not config["tls"]:
        return None
    crt, key, ca = config["tls.crt_file"], config["tls.key_file"], config["tls.ca_file"]
    if not crt or not key:
        raise ConfigError(
            "tls on needs tls.crt_file and tls.key_file", key="tls.crt_file" if not crt else "tls.key_file"
        )
    if config.get("tls.key_passwd"):
        raise ConfigError("encrypted keys are not supported; use an unencrypted key file", key="tls.key_passwd")
    require = bool(ca) and (config["tls.verify_client_cert"] or config["tls.verify"])
    if config["tls.verify_client_cert"] and not ca:
        raise ConfigError("tls.verify_client_cert needs tls.ca_file (the CA of the clients)", key="tls.ca_file")
    try:
        files = _ServerTlsFiles(crt, key, ca if require else None, log)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS files: {exc}", key="tls.crt_file") from None
    return files.listening


def parse_unix_perm(text: str | None, default: int | None) -> int | None:
    if text is None:
        return default
    try:
        value = int(text.strip(), 8)
    except ValueError:
        raise ConfigError(f"{text!r} is not an octal file mode such as 0644", key="unix_perm") from None
    if not 0 <= value <= 0o7777:
        raise ConfigError(f"{text!r} is not a file mode (0000-7777)", key="unix_perm")
    return value


def prepare_unix_path(path: str) -> None:
    """Remove a stale socket at ``path``; refuse to touch anything that is not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a Unix socket; refusing to replace it", key="unix_path")
    os.unlink(path)


def remove_unix_path(path: str | None) -> None:
    if not path:
        return
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


async def start_stream_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    *,
    host: str,
    port: int,
    unix_path: str | None,
    unix_perm: int | None,
    tls: ssl.SSLContext | None,
    limit: int = 2**16,
) -> asyncio.Server:
    """A TCP (or Unix socket) server calling ``handler`` per connection."""
    if unix_path:
        prepare_unix_path(unix_path)
        server = await asyncio.start_unix_server(handler, unix_path, ssl=tls, limit=limit)
        if unix_perm is not None:
            os.chmod(unix_path, unix_perm)
        return server
    return await asyncio.start_server(handler, host, port, ssl=tls, reuse_address=True, limit=limit)


def bound_port(server: asyncio.AbstractServer | None) -> int | None:
    sockets = getattr(server, "sockets", None) or []
    if not sockets:
        return None
    name = sockets[0].getsockname()
    return int(name[1]) if isinstance(name, tuple) else None


def peer_address(writer: asyncio.StreamWriter | asyncio.BaseTransport, scheme: str, unix_path: str | None) -> str:
    """``tcp://IP:PORT`` of a client, as Fluent Bit writes it; ``unix://PATH`` for Unix sockets
    (whose clients have no address of their own)."""
    if unix_path:
        return f"unix://{unix_path}"
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"{scheme}://[{host}]:{peer[1]}" if ":" in host else f"{scheme}://{host}:{peer[1]}"
    return f"{scheme}://unknown"


class Warnings:
    """Counts every problem by kind and logs each kind at most once per ``WARNING_INTERVAL``."""

    def __init__(self, log: Any, metrics: Any) -> None:
        self.log = log
        self.metrics = metrics
        self._last: dict[str, float] = {}

    def __call__(self, kind: str, message: str, count: int = 1, **extra: Any) -> None:
        self.metrics.error(kind, count)
        now = time.monotonic()
        if now - self._last.get(kind, -WARNING_INTERVAL) >= WARNING_INTERVAL:
            self._last[kind] = now
            self.log.warning(message, extra={"problem": kind, **extra})
