"""The ``syslog`` input, inside a real pipeline, fed by real syslog software.

* **rsyslog** (Debian's package, installed by scripts/setup): messages go into a real rsyslogd,
  which forwards them to kubetrail with ``omfwd`` in both RFC formats, over TCP with octet
  counting, TCP with newline framing and UDP, using rsyslog's own forwarding templates.
* **logger** from util-linux: straight to kubetrail over UDP, TCP (both framings) and both
  kinds of Unix socket, with its RFC 5424 and RFC 3164 formats.
* Raw sockets for bad input: unparsable messages (kept under ``log``, counted), over-long
  messages (skipped, counted, the connection goes on), a broken octet count (that connection
  closed, counted, others go on), oversized datagrams (cut, counted).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from kubetrail.core.config import load_config
from kubetrail.core.errors import ConfigError
from kubetrail.runtime.pipeline import Pipeline
from tests.servers import ServerProcess, free_port, udp_bound
from tests.servers.rsyslog import gtls_available, rsyslogd
from tests.unit.helpers import write
from tests.unit.source_helpers import Running, running, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cluster"))
from localcluster import pki

LOGGER = shutil.which("logger")
needs_rsyslog = pytest.mark.skipif(
    rsyslogd() is None, reason="rsyslogd is not installed (scripts/setup installs Debian's rsyslog)"
)
needs_logger = pytest.mark.skipif(LOGGER is None, reason="logger (util-linux) is not installed")


def syslog_input(mode: str, extra: str = "") -> str:
    where = "    listen 127.0.0.1\n    port 0" if mode in ("tcp", "udp") else ""
    return f"    name syslog\n    mode {mode}\n{where}\n{extra}"


@asynccontextmanager
async def syslog(tmp_path: Path, mode: str, extra: str = "") -> AsyncIterator[Running]:
    async with running(tmp_path, syslog_input(mode, extra), ready="started") as run:
        yield run


def bodies(run: Running) -> list[dict[str, Any]]:
    return [r.body for r in run.sink.records]


async def send_tcp(port: int, data: bytes) -> bytes:
    """Writes ``data``, half-closes, and returns what came back before the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


# --- rsyslog forwarding ------------------------------------------------------------------------


class RsyslogRelay(ServerProcess):
    """A real rsyslogd that takes messages on a UDP port and forwards them with omfwd."""

    name = "rsyslogd"
    stop_timeout = 20.0

    def __init__(self, workdir: Path, actions: list[str], global_extra: str = "") -> None:
        self.workdir = workdir
        self.log_path = workdir / "rsyslogd.log"
        self.port = free_port(socket.SOCK_DGRAM)
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "rsyslog.conf"
        conf.write_text(
            f'global(workDirectory="{workdir}" maxMessageSize="64k"{global_extra})\n'
            'module(load="imudp")\n'
            f'input(type="imudp" port="{self.port}" address="127.0.0.1" ruleset="relay")\n'
            'ruleset(name="relay") {\n' + "\n".join(actions) + "\n}\n"
        )
        binary = rsyslogd()
        assert binary is not None
        self.spawn([binary, "-n", "-f", str(conf), "-i", str(workdir / "rsyslogd.pid")])

    def send(self, message: bytes) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, ("127.0.0.1", self.port))

    async def ready(self) -> None:
        """rsyslogd holds its UDP port (our own bind is refused)."""

        def bound() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"rsyslogd exited: {self.log_tail()}")
            return udp_bound(self.port)

        await wait_until(bound, 30, "rsyslogd to listen")

    def stop(self) -> None:
        self.stop_process()  # the work directory is the test's


@needs_rsyslog
async def test_rsyslog_forwards_rfc5424_and_rfc3164_over_tcp_and_udp(tmp_path: Path) -> None:
    lines = (
        syslog_input("tcp", "    tag octet\n    format octet_counting\n    source_address_key src")
        + "\n[INPUT]\n"
        + syslog_input("tcp", "    tag newline")
        + "\n[INPUT]\n"
        + syslog_input("udp", "    tag bsd\n    parser syslog-rfc3164")
    )
    async with running(tmp_path, lines) as run:
        sources = [c.instance for c in run.pipeline.sources]
        await wait_until(lambda: all(s.started.is_set() for s in sources), 10, "three listeners")
        octet, newline, bsd = (s.bound_port for s in sources)
        relay = RsyslogRelay(
            tmp_path / "rsyslog",
            [
                f'action(type="omfwd" target="127.0.0.1" port="{octet}" protocol="tcp" '
                'TCP_Framing="octet-counted" template="RSYSLOG_SyslogProtocol23Format")',
                f'action(type="omfwd" target="127.0.0.1" port="{newline}" protocol="tcp" '
                'template="RSYSLOG_SyslogProtocol23Format")',
                f'action(type="omfwd" target="127.0.0.1" port="{bsd}" protocol="udp" '
                'template="RSYSLOG_TraditionalForwardFormat")',
            ],
        )
        try:
            await relay.ready()
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            for i in range(20):
                # local0.warning (132), RFC 5424 with a MSGID and structured data
                relay.send(f'<132>1 {now} web-1 checkout 4242 ID{i} [order@32473 id="{i}"] order {i} paid'.encode())
            await run.wait_records(60, timeout=30)
        finally:
            relay.stop()
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for record in run.sink.records:
        by_tag.setdefault(record.tag, []).append(record.body)
    assert sorted(by_tag) == ["bsd", "newline", "octet"]
    for tag in ("octet", "newline"):
        got = sorted(by_tag[tag], key=lambda b: int(b["msgid"][2:]))
        assert [b["message"] for b in got] == [f"order {i} paid" for i in range(20)]
        first = got[0]
        assert (first["pri"], first["host"], first["ident"], first["pid"], first["msgid"]) == (
            "132",
            "web-1",
            "checkout",
            "4242",
            "ID0",
        )
        assert first["extradata"] == '[order@32473 id="0"]'
        assert first["time"].startswith(now[:19])  # Time_Keep: the original text stays
    assert all(b["src"].startswith("tcp://127.0.0.1:") for b in by_tag["octet"])
    # RFC 3164 as rsyslog forwards it: "<132>Mmm dd hh:mm:ss web-1 checkout[4242]: order 0 paid"
    bsd_got = sorted(by_tag["bsd"], key=lambda b: int(b["message"].split()[1]))
    assert [b["message"] for b in bsd_got] == [f"order {i} paid" for i in range(20)]
    assert {(b["pri"], b["host"], b["ident"], b["pid"]) for b in bsd_got} == {("132", "web-1", "checkout", "4242")}
    stamps = {r.time_ns for r in run.sink.records if r.tag == "bsd"}
    sent = datetime.strptime(now, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    assert all(abs(t / 1e9 - sent) < 2 for t in stamps)  # year-less time: the current year


@needs_rsyslog
@pytest.mark.skipif(not gtls_available(), reason="rsyslog-gnutls is not installed (scripts/setup installs it)")
async def test_rsyslog_forwards_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    ca = pki.make_ca("syslog-test-ca")
    pki.write_cert(tmp_path / "ca.crt", ca.cert)
    pki.serving_cert(ca, "localhost").write(tmp_path / "tls.crt", tmp_path / "tls.key")
    pki.issue(ca, "rsyslog-relay", client=True).write(tmp_path / "client.crt", tmp_path / "client.key")
    extra = (
        f"    format octet_counting\n    tls on\n    tls.crt_file {tmp_path / 'tls.crt'}\n"
        f"    tls.key_file {tmp_path / 'tls.key'}\n    tls.ca_file {tmp_path / 'ca.crt'}"
    )
    async with syslog(tmp_path, "tcp", extra) as run:
        relay = RsyslogRelay(
            tmp_path / "rsyslog",
            [
                f'action(type="omfwd" target="127.0.0.1" port="{run.source.bound_port}" protocol="tcp" '
                'StreamDriver="gtls" StreamDriverMode="1" StreamDriverAuthMode="x509/name" '
                'StreamDriverPermittedPeers="localhost" TCP_Framing="octet-counted" '
                'template="RSYSLOG_SyslogProtocol23Format")'
            ],
            f' DefaultNetstreamDriverCAFile="{tmp_path / "ca.crt"}"'
            f' DefaultNetstreamDriverCertFile="{tmp_path / "client.crt"}"'
            f' DefaultNetstreamDriverKeyFile="{tmp_path / "client.key"}"',
        )
        try:
            await relay.ready()
            for i in range(5):
                relay.send(f"<134>1 2026-12-05T10:00:0{i}.250Z node-1 kubelet 77 - - pod {i} started".encode())
            await run.wait_records(5, timeout=30)
        finally:
            relay.stop()
    got = sorted(bodies(run), key=lambda b: b["time"])
    assert [b["message"] for b in got] == [f"pod {i} started" for i in range(5)]
    assert {(b["pri"], b["host"], b["ident"], b["pid"]) for b in got} == {("134", "node-1", "kubelet", "77")}
    # a TCP client without a certificate fails the TLS handshake; no record comes from it
    with pytest.raises((ssl.SSLError, ConnectionError)):
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        reader, writer = await asyncio.open_connection("127.0.0.1", run.source.bound_port, ssl=ctx)
        writer.write(b"5 <14>x")
        await writer.drain()
        await asyncio.wait_for(reader.read(), 10)
    assert len(run.sink.records) == 5


# --- logger (util-linux) -----------------------------------------------------------------------


def run_logger(*args: str) -> None:
    assert LOGGER is not None
    subprocess.run([LOGGER, *args], check=True, timeout=30, capture_output=True)


@needs_logger
@pytest.mark.parametrize(
    ("mode", "extra", "flags"),
    [
        ("udp", "", ["-d", "--rfc5424"]),
        ("tcp", "    format octet_counting", ["-T", "--octet-count", "--rfc5424"]),
        ("tcp", "", ["-T", "--rfc5424"]),
        ("udp", "    parser syslog-rfc3164", ["-d", "--rfc3164"]),
    ],
)
async def test_logger_to_tcp_and_udp(tmp_path: Path, mode: str, extra: str, flags: list[str]) -> None:
    async with syslog(tmp_path, mode, extra) as run:
        port = str(run.source.bound_port)
        for i in range(3):
            run_logger("-n", "127.0.0.1", "-P", port, *flags, "-t", "batchjob", "-p", "user.err", f"job {i} failed")
        await run.wait_records(3)
    got = bodies(run)
    assert [b["message"] for b in got] == [f"job {i} failed" for i in range(3)]
    assert {(b["pri"], b["ident"]) for b in got} == {("11", "batchjob")}
    assert run.metric("kubetrail_errors_total") == 0


@needs_logger
@pytest.mark.parametrize(("mode", "flags"), [("unix_udp", ["-d"]), ("unix_tcp", ["-T"])])
async def test_logger_to_unix_sockets_with_the_local_rfc3164_parser(
    tmp_path: Path, mode: str, flags: list[str]
) -> None:
    path = tmp_path / "log.sock"
    async with syslog(tmp_path, mode, f"    path {path}\n    unix_perm 0666\n    source_address_key src") as run:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
        run_logger("-u", str(path), *flags, "--socket-errors=on", "-t", "cron", "-p", "daemon.info", "nightly run")
        await run.wait_records(1)
    body = bodies(run)[0]
    assert (body["pri"], body["ident"], body["message"]) == ("30", "cron", "nightly run")
    assert body["src"] == f"unix://{path}"
    assert not path.exists()


# --- bad input ---------------------------------------------------------------------------------


async def test_unparsable_messages_are_kept_under_log_and_counted(tmp_path: Path) -> None:
    async with syslog(tmp_path, "tcp", "    raw_message_key raw") as run:
        good = b"<14>1 2026-12-05T10:00:00.5Z h app - - - hello"
        await send_tcp(run.source.bound_port, b"not syslog at all\r\n\n" + good + b"\n")
        await run.wait_records(2)
    assert bodies(run)[0] == {"log": "not syslog at all", "raw": "not syslog at all"}
    second = bodies(run)[1]
    assert second["message"] == "hello" and second["raw"] == good.decode()
    assert run.sink.records[1].time_ns == 1_796_464_800_500_000_000
    assert run.metric("kubetrail_errors_total", type="unparsed") == 1


async def test_over_long_messages_are_skipped_and_the_connection_goes_on(tmp_path: Path) -> None:
    extra = "    buffer_chunk_size 1k\n    buffer_max_size 4k"
    async with syslog(tmp_path, "tcp", extra) as run:
        msg = b"<14>1 2026-12-05T10:00:00Z h app - - - "
        data = msg + b"x" * 10_000 + b"\n" + msg + b"after the long one\n" + msg + b"y" * 5000 + b"\n" + msg + b"end\n"
        await send_tcp(run.source.bound_port, data)
        await run.wait_records(2)
    assert [b["message"] for b in bodies(run)] == ["after the long one", "end"]
    assert run.metric("kubetrail_errors_total", type="too_long") == 2


async def test_octet_counting_skips_oversized_frames_and_closes_on_a_broken_count(tmp_path: Path) -> None:
    extra = "    format octet_counting\n    buffer_max_size 2k"
    async with syslog(tmp_path, "tcp", extra) as run:
        port = run.source.bound_port

        def frame(text: bytes) -> bytes:
            return str(len(text)).encode() + b" " + text

        msg = b"<14>1 2026-12-05T10:00:00Z h app - - - "
        # a message with a newline inside survives octet counting; a 3000-byte one is skipped
        data = frame(msg + b"line one\nline two") + frame(msg + b"z" * 3000) + frame(msg + b"third")
        await send_tcp(port, data)
        await run.wait_records(2)
        # a broken count: that connection is closed (the server answers nothing, closes)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"<14>1 2026-12-05T10:00:00Z h app - - - not counted\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        await send_tcp(port, frame(msg + b"still served"))
        await run.wait_records(3)
    assert [b["message"] for b in bodies(run)] == ["line one\nline two", "third", "still served"]
    assert run.metric("kubetrail_errors_total", type="too_long") == 1
    assert run.metric("kubetrail_errors_total", type="protocol_error") == 1


async def test_tcp_backpressure_under_mem_buf_limit_loses_nothing(tmp_path: Path) -> None:
    total = 50_000
    async with syslog(tmp_path, "tcp", "    mem_buf_limit 16k\n    buffer_chunk_size 4k") as run:
        sink = run.sink
        release = asyncio.Event()
        deliver = sink.write

        async def held(batch: Any) -> None:
            await release.wait()
            await deliver(batch)

        sink.write = held  # type: ignore[method-assign]
        _, writer = await asyncio.open_connection("127.0.0.1", run.source.bound_port)
        line = b"<14>1 2026-12-05T10:00:00Z h app - - - %d " + b"p" * 300 + b"\n"
        writer.write(b"".join(line % i for i in range(total)))  # 17 MB
        draining = asyncio.ensure_future(writer.drain())
        await asyncio.sleep(1.0)
        assert 0 < run.metric("kubetrail_records_in_total", kind="source") < 1000
        assert not draining.done()
        release.set()
        await asyncio.wait_for(draining, 30)
        writer.close()
        await run.wait_records(total, timeout=60)
    assert [int(b["message"].split()[0]) for b in bodies(run)] == list(range(total))


async def test_oversized_datagrams_are_cut_and_counted(tmp_path: Path) -> None:
    async with syslog(tmp_path, "udp", "    buffer_chunk_size 200\n    receive_buffer_size 1M") as run:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            msg = b"<14>1 2026-12-05T10:00:00Z h app - - - "
            sock.sendto(msg + b"w" * 1000, ("127.0.0.1", run.source.bound_port))
            sock.sendto(msg + b"small", ("127.0.0.1", run.source.bound_port))
        await run.wait_records(2)
    got = sorted((b["message"] for b in bodies(run)), key=len)
    assert got == ["small", "w" * (200 - len(msg))]
    assert run.metric("kubetrail_errors_total", type="truncated") == 1


async def test_a_user_parser_by_name_takes_precedence(tmp_path: Path) -> None:
    parsers = write(
        tmp_path / "parsers.conf",
        "[PARSER]\n    name syslog-rfc5424\n    format regex\n    regex ^<(?<pri>\\d+)>(?<rest>.*)$\n",
    )
    async with running(tmp_path, syslog_input("tcp"), service=f"    parsers_file {parsers}", ready="started") as run:
        await send_tcp(run.source.bound_port, b"<14>anything goes\n")
        await run.wait_records(1)
    assert bodies(run) == [{"pri": "14", "rest": "anything goes"}]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("    mode unix_udp", "needs 'path'"),
        ("    mode tcp\n    parser nope", "unknown parser 'nope'"),
        ("    mode udp\n    tls on\n    tls.crt_file /x\n    tls.key_file /y", "TLS needs a stream mode"),
        ("    mode tcp\n    format newline\n    frame octet_counting", "format and frame disagree"),
        ("    mode tcp\n    unix_perm rw", "not an octal file mode"),
    ],
)
def test_configuration_errors(tmp_path: Path, extra: str, message: str) -> None:
    conf = write(tmp_path / "c.conf", f"[INPUT]\n    name syslog\n{extra}\n[OUTPUT]\n    name stdout\n    match *\n")
    with pytest.raises(ConfigError, match=message):
        Pipeline(load_config(conf))


def test_default_parser_follows_the_mode(tmp_path: Path) -> None:
    conf = write(
        tmp_path / "c.conf",
        f"[INPUT]\n    name syslog\n    path {tmp_path / 's'}\n[INPUT]\n    name syslog\n    mode udp\n"
        "[OUTPUT]\n    name stdout\n    match *\n",
    )
    pipeline = Pipeline(load_config(conf))
    assert [c.instance.parser.name for c in pipeline.sources] == ["syslog-rfc3164-local", "syslog-rfc5424"]
