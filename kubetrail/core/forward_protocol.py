"""The Fluent forward protocol (Forward Protocol Specification v1), shared by both ends.

Used by the ``forward`` output (client), the ``forward`` input (server) and the tests' fake
server, so that the message shapes and the shared-key handshake exist once:

* **Events**: Message ``[tag, time, record, option?]``, Forward ``[tag, [[time, record], ...],
  option?]``, PackedForward ``[tag, bin, option?]`` (``bin`` a msgpack stream of ``[time,
  record]`` entries) and CompressedPackedForward (the same with ``option.compressed ==
  "gzip"``). :func:`decode_message` turns any of them into ``(tag, mode, entries, option)``.
* **Time**: EventTime is msgpack ext type 0 with big-endian uint32 seconds and nanoseconds;
  older clients send integer (or float) seconds.
* **Handshake** (``shared_key``): the server sends ``["HELO", {"nonce", "auth", "keepalive"}]``,
  the client answers ``["PING", hostname, salt, sha512_hex(salt + hostname + nonce +
  shared_key), username, sha512_hex(auth_salt + username + password)]`` and the server ends
  with ``["PONG", ok, reason, hostname, sha512_hex(salt + hostname + nonce + shared_key)]``,
  its own digest proving to the client that it knows the key too.

Why gzip is bounded here: a CompressedPackedForward bin of a few kilobytes can expand to
gigabytes; the receiver passes its ``buffer_max_size`` and a bomb stops expanding there.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import zlib
from typing import Any

import msgpack

MODE_MESSAGE = "message"
MODE_FORWARD = "forward"
MODE_PACKED = "packed_forward"
MODE_COMPRESSED = "compressed_packed_forward"


class ProtocolError(ValueError):
    """A message that is not valid forward protocol; the text says what was wrong."""


def event_time(time_ns: int) -> msgpack.ExtType:
    """EventTime (ext type 0): seconds and nanoseconds, both uint32 big endian."""
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    return msgpack.ExtType(0, struct.pack(">II", seconds, nanos))


def decode_time(value: Any) -> tuple[int, bool]:
    """An entry's time -> (nanoseconds, sent as EventTime)."""
    if isinstance(value, msgpack.ExtType):
        if value.code != 0 or len(value.data) != 8:
            raise ProtocolError(f"bad EventTime: ext type {value.code} of {len(value.data)} bytes")
        seconds, nanos = struct.unpack(">II", value.data)
        return seconds * 1_000_000_000 + nanos, True
    if isinstance(value, int) and not isinstance(value, bool):
        return value * 1_000_000_000, False
    if isinstance(value, float):
        return int(value * 1e9), False
    raise ProtocolError(f"bad time {value!r:.60}: expected EventTime or seconds")


def sha512_hex(*parts: str | bytes) -> str:
    digest = hashlib.sha512()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()


def as_bytes(value: Any) -> bytes:
    """Nonces and salts are bin in the spec; some clients send them as str."""
    return value if isinstance(value, bytes) else str(value).encode()


def unpacker(max_buffer_size: int = 0) -> msgpack.Unpacker:
    """A streaming unpacker for one connection (str as str, any map keys, bounded buffer)."""
    return msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max_buffer_size)


def unpack_entries(stream: bytes) -> list[Any]:
    """The ``[time, record]`` entries of a PackedForward bin."""
    entries = unpacker()
    entries.feed(stream)
    try:
        return list(entries)
    except (msgpack.UnpackException, ValueError) as exc:
        raise ProtocolError(f"corrupt PackedForward entries: {exc}") from None


def gunzip(data: bytes, limit: int) -> bytes:
    """gzip -> bytes, at most ``limit`` bytes of output (0: no limit); concatenated members too."""
    out: list[bytes] = []
    size = 0
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            part = inflater.decompress(data, (limit - size + 1) if limit else 0)
        except zlib.error as exc:
            raise ProtocolError(f"corrupt gzip entries: {exc}") from None
        size += len(part)
        if limit and (size > limit or inflater.unconsumed_tail):
            raise ProtocolError(f"gzip entries expand to more than {limit} bytes (buffer_max_size)")
        if not inflater.eof:
            raise ProtocolError("truncated gzip entries")
        out.append(part)
        data = inflater.unused_data
    return b"".join(out)


def decode_message(message: Any, max_size: int = 0) -> tuple[str, str, list[Any], dict[str, Any]]:
    """Any event mode -> ``(tag, mode, entries, option)``; entries are unchecked ``[time, record]``."""
    if not isinstance(message, list) or len(message) < 2:
        raise ProtocolError(f"not a forward message (an array [tag, ...]): {message!r:.100}")
    tag, second = message[0], message[1]
    if not isinstance(tag, str):
        raise ProtocolError(f"the tag must be a string, got {tag!r:.60}")
    option: Any
    if isinstance(second, list):
        mode, entries = MODE_FORWARD, second
        option = message[2] if len(message) > 2 else None
    elif isinstance(second, bytes | str):
        option = message[2] if len(message) > 2 else None
        raw = second if isinstance(second, bytes) else second.encode("utf-8", "surrogateescape")
        compressed = option.get("compressed") if isinstance(option, dict) else None
        if compressed == "gzip":
            mode, raw = MODE_COMPRESSED, gunzip(raw, max_size)
        elif compressed in (None, "text"):
            mode = MODE_PACKED
        else:
            raise ProtocolError(f"unknown compression {compressed!r:.40} (only gzip)")
        entries = unpack_entries(raw)
    else:
        if len(message) < 3:
            raise ProtocolError("Message mode needs [tag, time, record]")
        mode, entries = MODE_MESSAGE, [[message[1], message[2]]]
        option = message[3] if len(message) > 3 else None
    if option is None:
        option = {}
    if not isinstance(option, dict):
        raise ProtocolError(f"the option must be a map, got {option!r:.60}")
    return tag, mode, entries, option


# -- handshake --------------------------------------------------------------------------------


def helo(nonce: bytes, auth_salt: bytes, keepalive: bool = True) -> list[Any]:
    return ["HELO", {"nonce": nonce, "auth": auth_salt, "keepalive": keepalive}]


def ping(
    helo_message: Any, hostname: str, shared_key: str, username: str | None, password: str
) -> tuple[list[Any], bytes, bytes]:
    """The client's PING for a HELO -> ``(ping, salt, nonce)``; raises :class:`ProtocolError`
    when the HELO is malformed or asks for user authentication without a username."""
    if not (
        isinstance(helo_message, list)
        and len(helo_message) >= 2
        and helo_message[0] == "HELO"
        and isinstance(helo_message[1], dict)
    ):
        raise ProtocolError(f"answered {helo_message!r:.100} instead of HELO; is shared_key right?")
    nonce = as_bytes(helo_message[1].get("nonce", b""))
    auth_salt = helo_message[1].get("auth", b"")
    salt = os.urandom(16)
    digest = sha512_hex(salt, hostname, nonce, shared_key)
    user, password_digest = "", ""
    if auth_salt:
        if not username:
            raise ProtocolError("requires user authentication: set username and password")
        user, password_digest = username, sha512_hex(as_bytes(auth_salt), username, password)
    return ["PING", hostname, salt, digest, user, password_digest], salt, nonce


def check_ping(
    ping_message: Any, nonce: bytes, auth_salt: bytes, shared_key: str, users: dict[str, str]
) -> tuple[str, bytes, str]:
    """The server's check of a PING -> ``(reason, salt, client hostname)``; reason "" means
    accepted. Raises :class:`ProtocolError` when it is not a PING at all."""
    if not (isinstance(ping_message, list) and len(ping_message) == 6 and ping_message[0] == "PING"):
        raise ProtocolError(f"expected PING, got {ping_message!r:.100}")
    _, client_host, salt, digest, username, password_digest = ping_message
    salt_bytes = as_bytes(salt)
    expected = sha512_hex(salt_bytes, str(client_host), nonce, shared_key)
    if not isinstance(digest, str) or not hmac.compare_digest(digest, expected):
        return "shared_key mismatch", salt_bytes, str(client_host)
    if users:
        password = users.get(str(username))
        wanted = sha512_hex(auth_salt, str(username), password) if password is not None else ""
        if password is None or not isinstance(password_digest, str) or not hmac.compare_digest(password_digest, wanted):
            return "username/password mismatch", salt_bytes, str(client_host)
    return "", salt_bytes, str(client_host)


def pong(reason: str, hostname: str, salt: bytes, nonce: bytes, shared_key: str) -> list[Any]:
    """The server's PONG; on success it carries the server's own digest of the shared key."""
    if reason:
        return ["PONG", False, reason, "", ""]
    return ["PONG", True, "", hostname, sha512_hex(salt, hostname, nonce, shared_key)]


def check_pong(pong_message: Any, salt: bytes, nonce: bytes, shared_key: str) -> str:
    """The client's check of a PONG -> the server's hostname; raises :class:`ProtocolError`
    naming the problem (refused, or a server that does not know the shared key)."""
    if not (isinstance(pong_message, list) and len(pong_message) == 5 and pong_message[0] == "PONG"):
        raise ProtocolError(f"answered {pong_message!r:.100} instead of PONG")
    _, ok, reason, server_host, server_digest = pong_message
    if not ok:
        raise ProtocolError(f"refused the handshake: {reason or 'no reason given'}")
    if server_digest != sha512_hex(salt, str(server_host), nonce, shared_key):
        raise ProtocolError(f"({server_host}) does not know our shared_key; not sending to it")
    return str(server_host)
