"""The ``syslog`` output: RFC 5424 (or RFC 3164) messages over TCP, TLS or UDP.

Option names are Fluent Bit's (``mode``, ``syslog_format``, ``syslog_maxsize``, the
``syslog_*_key`` options that pick header fields out of the record, ``syslog_*_preset``
defaults). Design decisions:

* **Framing**: TCP and TLS use octet counting (RFC 6587 3.4.1, ``LEN SP MSG``), which survives
  newlines inside messages (stack traces, JSON); UDP sends one datagram per message.
* **The message** is the value of ``syslog_message_key``; without that option the whole record
  as compact JSON (Fluent Bit would send an empty message, which loses the record).
* **Header fields** are cleaned to what the RFCs allow (printable US-ASCII without spaces,
  RFC 5424's length limits) rather than rejected: a pod name with an odd character must
  not stop delivery. Severity and facility accept numbers or names (``warning``, ``local0``).
* **Size**: a message longer than ``syslog_maxsize`` (header included) is truncated, as in
  Fluent Bit, on a UTF-8 character boundary.
* **Delivery**: syslog over TCP has no application acknowledgement, so a batch counts as
  delivered once written to the connection. A receiver that closed the connection is noticed
  before writing (see :mod:`kubetrail.sinks.stream_base`), and a failed write resends the whole
  batch (at least once). UDP gives no delivery guarantee at all; use ``tcp`` or ``tls`` for
  anything that matters.
* A record that cannot be turned into a message (e.g. ``syslog_sd_key`` naming a value that is
  not a map) is rejected on its own with the reason; the rest of the batch is delivered.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import orjson

from kubetrail.core.component import ComponentContext, Sink
from kubetrail.core.errors import ConfigError, PermanentError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.sinks.http_base import TLS_OPTIONS
from kubetrail.sinks.stream_base import NET_OPTIONS, StreamConnection, UdpSender, tls_context

SEVERITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
_SEVERITY_ALIASES = {"emergency": 0, "panic": 0, "critical": 2, "error": 3, "warn": 4, "informational": 6}
FACILITIES = (
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv", "ftp",
    "ntp", "security", "console", "solaris-cron", "local0", "local1", "local2", "local3", "local4", "local5",
    "local6", "local7",
)  # fmt: skip
_NOT_PRINTABLE = re.compile(r"[^\x21-\x7e]")
# RFC 5424 6.2 field limits.
_LIMITS = {"hostname": 255, "appname": 48, "procid": 128, "msgid": 32}
_SD_NAME_BAD = re.compile(r'[^\x21-\x7e]|[= \]"]')
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _number(value: Any, names: tuple[str, ...], aliases: dict[str, int], top: int) -> int | None:
    """A severity/facility given as a number or a name; None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= top else None
    if isinstance(value, str):
        word = value.strip().lower()
        if word.isdigit():
            number = int(word)
            return number if number <= top else None
        if word in names:
            return names.index(word)
        return aliases.get(word)
    return None


def parse_severity(value: Any) -> int | None:
    return _number(value, SEVERITIES, _SEVERITY_ALIASES, 7)


def parse_facility(value: Any) -> int | None:
    return _number(value, FACILITIES, {}, 23)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return orjson.dumps(value, default=str).decode()


def header_field(value: Any, limit: int) -> str:
    """An RFC 5424 header field: printable ASCII, no spaces, at most ``limit`` chars, else '-'."""
    if value is None:
        return "-"
    text = _NOT_PRINTABLE.sub("_", _text(value))[:limit]
    return text or "-"


def _sd_escape(value: Any) -> str:
    return _text(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _sd_name(name: str) -> str:
    return _SD_NAME_BAD.sub("_", name)[:32] or "_"


def structured_data(sd_id: str, params: Any) -> str:
    """``[sd_id k="v" ...]`` from a map; raises ValueError when ``params`` is not a map."""
    if not isinstance(params, dict):
        raise ValueError(f"the value of syslog_sd_key {sd_id!r} must be a map, got {type(params).__name__}")
    parts = [_sd_name(sd_id)]
    parts += [f'{_sd_name(str(key))}="{_sd_escape(value)}"' for key, value in params.items()]
    return "[" + " ".join(parts) + "]"


def _truncate(data: bytes, limit: int) -> bytes:
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode()  # never cut a character in half


class SyslogSink(Sink):
    plugin_name = "syslog"
    description = "Sends RFC 5424 / RFC 3164 syslog messages over TCP, TLS or UDP"
    options = (
        Option("host", "str", "127.0.0.1", help="Syslog server"),
        Option("port", "int", 514, help="Syslog server port"),
        Option("mode", "choice", "udp", choices=("udp", "tcp", "tls"), help="Transport"),
        Option("syslog_format", "choice", "rfc5424", choices=("rfc5424", "rfc3164")),
        Option("syslog_maxsize", "int", None, help="Maximum bytes per message (default 2048 rfc5424, 1024 rfc3164)"),
        Option("syslog_severity_key", help="Record key with the severity (0-7 or a name)"),
        Option("syslog_severity_preset", "int", 6, help="Severity when the key is missing"),
        Option("syslog_facility_key", help="Record key with the facility (0-23 or a name)"),
        Option("syslog_facility_preset", "int", 1, help="Facility when the key is missing"),
        Option("syslog_hostname_key", help="Record key with the HOSTNAME field"),
        Option("syslog_hostname_preset", help="HOSTNAME when the key is missing"),
        Option("syslog_appname_key", help="Record key with the APP-NAME field"),
        Option("syslog_appname_preset", help="APP-NAME when the key is missing"),
        Option("syslog_procid_key", help="Record key with the PROCID field"),
        Option("syslog_procid_preset", help="PROCID when the key is missing"),
        Option("syslog_msgid_key", help="Record key with the MSGID field"),
        Option("syslog_msgid_preset", help="MSGID when the key is missing"),
        Option("syslog_sd_key", multiple=True, help="Record key whose map becomes an SD-ELEMENT (repeatable)"),
        Option("syslog_message_key", help="Record key with the message (default: the record as JSON)"),
        *NET_OPTIONS,
        *TLS_OPTIONS,
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.host: str = config["host"]
        self.port: int = config["port"]
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is out of range 1-65535", key="port")
        self.mode: str = config["mode"]
        self.rfc5424 = config["syslog_format"] == "rfc5424"
        maxsize = config["syslog_maxsize"]
        if maxsize is not None and maxsize < 64:
            raise ConfigError(f"syslog_maxsize {maxsize} is too small; at least 64 bytes", key="syslog_maxsize")
        self.maxsize: int = maxsize or (2048 if self.rfc5424 else 1024)
        if not 0 <= config["syslog_severity_preset"] <= 7:
            raise ConfigError("must be 0-7", key="syslog_severity_preset")
        if not 0 <= config["syslog_facility_preset"] <= 23:
            raise ConfigError("must be 0-23", key="syslog_facility_preset")
        self.severity_key: str | None = config["syslog_severity_key"]
        self.facility_key: str | None = config["syslog_facility_key"]
        self.severity_preset: int = config["syslog_severity_preset"]
        self.facility_preset: int = config["syslog_facility_preset"]
        self.fields = {
            name: (config[f"syslog_{name}_key"], config[f"syslog_{name}_preset"])
            for name in ("hostname", "appname", "procid", "msgid")
        }
        self.sd_keys: list[str] = config["syslog_sd_key"]
        self.message_key: str | None = config["syslog_message_key"]
        if config["tls"] and self.mode != "tls":
            raise ConfigError(f"'tls on' needs 'mode tls' (mode is {self.mode})", key="tls")
        context = tls_context(config, self.mode == "tls", ctx)
        self.io_timeout: float = config["net.io_timeout"]
        self.conn = StreamConnection(
            self.host,
            self.port,
            context,
            config["tls.vhost"],
            config["net.connect_timeout"],
            self.io_timeout,
        )
        self.udp = UdpSender(self.host, self.port, self.io_timeout)

    # -- formatting -------------------------------------------------------------------------

    def _field(self, body: dict[str, Any], name: str) -> Any:
        key, preset = self.fields[name]
        if key is not None and body.get(key) is not None:
            return body[key]
        return preset

    def _pri(self, body: dict[str, Any]) -> int:
        severity = parse_severity(body.get(self.severity_key)) if self.severity_key else None
        facility = parse_facility(body.get(self.facility_key)) if self.facility_key else None
        severity = self.severity_preset if severity is None else severity
        facility = self.facility_preset if facility is None else facility
        return facility * 8 + severity

    def _message(self, record: Record) -> str:
        if self.message_key is None:
            return record.json_bytes().decode("utf-8", "replace")
        return _text(record.body.get(self.message_key, ""))

    def format(self, record: Record) -> bytes:
        """One syslog message (without framing); ValueError when the record cannot be one."""
        body = record.body
        pri = self._pri(body)
        if self.rfc5424:
            stamp = dt.datetime.fromtimestamp(record.time_ns // 1000 / 1e6, dt.UTC)
            timestamp = stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            fields = [header_field(self._field(body, name), _LIMITS[name]) for name in _LIMITS]
            sd = "".join(structured_data(key, body[key]) for key in self.sd_keys if key in body) or "-"
            head = f"<{pri}>1 {timestamp} {' '.join(fields)} {sd} "
        else:
            stamp = dt.datetime.fromtimestamp(record.time_ns // 1_000_000_000, dt.UTC)
            timestamp = f"{_MONTHS[stamp.month - 1]} {stamp.day:2d} {stamp:%H:%M:%S}"
            host = header_field(self._field(body, "hostname"), 255)
            app = self._field(body, "appname")
            tag = header_field(app, 32) if app is not None else ""
            procid = self._field(body, "procid")
            if tag and procid is not None:
                tag += f"[{header_field(procid, 128)}]"
            head = f"<{pri}>{timestamp} {host} {tag + ': ' if tag else ''}"
        return _truncate((head + self._message(record)).encode("utf-8", "replace"), self.maxsize)

    def encode(self, batch: Batch) -> tuple[list[bytes], list[tuple[Record, str]]]:
        messages: list[bytes] = []
        rejected: list[tuple[Record, str]] = []
        for record in batch.records:
            try:
                messages.append(self.format(record))
            except (ValueError, TypeError) as exc:
                rejected.append((record, f"cannot make a syslog message: {exc}"))
        return messages, rejected

    # -- delivery ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self.mode == "udp":
            await self.udp.open()
        else:
            await self.conn.ensure()

    async def write(self, batch: Batch) -> None:
        messages, rejected = self.encode(batch)
        if messages:
            if self.mode == "udp":
                await self.udp.send(messages)
            else:
                # RFC 6587 octet counting: "<length> <message>", back to back.
                data = b"".join([b"%d %s" % (len(m), m) for m in messages])
                await self.conn.ensure()
                await self.conn.send(data)
        if rejected:
            raise PermanentError(f"{len(rejected)} of {len(batch)} records rejected: {rejected[0][1]}", rejected)

    async def close(self) -> None:
        await self.conn.close()
        self.udp.close()
