"""The ``gelf`` output: Graylog Extended Log Format over UDP (chunked, gzip), TCP or TLS.

Records become GELF 1.1 documents the way Fluent Bit's ``flb_msgpack_to_gelf`` builds them, so
a Graylog stream sees the same fields after a migration:

* ``version`` is ``1.1``; the record keys named by ``gelf_host_key``, ``gelf_short_message_key``,
  ``gelf_full_message_key``, ``gelf_timestamp_key`` and ``gelf_level_key`` (defaults ``host``,
  ``short_message``, ``full_message``, ``timestamp``, ``level``) become those GELF fields;
  every other key becomes an additional field ``_<key>``; ``id`` is left out (GELF forbids
  ``_id``); null values are left out; booleans become the strings ``true``/``false``.
* Nested maps are flattened: ``{"kubernetes": {"pod_name": "x"}}`` -> ``_kubernetes_pod_name``;
  arrays become one string of their items joined with ``", "``. Characters GELF does not allow
  in field names (anything but letters, digits, ``_``, ``.``, ``-``) become ``_``.
* ``level``: a number, a digit string ``"0"``-``"7"``, or a syslog keyword (``err``,
  ``warning``, ...; case-insensitive) becomes the number; anything else is kept as it is.
* Without a timestamp key, the record time is sent as seconds with milliseconds.
* ``gelf_tag_key`` (newer Fluent Bit) adds the tag under that key first.
* A record without the short message key cannot be a GELF message: Fluent Bit drops it with an
  error; here it is rejected on its own with that reason (dead letter), the rest is sent.

**UDP** (``mode udp``, the default): with ``compress on`` (default) or a message larger than
``packet_size``, the message is gzipped; if it is still larger than ``packet_size`` it is sent
in chunks per the GELF spec (magic ``0x1e 0x0f``, an 8-byte random message id, sequence number
and count; at most 128 chunks: a larger message is rejected with the reason, as Fluent Bit
refuses it). UDP gives no delivery guarantee: a batch counts as delivered once handed to the
kernel. **TCP/TLS**: each message is JSON followed by a NUL byte (GELF TCP framing, no
compression), a batch in one write; delivered once written, like the ``syslog`` output (the
connection is checked for a closed peer before each write; see ``stream_base``).
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Mapping
from typing import Any

import orjson

from kubetrail.core.component import ComponentContext, Sink
from kubetrail.core.errors import ConfigError, PermanentError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.sinks.http_base import TLS_OPTIONS
from kubetrail.sinks.stream_base import NET_OPTIONS, StreamConnection, UdpSender, tls_context

CHUNK_MAGIC = b"\x1e\x0f"
CHUNK_HEADER = 12
MAX_CHUNKS = 128
LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
_BAD_NAME_CHAR = re.compile(r"[^A-Za-z0-9_.\-]")


def _name(text: str) -> str:
    return _BAD_NAME_CHAR.sub("_", text)


def _array_item(value: Any) -> str:
    """An array item inside the flattened string, as Fluent Bit writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list):
        return ", ".join(_array_item(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{_name(str(k))}={_array_item(v)}" for k, v in value.items())
    return str(value)


def _scalar(value: Any) -> Any:
    """A field value: numbers and strings as they are, booleans as strings; None: leave out."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(_array_item(v) for v in value)
    return value


def _level(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("the level must be a number or a string")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        if len(value) == 1 and "0" <= value <= "7":
            return int(value)
        lowered = value.lower()
        return LEVELS.index(lowered) if lowered in LEVELS else value
    raise ValueError(f"the level must be a number or a string, not {type(value).__name__}")


class GelfSink(Sink):
    plugin_name = "gelf"
    description = "Graylog GELF over UDP (chunked, gzip), TCP or TLS"
    options = (
        Option("host", "str", "127.0.0.1", help="Graylog GELF input host"),
        Option("port", "int", 12201, help="Graylog GELF input port"),
        Option("mode", "choice", "udp", choices=("udp", "tcp", "tls"), help="Transport"),
        Option("gelf_short_message_key", "str", "short_message", help="Key of the short message (required)"),
        Option("gelf_full_message_key", "str", "full_message", help="Key of the full message"),
        Option("gelf_timestamp_key", "str", "timestamp", help="Key of the timestamp (default: the record time)"),
        Option("gelf_host_key", "str", "host", help="Key of the host"),
        Option("gelf_level_key", "str", "level", help="Key of the syslog level (0-7 or a keyword)"),
        Option("gelf_tag_key", help="Add the tag under this key"),
        Option("packet_size", "int", 1420, help="Largest UDP payload; bigger messages are chunked"),
        Option("compress", "bool", True, help="gzip UDP messages"),
        *NET_OPTIONS,
        *TLS_OPTIONS,
    )

    def __init__(self, ctx: ComponentContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.host: str = config["host"]
        self.port: int = config["port"]
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is out of range 1-65535", key="port")
        self.mode: str = config["mode"]
        self.packet_size: int = config["packet_size"]
        if not 0 < self.packet_size <= 65507 - CHUNK_HEADER:
            raise ConfigError("must be 1-65495 bytes (a UDP payload with the chunk header)", key="packet_size")
        self.compress: bool = config["compress"]
        self.special = {
            config["gelf_host_key"]: "host",
            config["gelf_short_message_key"]: "short_message",
            config["gelf_full_message_key"]: "full_message",
            config["gelf_timestamp_key"]: "timestamp",
            config["gelf_level_key"]: "level",
        }
        self.short_key: str = config["gelf_short_message_key"]
        self.tag_key: str | None = config.get("gelf_tag_key") or None
        if config["tls"] and self.mode != "tls":
            raise ConfigError(f"'tls on' needs 'mode tls' (mode is {self.mode})", key="tls")
        self.io_timeout: float = config["net.io_timeout"]
        self.conn = StreamConnection(
            self.host,
            self.port,
            tls_context(config, self.mode == "tls", ctx),
            config["tls.vhost"],
            config["net.connect_timeout"],
            self.io_timeout,
        )
        self.udp = UdpSender(self.host, self.port, self.io_timeout)

    # -- encoding -------------------------------------------------------------------------

    def encode(self, record: Record) -> bytes:
        """One GELF document; ValueError when the record cannot be one."""
        body = record.body
        if self.tag_key is not None:
            body = {**body, self.tag_key: record.tag}
        doc: dict[str, Any] = {"version": "1.1"}
        seen: set[str] = set()
        for key, value in body.items():
            field = self.special.get(key)
            if field is not None:
                if field in seen:
                    continue
                seen.add(field)
                if field == "level":
                    value = _level(value)
            elif key == "id":
                continue  # GELF forbids the additional field _id
            else:
                field = "_" + _name(key)
            if isinstance(value, dict):
                self._flatten(doc, field if field.startswith("_") else "_" + field, value)
            elif value is not None:
                doc[field] = _scalar(value)
        if "short_message" not in seen:
            raise ValueError(f"no {self.short_key!r} key for the GELF short message")
        if "timestamp" not in seen:
            seconds, nanos = divmod(record.time_ns, 1_000_000_000)
            doc["timestamp"] = round(seconds + (nanos // 1_000_000) / 1000, 3)
        return orjson.dumps(doc)

    def _flatten(self, doc: dict[str, Any], prefix: str, value: dict[str, Any]) -> None:
        for key, item in value.items():
            name = f"{prefix}_{_name(str(key))}"
            if isinstance(item, dict):
                self._flatten(doc, name, item)
            elif item is not None:
                doc[name] = _scalar(item)

    def datagrams(self, message: bytes) -> list[bytes]:
        """One message as UDP payloads: whole, gzipped, or gzipped in GELF chunks."""
        if not (self.compress or len(message) > self.packet_size):
            return [message]
        data = gzip.compress(message, compresslevel=1)  # level 1: CPU is the budget
        if len(data) <= self.packet_size:
            return [data]
        count = -(-len(data) // self.packet_size)
        if count > MAX_CHUNKS:
            raise ValueError(f"message too big for GELF over UDP: {len(data)} bytes gzipped, more than 128 chunks")
        message_id = os.urandom(8)
        return [
            CHUNK_MAGIC + message_id + bytes((n, count)) + data[n * self.packet_size : (n + 1) * self.packet_size]
            for n in range(count)
        ]

    # -- delivery -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.mode == "udp":
            await self.udp.open()
        else:
            await self.conn.ensure()

    async def write(self, batch: Batch) -> None:
        rejected: list[tuple[Record, str]] = []
        payloads: list[bytes] = []
        for record in batch.records:
            try:
                message = self.encode(record)
                if self.mode == "udp":
                    payloads += self.datagrams(message)
                else:
                    payloads.append(message + b"\0")
            except (ValueError, TypeError) as exc:
                rejected.append((record, f"cannot make a GELF message: {exc}"))
        if payloads:
            if self.mode == "udp":
                await self.udp.send(payloads)
            else:
                await self.conn.ensure()
                await self.conn.send(b"".join(payloads))
        if rejected:
            raise PermanentError(f"{len(rejected)} of {len(batch)} records rejected: {rejected[0][1]}", rejected)

    async def close(self) -> None:
        await self.conn.close()
        self.udp.close()
