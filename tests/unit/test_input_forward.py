"""The ``forward`` input, inside a real pipeline, against independent clients.

Clients: ``fluent-logger`` (Fluentd's own Python client, from PyPI) for Message mode, and
msgpack frames written here by hand for the modes it lacks (Forward, PackedForward,
CompressedPackedForward), chunk acks, the shared-key handshake (digests computed here from
the spec's formulas with hashlib, not with kubetrail's protocol module) and bad input. Then
kubetrail's own ``forward`` output in one process sending to the ``forward`` input in another
(two real ``kubetrail run`` processes), with TLS, shared key, gzip and acks, across a restart
of the receiver. Neither Fluentd nor Fluent Bit can be installed here (see
tests/fakes/forward_server.py), so they are not among the clients.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import socket
import ssl
import stat
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
from fluent import sender as fluent_sender

from kubetrail.core.config import load_config
from kubetrail.core.errors import ConfigError
from kubetrail.core.record import Batch
from kubetrail.runtime.pipeline import Pipeline
from tests.files import written_json_lines
from tests.timing import scaled
from tests.unit.helpers import write
from tests.unit.source_helpers import Running, read_until_closed, running, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cluster"))
from localcluster import pki

T0 = 1_796_000_000_123_456_789


def event_time(ns: int) -> msgpack.ExtType:
    return msgpack.ExtType(0, struct.pack(">II", *divmod(ns, 1_000_000_000)))


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def sha512_hex(*parts: bytes | str) -> str:
    h = hashlib.sha512()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
    return h.hexdigest()


class Client:
    """A raw forward-protocol client: frames in, answers out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.unpacker = msgpack.Unpacker(raw=False)

    @classmethod
    async def connect(cls, port: int | None = None, *, path: str | None = None, tls: ssl.SSLContext | None = None):  # type: ignore[no-untyped-def]
        if path is not None:
            reader, writer = await asyncio.open_unix_connection(path)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
        return cls(reader, writer)

    async def send(self, obj: Any, refused: bool = False) -> None:
        """Send one message; with `refused`, the server may close the connection while it arrives."""
        self.writer.write(obj if isinstance(obj, bytes) else packb(obj))
        try:
            await self.writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            if not refused:
                raise

    async def answer(self, timeout: float = 10.0) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                for item in self.unpacker:
                    return item
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("closed by the server")
                self.unpacker.feed(data)

    async def closed(self, timeout: float = 10.0) -> bool:
        """True when the server closes the connection (anything it still sends is read first)."""
        await read_until_closed(self.reader, timeout)
        return True

    async def handshake(self, key: str, hostname: str = "client-1", user: str = "", password: str = "") -> Any:
        helo = await self.answer()
        assert helo[0] == "HELO"
        nonce, auth = helo[1]["nonce"], helo[1]["auth"]
        salt = os.urandom(16)
        digest = sha512_hex(salt, hostname, nonce, key)
        password_digest = sha512_hex(auth, user, password) if auth else ""
        await self.send(["PING", hostname, salt, digest, user, password_digest])
        pong = await self.answer()
        if pong[1]:  # the server proves that it knows the key too
            assert pong[4] == sha512_hex(salt, pong[3], nonce, key)
        return pong

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def entries(n: int, start: int = 0) -> list[list[Any]]:
    return [[event_time(T0 + i), {"n": i, "msg": f"line {i}"}] for i in range(start, start + n)]


def numbers(run: Running) -> list[int]:
    return [r.body["n"] for r in run.sink.records]


def forward_input(extra: str = "") -> str:
    return f"    name forward\n    listen 127.0.0.1\n    port 0\n{extra}"


@pytest.fixture
async def fwd(tmp_path: Path) -> AsyncIterator[Running]:
    async with running(tmp_path, forward_input(), ready="started") as run:
        yield run


# --- modes, time, tags -------------------------------------------------------------------------


async def test_fluent_logger_message_mode_with_event_time_and_integer_time(fwd: Running) -> None:
    port = fwd.source.bound_port
    nano = fluent_sender.FluentSender("app", host="127.0.0.1", port=port, nanosecond_precision=True)
    seconds = fluent_sender.FluentSender("legacy", host="127.0.0.1", port=port)
    try:
        assert nano.emit_with_time("web", T0 / 1e9, {"n": 0, "data": b"\xffbin", "nested": {"a": [1, None]}})
        assert seconds.emit_with_time("db", 1_796_000_000, {"n": 1})
    finally:
        nano.close()
        seconds.close()
    records = await fwd.wait_records(2)
    by_n = {r.body["n"]: r for r in records}
    assert by_n[0].tag == "app.web" and by_n[1].tag == "legacy.db"
    # fluent-logger's EventTime keeps nanoseconds (to float precision of the client); integers are seconds
    assert abs(by_n[0].time_ns - T0) < 1000 and by_n[1].time_ns == 1_796_000_000 * 10**9
    # bin has no JSON form: decoded as UTF-8 with replacement, the rest unchanged
    assert by_n[0].body == {"n": 0, "data": "\ufffdbin", "nested": {"a": [1, None]}}
    assert orjson.loads(by_n[0].json_bytes()) == by_n[0].body


@pytest.mark.parametrize("mode", ["forward", "packed_forward", "compressed_packed_forward"])
async def test_every_mode_with_a_chunk_is_acked_only_after_the_sink_took_it(tmp_path: Path, mode: str) -> None:
    async with gated(tmp_path) as (run, gate):
        client = await Client.connect(run.source.bound_port)
        stream = b"".join(packb(e) for e in entries(100))
        option: dict[str, Any] = {"chunk": f"c-{mode}", "size": 100}
        if mode == "forward":
            message = ["kube.app", entries(100), option]
        elif mode == "packed_forward":
            message = ["kube.app", stream, option]
        else:
            message = ["kube.app", gzip.compress(stream), {**option, "compressed": "gzip"}]
        await client.send(message)
        await wait_until(lambda: run.sink.arrived.is_set(), 10, "the batch at the sink")
        with pytest.raises(TimeoutError):
            await client.answer(timeout=0.5)  # held: the sink has not delivered it
        gate.set()
        assert await client.answer() == {"ack": f"c-{mode}"}
        await client.close()
        assert numbers(run) == list(range(100))
        first = run.sink.records[0]
        assert (first.tag, first.time_ns) == ("kube.app", T0)


async def test_with_the_filesystem_buffer_a_chunk_is_acked_once_queued_on_disk(tmp_path: Path) -> None:
    service = f"    storage.path {tmp_path / 'buffer'}"
    async with gated(tmp_path, "    storage.type filesystem", service) as (run, gate):
        client = await Client.connect(run.source.bound_port)
        await client.send(["kube.app", entries(10), {"chunk": "spooled"}])
        # the sink has not delivered anything, yet the chunk is safe on disk: acked
        assert await client.answer() == {"ack": "spooled"}
        assert run.sink.records == []
        assert list((tmp_path / "buffer").rglob("*")), "nothing in the disk queue"
        gate.set()
        await wait_until(lambda: len(run.sink.records) == 10, 10, "the delivery")
        await client.close()


async def test_mem_buf_limit_pauses_reading_and_loses_nothing(tmp_path: Path) -> None:
    total = 20_000
    async with gated(tmp_path, "    mem_buf_limit 20k\n    buffer_chunk_size 4k") as (run, gate):
        client = await Client.connect(run.source.bound_port)
        blob = "x" * 1000
        frames = b"".join(packb(["kube.app", event_time(T0 + i), {"n": i, "blob": blob}]) for i in range(total))
        sending = asyncio.ensure_future(client.send(frames))  # 20 MB: more than the socket buffers hold
        await asyncio.sleep(1.0)
        # the input stopped reading: a little over the limit is in, the rest waits in TCP
        assert 0 < run.metric("kubetrail_records_in_total", kind="source") < 100
        assert run.metric("kubetrail_input_mem_buf_paused_total") >= 1
        assert not sending.done()
        gate.set()
        await asyncio.wait_for(sending, 30)
        await wait_until(lambda: len(run.sink.records) == total, 30, "every record")
        assert [r.body["n"] for r in run.sink.records] == list(range(total))
        await client.close()


async def test_at_shutdown_routed_chunks_are_still_acked(tmp_path: Path) -> None:
    async with gated(tmp_path) as (run, gate):
        client = await Client.connect(run.source.bound_port)
        await client.send(["kube.app", entries(3), {"chunk": "late"}])
        await wait_until(lambda: run.sink.arrived.is_set(), 10, "the batch at the sink")
        run.pipeline.request_stop()
        await asyncio.sleep(0.3)
        gate.set()  # delivered during the shutdown: the ack still goes out before the close
        assert await client.answer() == {"ack": "late"}
        assert await client.closed()
        await client.close()


async def test_compressed_entries_in_several_gzip_members(fwd: Running) -> None:
    # Fluentd appends a gzip member per buffered piece: the bin is their concatenation
    first = gzip.compress(b"".join(packb(e) for e in entries(3)))
    second = gzip.compress(b"".join(packb(e) for e in entries(2, 3)))
    client = await Client.connect(fwd.source.bound_port)
    await client.send(["kube.app", first + second, {"compressed": "gzip", "chunk": "members"}])
    assert await client.answer() == {"ack": "members"}
    await client.close()
    assert numbers(fwd) == [0, 1, 2, 3, 4]


async def test_messages_without_chunk_are_coalesced_and_a_chunk_gets_its_own_batch(fwd: Running) -> None:
    client = await Client.connect(fwd.source.bound_port)
    frames = [packb(["a", event_time(T0 + i), {"n": i}]) for i in range(50)]
    frames.append(packb(["a", entries(1, 50), {"chunk": "x"}]))
    frames += [packb(["b", event_time(T0), {"n": 51}])]
    await client.send(b"".join(frames))
    assert await client.answer() == {"ack": "x"}
    await fwd.wait_records(52)
    await client.close()
    assert numbers(fwd) == list(range(52))
    assert [(b.tag, len(b)) for b in fwd.sink.batches] == [("a", 50), ("a", 1), ("b", 1)]


async def test_tag_prefix_and_tag_override(tmp_path: Path) -> None:
    async with running(tmp_path, forward_input("    tag_prefix from-edge."), ready="started") as run:
        client = await Client.connect(run.source.bound_port)
        await client.send(["kube.app", entries(1), {"chunk": "1"}])
        assert await client.answer() == {"ack": "1"}
        assert run.sink.records[0].tag == "from-edge.kube.app"
        await client.close()
    async with running(tmp_path, forward_input("    tag fixed"), ready="started") as run:
        client = await Client.connect(run.source.bound_port)
        await client.send(["kube.app", entries(1), {"chunk": "1"}])
        assert await client.answer() == {"ack": "1"}
        assert run.sink.records[0].tag == "fixed"
        await client.close()


async def test_unix_socket_with_unix_perm(tmp_path: Path) -> None:
    path = tmp_path / "fw.sock"
    extra = f"    unix_path {path}\n    unix_perm 0600"
    async with running(tmp_path, forward_input(extra), ready="started") as run:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        client = await Client.connect(path=str(path))
        await client.send(["unix.app", entries(3), {"chunk": "u"}])
        assert await client.answer() == {"ack": "u"}
        await client.close()
        assert numbers(run) == [0, 1, 2]
    assert not path.exists()  # removed on stop


# --- shared key, users, TLS --------------------------------------------------------------------


async def test_shared_key_right_key_accepted_wrong_key_refused_and_counted(tmp_path: Path) -> None:
    extra = "    shared_key s3cret\n    self_hostname receiver-1"
    async with running(tmp_path, forward_input(extra), ready="started") as run:
        good = await Client.connect(run.source.bound_port)
        pong = await good.handshake("s3cret")
        assert pong[:4] == ["PONG", True, "", "receiver-1"]
        bad = await Client.connect(run.source.bound_port)
        pong = await bad.handshake("wrong")
        assert pong[:3] == ["PONG", False, "shared_key mismatch"]
        assert await bad.closed()
        # a client that skips the handshake is not a PING: closed, counted
        rude = await Client.connect(run.source.bound_port)
        assert (await rude.answer())[0] == "HELO"
        await rude.send(["kube.app", entries(1)], refused=True)
        assert await rude.closed()
        await good.send(["kube.app", entries(2), {"chunk": "ok"}])
        assert await good.answer() == {"ack": "ok"}
        await good.close()
        assert numbers(run) == [0, 1]
        assert run.metric("kubetrail_errors_total", type="auth_failed") == 1
        assert run.metric("kubetrail_errors_total", type="protocol_error") == 1


async def test_security_users_need_the_right_password(tmp_path: Path) -> None:
    extra = "    shared_key k\n    security.users alice pw1\n    security.users bob pw2"
    async with running(tmp_path, forward_input(extra), ready="started") as run:
        client = await Client.connect(run.source.bound_port)
        assert (await client.handshake("k", user="bob", password="pw2"))[1] is True
        await client.send(["a", entries(1), {"chunk": "1"}])
        assert await client.answer() == {"ack": "1"}
        await client.close()
        for user, password in (("bob", "pw1"), ("mallory", "pw1")):
            wrong = await Client.connect(run.source.bound_port)
            pong = await wrong.handshake("k", user=user, password=password)
            assert pong[:3] == ["PONG", False, "username/password mismatch"]
            assert await wrong.closed()
        assert run.metric("kubetrail_errors_total", type="auth_failed") == 2


async def test_empty_shared_key_handshake(tmp_path: Path) -> None:
    async with running(tmp_path, forward_input("    empty_shared_key on"), ready="started") as run:
        client = await Client.connect(run.source.bound_port)
        assert (await client.handshake(""))[1] is True
        await client.close()


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    ca = pki.make_ca("forward-test-ca")
    pki.write_cert(tmp_path / "ca.crt", ca.cert)
    pki.serving_cert(ca, "localhost").write(tmp_path / "tls.crt", tmp_path / "tls.key")
    pki.issue(ca, "sender", client=True).write(tmp_path / "client.crt", tmp_path / "client.key")
    pki.issue(pki.make_ca("stranger"), "sender", client=True).write(tmp_path / "other.crt", tmp_path / "other.key")
    return {name: tmp_path / f"{name}" for name in ("ca.crt", "tls.crt", "tls.key", "client.crt", "client.key")} | {
        "other.crt": tmp_path / "other.crt",
        "other.key": tmp_path / "other.key",
    }


def client_tls(certs: dict[str, Path], cert: str | None = "client") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs["ca.crt"]))
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(certs[f"{cert}.crt"], certs[f"{cert}.key"])
    return ctx


async def test_tls_with_required_client_certificates(tmp_path: Path, certs: dict[str, Path]) -> None:
    extra = (
        f"    tls on\n    tls.crt_file {certs['tls.crt']}\n    tls.key_file {certs['tls.key']}\n"
        f"    tls.ca_file {certs['ca.crt']}\n    shared_key k"
    )
    async with running(tmp_path, forward_input(extra), ready="started") as run:
        port = run.source.bound_port
        client = await Client.connect(port, tls=client_tls(certs))
        assert (await client.handshake("k"))[1] is True
        await client.send(["tls.app", entries(5), {"chunk": "t"}])
        assert await client.answer() == {"ack": "t"}
        await client.close()
        for who in (None, "other"):  # no certificate, or one from another CA: the TLS handshake fails
            with pytest.raises((ssl.SSLError, ConnectionError)):
                stranger = await Client.connect(port, tls=client_tls(certs, who))
                await stranger.answer()
        # plain TCP on the TLS port: garbage to the server, which closes it
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(packb(["tls.app", entries(1)]))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert numbers(run) == list(range(5))


async def test_tls_without_client_certificates_when_no_ca(tmp_path: Path, certs: dict[str, Path]) -> None:
    extra = f"    tls on\n    tls.crt_file {certs['tls.crt']}\n    tls.key_file {certs['tls.key']}"
    async with running(tmp_path, forward_input(extra), ready="started") as run:
        client = await Client.connect(run.source.bound_port, tls=client_tls(certs, None))
        await client.send(["tls.app", entries(2), {"chunk": "t"}])
        assert await client.answer() == {"ack": "t"}
        await client.close()


# --- bad input ---------------------------------------------------------------------------------


async def test_garbage_closes_that_connection_only_and_is_counted(fwd: Running) -> None:
    port = fwd.source.bound_port
    good = await Client.connect(port)
    await good.send(["kube.app", entries(1), {"chunk": "before"}])
    assert await good.answer() == {"ack": "before"}
    for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\xc1\xc1\xc1", packb({"not": "an array"})):
        bad = await Client.connect(port)
        await bad.send(garbage, refused=True)
        assert await bad.closed()
    await good.send(["kube.app", entries(1, 1), {"chunk": "after"}])
    assert await good.answer() == {"ack": "after"}
    await good.close()
    assert numbers(fwd) == [0, 1]
    assert fwd.metric("kubetrail_errors_total", type="protocol_error") == 3


async def test_bad_entries_are_dropped_alone_and_the_rest_acked(fwd: Running) -> None:
    client = await Client.connect(fwd.source.bound_port)
    mixed = [*entries(2), ["yesterday", {"n": 99}], [event_time(T0), "not a map"], *entries(1, 2)]
    await client.send(["kube.app", mixed, {"chunk": "m"}])
    assert await client.answer() == {"ack": "m"}
    await client.send(["kube.app", [["bad", {}]], {"chunk": "none-valid"}])
    assert await client.answer() == {"ack": "none-valid"}
    await client.close()
    assert numbers(fwd) == [0, 1, 2]
    assert fwd.metric("kubetrail_records_dropped_total", reason="invalid") == 3


async def test_oversized_messages_and_gzip_bombs_close_the_connection(tmp_path: Path) -> None:
    extra = "    buffer_chunk_size 64k\n    buffer_max_size 256k"
    async with running(tmp_path, forward_input(extra), ready="started") as run:
        port = run.source.bound_port
        big = await Client.connect(port)
        await big.send(["kube.app", [[event_time(T0), {"blob": "x" * 300_000}]]], refused=True)
        assert await big.closed()
        bomb = await Client.connect(port)
        stream = packb([event_time(T0), {"blob": "y" * 5_000_000}])
        await bomb.send(["kube.app", gzip.compress(stream), {"compressed": "gzip"}], refused=True)
        assert await bomb.closed()
        corrupt = await Client.connect(port)
        await corrupt.send(["kube.app", b"\x1f\x8bnot gzip", {"compressed": "gzip"}], refused=True)
        assert await corrupt.closed()
        ok = await Client.connect(port)
        await ok.send(["kube.app", entries(1), {"chunk": "fine"}])
        assert await ok.answer() == {"ack": "fine"}
        await ok.close()
        assert numbers(run) == [0]
        assert run.metric("kubetrail_errors_total", type="protocol_error") == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("    security.users a b", "security.users needs shared_key"),
        ("    security.users justname\n    shared_key k", "is not 'USER PASSWORD'"),
        ("    tls on", "tls on needs tls.crt_file and tls.key_file"),
        ("    buffer_chunk_size 2M\n    buffer_max_size 1M", "smaller than buffer_chunk_size"),
        ("    unix_perm 0999", "not an octal file mode"),
    ],
)
def test_configuration_errors(tmp_path: Path, extra: str, message: str) -> None:
    conf = write(tmp_path / "c.conf", f"[INPUT]\n{forward_input(extra)}\n[OUTPUT]\n    name stdout\n    match *\n")
    with pytest.raises(ConfigError, match=message):
        Pipeline(load_config(conf))


# --- kubetrail to kubetrail, two processes ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as stderr:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    assert proc.wait(30) == 0


def test_kubetrail_forward_output_to_forward_input_in_another_process(tmp_path: Path, certs: dict[str, Path]) -> None:
    port = free_port()
    app = tmp_path / "app.log"
    write(app, "".join(orjson.dumps({"n": i}).decode() + "\n" for i in range(2000)))
    receiver_conf = write(
        tmp_path / "receiver.conf",
        f"""
[SERVICE]
    grace 5
[INPUT]
    name          forward
    listen        127.0.0.1
    port          {port}
    tag_prefix    edge.
    shared_key    cluster-key
    self_hostname aggregator
    tls           on
    tls.crt_file  {certs["tls.crt"]}
    tls.key_file  {certs["tls.key"]}
    tls.ca_file   {certs["ca.crt"]}
[OUTPUT]
    name   file
    match  edge.*
    path   {tmp_path / "out"}
    file   out.jsonl
    format plain
    mkdir  on
""",
    )
    sender_conf = write(
        tmp_path / "sender.conf",
        f"""
[SERVICE]
    grace 5
    scheduler.base 0.2
    scheduler.cap 1
[INPUT]
    name           tail
    path           {app}
    tag            app
    parser         json
    read_from_head on
    db             {tmp_path / "tail.db"}
[OUTPUT]
    name                 forward
    match                *
    host                 localhost
    port                 {port}
    shared_key           cluster-key
    require_ack_response on
    compress             gzip
    tls                  on
    tls.ca_file          {certs["ca.crt"]}
    tls.crt_file         {certs["client.crt"]}
    tls.key_file         {certs["client.key"]}
""",
    )
    out = tmp_path / "out" / "out.jsonl"
    receiver = start(receiver_conf, tmp_path / "receiver.log")
    sender = start(sender_conf, tmp_path / "sender.log")
    try:
        deadline = time.monotonic() + scaled(60)
        while len(written_json_lines(out)) < 2000 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(r["n"] for r in written_json_lines(out)) == list(range(2000))
        # The receiver goes away; what is written meanwhile is retried until it is back.
        stop(receiver)
        with app.open("a") as fh:
            fh.write("".join(orjson.dumps({"n": i}).decode() + "\n" for i in range(2000, 3000)))
        time.sleep(1.5)
        receiver = start(receiver_conf, tmp_path / "receiver.log")
        deadline = time.monotonic() + scaled(60)
        while len(written_json_lines(out)) < 3000 and time.monotonic() < deadline:
            time.sleep(0.1)
        got = sorted(r["n"] for r in written_json_lines(out))
        # at least once: every line arrived (an ack lost with the receiver may repeat a batch)
        assert set(got) == set(range(3000))
        assert got[:2000] == list(range(2000))
    finally:
        for proc in (sender, receiver):
            if proc.poll() is None:
                stop(proc)
    assert "forward input listening" in (tmp_path / "receiver.log").read_text()


# --- a sink that holds deliveries back -------------------------------------------------------


class GatedSink:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.arrived = asyncio.Event()
        self.batches: list[Batch] = []

    async def start(self) -> None:
        return None

    async def write(self, batch: Batch) -> None:
        self.arrived.set()
        await self.gate.wait()
        self.batches.append(batch)

    async def close(self) -> None:
        return None

    @property
    def records(self) -> list[Any]:
        return [r for b in self.batches for r in b.records]


@asynccontextmanager
async def gated(tmp_path: Path, extra: str = "", service: str = "") -> AsyncIterator[tuple[Any, asyncio.Event]]:
    async with running(tmp_path, forward_input(extra), service=service, ready="started") as run:
        sink = GatedSink()
        run.pipeline.runners[0].sink = sink  # type: ignore[assignment]
        run.sink = sink  # type: ignore[assignment]
        try:
            yield run, sink.gate
        finally:
            sink.gate.set()
