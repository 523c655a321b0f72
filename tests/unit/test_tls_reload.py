"""Outputs' TLS files that rotate (kubetrail/core/tls_files.py): the client certificate, key and CA
re-read when their Secret volume is swapped, checked at most once a second; bad files at start
(config errors naming the option) and later (the last good context kept, logged once, counted);
the HTTP outputs and the stream outputs presenting the new certificate on their next connection
to a real TLS server (Python's ``ssl``, client certificates required) while an open connection
keeps its own.

The volume is laid out as the kubelet writes a cert-manager Secret (``ca.crt``, ``tls.crt``,
``tls.key`` behind a ``..data`` symlink swapped atomically: ``test_secrets.secret_volume``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from multidict import CIMultiDict, CIMultiDictProxy

from kubetrail.core import secrets
from kubetrail.core.errors import ConfigError, PermanentError, RetryableError
from kubetrail.core.metrics import MetricsRegistry
from kubetrail.core.record import Batch, Record
from kubetrail.core.tls_files import ClientTls
from kubetrail.sinks.forward import ForwardSink
from kubetrail.sinks.gelf import GelfSink
from kubetrail.sinks.http import HttpOutputSink
from kubetrail.sinks.http_base import HttpResponse, check_status, client_tls
from kubetrail.sinks.kafka import KafkaSink
from kubetrail.sinks.loki import LokiSink
from kubetrail.sinks.stream_base import StreamConnection
from kubetrail.sinks.syslog import SyslogSink
from tests.fakes.http_server import Answer, ScriptedServer
from tests.unit.helpers import build
from tests.unit.test_secrets import secret_volume

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cluster"))
from localcluster import pki

LOGGER = "kubetrail.test.tls"


def pem(pair: pki.KeyPair) -> tuple[str, str]:
    """(certificate, key) as the text a Secret holds."""
    cert = pair.cert.public_bytes(serialization.Encoding.PEM).decode()
    key = pair.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return cert, key


class Pki:
    """Two CAs, each with a serving certificate for loopback and client certificates."""

    def __init__(self) -> None:
        self.ca1, self.ca2 = pki.make_ca("tls-reload-ca-1"), pki.make_ca("tls-reload-ca-2")
        self.server1, self.server2 = pki.serving_cert(self.ca1, "server-1"), pki.serving_cert(self.ca2, "server-2")
        self.alice = pki.issue(self.ca1, "alice", client=True)
        self.bob = pki.issue(self.ca2, "bob", client=True)
        self.carol = pki.issue(self.ca1, "carol", client=True)

    @staticmethod
    def ca_pem(*cas: pki.KeyPair) -> str:
        return "".join(pem(ca)[0] for ca in cas)

    def secret(self, ca: pki.KeyPair, client: pki.KeyPair) -> dict[str, str]:
        """A cert-manager Secret's keys."""
        cert, key = pem(client)
        return {"ca.crt": self.ca_pem(ca), "tls.crt": cert, "tls.key": key}


@pytest.fixture(scope="module")
def certs() -> Pki:
    return Pki()


def tls_options(volume: Path) -> dict[str, str]:
    return {
        "tls": "on",
        "tls.ca_file": str(volume / "ca.crt"),
        "tls.crt_file": str(volume / "tls.crt"),
        "tls.key_file": str(volume / "tls.key"),
    }


def after_check_interval() -> None:
    time.sleep(secrets.CHECK_INTERVAL + 0.05)


def bound(volume: Path) -> tuple[ClientTls, MetricsRegistry]:
    tls = client_tls(tls_options(volume))
    registry = MetricsRegistry()
    tls.bind(logging.getLogger(LOGGER), registry.component("http.0", "sink", "http"))
    return tls, registry


def sample(registry: MetricsRegistry, name: str, option: str) -> float:
    labels = {"component": "http.0", "kind": "sink", "plugin": "http", "option": option}
    return registry.registry.get_sample_value(name, labels) or 0.0


def data_file(volume: Path, key: str) -> Path:
    """The file behind a key in the current ``..data`` directory (to damage it in place)."""
    return volume / os.readlink(volume / "..data") / key


def touch_changed(path: Path, text: str) -> None:
    path.write_text(text)
    os.utime(path, ns=(time.time_ns(), time.time_ns()))


# -- the mechanism ----------------------------------------------------------------------------


def test_a_swapped_volume_gives_a_new_context_checked_at_most_once_a_second(tmp_path: Path, certs: Pki) -> None:
    volume = secret_volume(tmp_path / "tls", certs.secret(certs.ca1, certs.alice))
    tls, registry = bound(volume)
    first = tls.context()
    assert tls.context() is first
    secret_volume(volume, certs.secret(certs.ca2, certs.bob))
    assert tls.context() is first  # within the second: no stat at all
    after_check_interval()
    second = tls.context()
    assert second is not first and tls.version == 1
    # The new context trusts CA 2 (beside the system's CAs), no longer CA 1.
    names = {dict(x[0] for x in c["subject"]).get("commonName") for c in second.get_ca_certs()}
    assert "tls-reload-ca-2" in names and "tls-reload-ca-1" not in names
    for option in ("tls.ca_file", "tls.crt_file", "tls.key_file"):
        assert sample(registry, "kubetrail_secret_reloads_total", option) == 1
    # The kubelet writing the same data again (a new ..data directory): nothing rebuilt.
    secret_volume(volume, certs.secret(certs.ca2, certs.bob))
    after_check_interval()
    assert tls.context() is second and tls.version == 1


def test_only_the_changed_file_is_counted(tmp_path: Path, certs: Pki) -> None:
    volume = secret_volume(tmp_path / "tls", certs.secret(certs.ca1, certs.alice))
    tls, registry = bound(volume)
    secret_volume(volume, certs.secret(certs.ca1, certs.carol))  # same CA, new client certificate
    after_check_interval()
    tls.context()
    assert tls.version == 1
    assert sample(registry, "kubetrail_secret_reloads_total", "tls.crt_file") == 1
    assert sample(registry, "kubetrail_secret_reloads_total", "tls.ca_file") == 0


def encrypted_secret(certs: Pki, ca: pki.KeyPair, client: pki.KeyPair, password: str, written: str) -> dict[str, str]:
    """A Secret with the client key encrypted by ``password`` and ``written`` as its password key."""
    key = client.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password.encode()),
    ).decode()
    return certs.secret(ca, client) | {"tls.key": key, "key-password": written + "\n"}


def test_an_encrypted_key_rotates_with_its_password_file(tmp_path: Path, certs: Pki) -> None:
    """``tls.key_passwd ${file:...}``: the password file is watched with the key; a key whose
    password has not arrived yet keeps the last good context; both arrived, a new one."""
    volume = secret_volume(tmp_path / "tls", encrypted_secret(certs, certs.ca1, certs.alice, "pw-1", "pw-1"))
    passwd = secrets.parse_secret(f"${{file:{volume}/key-password}}", "tls.key_passwd")
    tls = client_tls(tls_options(volume) | {"tls.key_passwd": passwd})
    registry = MetricsRegistry()
    tls.bind(logging.getLogger(LOGGER), registry.component("http.0", "sink", "http"))
    first = tls.context()
    # Half of a rotation: bob's key, encrypted with the new password, beside the old password.
    secret_volume(volume, encrypted_secret(certs, certs.ca2, certs.bob, "pw-2", "pw-1"))
    after_check_interval()
    assert tls.context() is first
    assert sample(registry, "kubetrail_secret_reload_errors_total", "tls.key_file") == 1
    secret_volume(volume, encrypted_secret(certs, certs.ca2, certs.bob, "pw-2", "pw-2"))
    after_check_interval()
    second = tls.context()
    assert second is not first and tls.version == 1
    assert sample(registry, "kubetrail_secret_reloads_total", "tls.key_passwd") == 1
    names = {dict(x[0] for x in c["subject"]).get("commonName") for c in second.get_ca_certs()}
    assert "tls-reload-ca-2" in names


def test_a_wrong_or_unusable_key_password_at_start_is_a_config_error(tmp_path: Path, certs: Pki) -> None:
    volume = secret_volume(tmp_path / "tls", encrypted_secret(certs, certs.ca1, certs.alice, "pw-1", "wrong"))
    passwd = secrets.parse_secret(f"${{file:{volume}/key-password}}", "tls.key_passwd")
    with pytest.raises(ConfigError, match=r"no usable PEM private key \(or tls.key_passwd is wrong\)") as caught:
        client_tls(tls_options(volume) | {"tls.key_passwd": passwd})
    assert caught.value.key == "tls.key_file"
    two = secrets.parse_secret(f"${{file:{volume}/key-password}}${{file:{volume}/key-password}}", "tls.key_passwd")
    with pytest.raises(ConfigError, match="one file") as caught:
        client_tls(tls_options(volume) | {"tls.key_passwd": two})
    assert caught.value.key == "tls.key_passwd"


@pytest.mark.parametrize(
    ("damage", "option", "words"),
    [
        ("mismatched key", "tls.key_file", "does not match the certificate"),
        ("certificate not PEM", "tls.crt_file", "holds no PEM certificate"),
        ("key not PEM", "tls.key_file", "holds no usable PEM private key"),
        ("CA not PEM", "tls.ca_file", "cannot load CA certificates"),
        ("certificate missing", "tls.crt_file", "No such file"),
        ("key is a directory", "tls.key_file", "is a directory"),
    ],
)
def test_a_bad_file_later_keeps_the_last_good_context_logs_once_and_counts(
    tmp_path: Path, certs: Pki, caplog: pytest.LogCaptureFixture, damage: str, option: str, words: str
) -> None:
    volume = secret_volume(tmp_path / "tls", certs.secret(certs.ca1, certs.alice))
    tls, registry = bound(volume)
    good = tls.context()
    builds: list[int] = []
    build_context = tls._build
    tls._build = lambda: builds.append(1) or build_context()  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger=LOGGER)
    target = data_file(volume, {"tls.crt_file": "tls.crt", "tls.key_file": "tls.key", "tls.ca_file": "ca.crt"}[option])
    if damage == "mismatched key":
        touch_changed(target, pem(certs.bob)[1])
    elif damage == "certificate missing":
        target.unlink()
    elif damage == "key is a directory":
        target.unlink()
        target.mkdir()
    else:
        touch_changed(target, "-----BEGIN GARBAGE-----\nnot base64 at all\n")
    for _ in range(3):  # three checks, one problem: logged once, counted three times
        after_check_interval()
        assert tls.context() is good
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert option in message and words in message, message
    assert errors[0].__dict__["option"] == option
    assert errors[0].__dict__["path"] == str(volume / target.name)  # the path the config names
    assert sample(registry, "kubetrail_secret_reload_errors_total", option) == 3
    assert tls.version == 0
    assert len(builds) <= 1, "the same bad bytes are not built again every second"
    # Fixed by the next rotation: the new files are used and the recovery is logged.
    if target.is_dir():
        target.rmdir()  # (the kubelet would remove its old directory whatever it holds)
    secret_volume(volume, certs.secret(certs.ca2, certs.bob))
    after_check_interval()
    assert tls.context() is not good and tls.version == 1
    assert any("usable again" in r.getMessage() for r in caplog.records)


def test_files_rotated_one_by_one_are_used_once_the_pair_matches(tmp_path: Path, certs: Pki) -> None:
    """Files outside a Secret volume, rewritten in place one after the other: the certificate
    alone does not match the old key (kept: the old pair), the key following it completes the pair."""
    volume = secret_volume(tmp_path / "tls", certs.secret(certs.ca1, certs.alice))
    tls = client_tls(tls_options(volume))
    target = data_file(volume, "tls.key")
    cert, key = pem(certs.carol)
    touch_changed(data_file(volume, "tls.crt"), cert)  # the certificate first: the key does not match yet
    after_check_interval()
    old = tls.context()
    assert tls.version == 0
    target.write_text(key)
    after_check_interval()
    assert tls.context() is not old and tls.version == 1


@pytest.mark.parametrize(
    ("damage", "option"),
    [("mismatched key", "tls.key_file"), ("certificate not PEM", "tls.crt_file"), ("CA not PEM", "tls.ca_file")],
)
def test_a_bad_file_at_start_is_a_config_error_naming_the_option(
    tmp_path: Path, certs: Pki, damage: str, option: str
) -> None:
    data = certs.secret(certs.ca1, certs.alice)
    if damage == "mismatched key":
        data["tls.key"] = pem(certs.bob)[1]
    elif damage == "certificate not PEM":
        data["tls.crt"] = "hello\n"
    else:
        data["ca.crt"] = "hello\n"
    volume = secret_volume(tmp_path / "tls", data)
    for plugin, extra in (
        (HttpOutputSink, {}),
        (ForwardSink, {}),
        (SyslogSink, {"mode": "tls"}),
        (GelfSink, {"mode": "tls"}),
    ):
        with pytest.raises(ConfigError) as info:
            build(plugin, host="127.0.0.1", port="1", **extra, **tls_options(volume))
        assert info.value.key == option, (plugin, str(info.value))
        assert str(volume) in str(info.value)


# -- against a real TLS server ------------------------------------------------------------------


def server_context(certs: Pki, serving: pki.KeyPair, *client_cas: pki.KeyPair, tmp: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    serving.write(tmp / f"{id(serving)}.crt", tmp / f"{id(serving)}.key")
    ctx.load_cert_chain(tmp / f"{id(serving)}.crt", tmp / f"{id(serving)}.key")
    ctx.load_verify_locations(cadata=Pki.ca_pem(*client_cas))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def common_name(transport: Any) -> str:
    cert = transport.get_extra_info("peercert")
    return dict(x[0] for x in cert["subject"])["commonName"]  # type: ignore[no-any-return]


class Receiver:
    """An aiohttp HTTPS server requiring client certificates: records (client CN, client port) per request."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int]] = []  # (CN, client port, records)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, ctx: ssl.SSLContext) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        assert request.transport is not None
        peer = request.transport.get_extra_info("peername")[1]
        self.seen.append((common_name(request.transport), peer, len(body.splitlines())))
        return web.Response(status=204)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def records(start: int, n: int) -> Batch:
    return Batch(
        "t", [Record("app.log", 1_700_000_000_000_000_000 + i, body_={"n": i}) for i in range(start, start + n)]
    )


async def test_http_output_presents_the_rotated_certificate_on_new_connections(tmp_path: Path, certs: Pki) -> None:
    volume = secret_volume(tmp_path / "tls", certs.secret(certs.ca1, certs.alice))
    receiver = await Receiver().start(server_context(certs, certs.server1, certs.ca1, certs.ca2, tmp=tmp_path))
    out = build(HttpOutputSink, host="127.0.0.1", port=str(receiver.port), format="json_lines", **tls_options(volume))
    try:
        await out.write(records(0, 5))
        await out.write(records(5, 5))
        # The same TLS context: the kept-alive connection is reused.
        assert [(cn, n) for cn, _, n in receiver.seen] == [("alice", 5), ("alice", 5)]
        assert receiver.seen[0][1] == receiver.seen[1][1]
        secret_volume(volume, certs.secret(certs.ca1, certs.carol))
        after_check_interval()
        await out.write(records(10, 5))
        assert receiver.seen[-1][0] == "carol"
        assert receiver.seen[-1][1] != receiver.seen[0][1]  # a new connection for the new context
    finally:
        await out.close()
        await receiver.stop()


async def test_http_output_follows_a_rotated_ca_bundle(tmp_path: Path, certs: Pki) -> None:
    """The server moves to a certificate from CA 2: rejected until the CA bundle rotates too."""
    volume = secret_volume(tmp_path / "tls", certs.secret(certs.ca1, certs.alice))
    receiver = await Receiver().start(server_context(certs, certs.server2, certs.ca1, certs.ca2, tmp=tmp_path))
    out = build(HttpOutputSink, host="127.0.0.1", port=str(receiver.port), **tls_options(volume))
    try:
        with pytest.raises(Exception, match="TLS certificate rejected"):
            await out.write(records(0, 1))
        secret_volume(volume, certs.secret(certs.ca2, certs.bob))
        after_check_interval()
        await out.write(records(0, 1))
        assert [cn for cn, _, _ in receiver.seen] == ["bob"]
    finally:
        await out.close()
        await receiver.stop()


async def test_stream_connection_keeps_an_open_session_and_reconnects_with_the_new_certificate(
    tmp_path: Path, certs: Pki
) -> None:
    volume = secret_volume(tmp_path / "tls", certs.secret(certs.ca1, certs.alice))
    lines: list[tuple[str, bytes]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = common_name(writer.transport)
        while line := await reader.readline():
            lines.append((name, line.strip()))
        writer.close()

    server = await asyncio.start_server(
        handle, "127.0.0.1", 0, ssl=server_context(certs, certs.server1, certs.ca1, tmp=tmp_path)
    )
    port = server.sockets[0].getsockname()[1]
    conn = StreamConnection("127.0.0.1", port, client_tls(tls_options(volume)), None, 5.0, 5.0)
    try:
        assert await conn.ensure()
        await conn.send(b"one\n")
        secret_volume(volume, certs.secret(certs.ca1, certs.carol))
        after_check_interval()
        assert not await conn.ensure()  # still usable: the open session is kept
        await conn.send(b"two\n")
        await conn.close()
        assert await conn.ensure()  # a reconnect: the new certificate
        await conn.send(b"three\n")
        await conn.close()
        deadline = time.monotonic() + 5
        while len(lines) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert lines == [("alice", b"one"), ("alice", b"two"), ("carol", b"three")]
    finally:
        await conn.close()
        server.close()
        await server.wait_closed()


# -- kafka: librdkafka cannot reload ------------------------------------------------------------


def test_kafka_warns_that_a_rotated_ssl_location_is_not_used_until_restart(
    tmp_path: Path, certs: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """librdkafka reads ssl.*.location once (at client creation); the rotation is named in a warning."""
    volume = secret_volume(tmp_path / "tls", certs.secret(certs.ca1, certs.alice))
    options = {
        "rdkafka.security.protocol": "ssl",
        "rdkafka.ssl.ca.location": str(volume / "ca.crt"),
        "rdkafka.ssl.certificate.location": str(volume / "tls.crt"),
        "rdkafka.ssl.key.location": str(volume / "tls.key"),
    }
    sink = build(KafkaSink, brokers="127.0.0.1:1", **{k.replace(".", "__"): v for k, v in options.items()})
    caplog.set_level(logging.WARNING, logger="kubetrail.test")
    try:
        sink.sasl.apply(sink.producer)
        assert sink.sasl.ssl_files.check() == []
        secret_volume(volume, certs.secret(certs.ca1, certs.carol))
        after_check_interval()
        sink.sasl.apply(sink.producer)  # the poll loop's call
        after_check_interval()
        sink.sasl.apply(sink.producer)  # no new change: no new warning
        warnings = [r for r in caplog.records if "cannot load it again" in r.getMessage()]
        assert sorted(r.__dict__["option"] for r in warnings) == [
            "rdkafka.ssl.ca.location",
            "rdkafka.ssl.certificate.location",
            "rdkafka.ssl.key.location",
        ]
        assert all(r.__dict__["path"].startswith(str(volume)) for r in warnings)
    finally:
        sink.producer.flush(0)


def test_kafka_refuses_a_bad_ssl_location_at_start(tmp_path: Path, certs: Pki) -> None:
    data = certs.secret(certs.ca1, certs.alice)
    data["tls.key"] = pem(certs.bob)[1]
    volume = secret_volume(tmp_path / "tls", data)
    with pytest.raises(ConfigError, match="librdkafka refused the configuration"):
        build(
            KafkaSink,
            brokers="127.0.0.1:1",
            rdkafka__security__protocol="ssl",
            rdkafka__ssl__certificate__location=str(volume / "tls.crt"),
            rdkafka__ssl__key__location=str(volume / "tls.key"),
        )


@pytest.mark.parametrize(
    ("body", "retried"),
    [
        (b"<html><head><title>400 The SSL certificate error</title></head></html>", True),
        (b"<html><head><title>400 No required SSL certificate was sent</title></head></html>", True),
        (b'{"error": "bad json"}', False),
    ],
)
def test_nginx_400_for_a_refused_client_certificate_is_retried_not_rejected(body: bytes, retried: bool) -> None:
    response = HttpResponse("POST", "https://es:9200/_bulk", 400, "Bad Request", CIMultiDictProxy(CIMultiDict()), body)
    with pytest.raises(RetryableError if retried else PermanentError) as info:
        check_status(response)
    assert ("refused the client certificate" in str(info.value)) == retried


async def test_loki_reads_nginx_certificate_400_as_a_refused_client_not_bad_entries() -> None:
    """Loki's own 400 names refused entries (isolated, dead-lettered); nginx's (Loki's gateway
    is often nginx) refuses the client certificate: the whole push is retried, nothing rejected."""
    server = await ScriptedServer().start()
    server.default = Answer(400, b"<html><title>400 The SSL certificate error</title></html>", "text/html")
    out = build(LokiSink, host="127.0.0.1", port=str(server.port))
    try:
        with pytest.raises(RetryableError, match="refused the client certificate"):
            await out.write(records(0, 8))
        assert len(server.requests) == 1  # no halving into single entries
    finally:
        await out.close()
        await server.stop()


def test_a_ca_path_directory_is_watched_file_by_file(tmp_path: Path, certs: Pki) -> None:
    """tls.ca_path: a file added to (or changed in) the directory rebuilds the context."""
    directory = tmp_path / "cas"
    directory.mkdir()
    (directory / "ca1.pem").write_text(Pki.ca_pem(certs.ca1))
    tls = client_tls({"tls": "on", "tls.ca_path": str(directory)})
    registry = MetricsRegistry()
    tls.bind(logging.getLogger(LOGGER), registry.component("http.0", "sink", "http"))
    first = tls.context()
    after_check_interval()
    assert tls.context() is first
    (directory / "ca2.pem").write_text(Pki.ca_pem(certs.ca2))
    after_check_interval()
    assert tls.context() is not first and tls.version == 1
    assert sample(registry, "kubetrail_secret_reloads_total", "tls.ca_path") == 1
