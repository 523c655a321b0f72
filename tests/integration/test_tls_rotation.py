"""An output's client certificate and CA bundle rotated under a running kubetrail, against nginx
requiring client certificates (``ssl_verify_client on``).

nginx (Debian's ``nginx-light``, installed by ``scripts/setup``) terminates TLS, verifies the
client certificate against its ``ssl_client_certificate`` CA and passes the verified subject on
(``$ssl_client_s_dn``) to a recorder behind it (``rotation.Recorder``), so every
record is counted by the certificate that delivered it. The verification is nginx's (OpenSSL).

The client's files are a cert-manager Secret (``ca.crt``, ``tls.crt``, ``tls.key``) in a
Kubernetes-style volume (``..data`` swap). The rotation moves both sides to a new CA: nginx is
reloaded with a serving certificate from CA 2 and trusts only CA 2's clients (alice, from CA 1,
is refused from then on), and the volume swaps to CA 2's bundle and bob's certificate. Records
are delivered exactly once across it, the later ones as bob; a key that does not match its
certificate put in the volume keeps bob's pair (logged naming ``tls.key_file``, counted) and
delivery goes on.

The ``syslog`` output (a stream output) is checked against rsyslog's gtls input requiring a client
certificate by name (``x509/name``, ``permittedPeer``): restarted on a new CA accepting only bob,
kubetrail's reconnects fail until the Secret rotates, then every message arrives once.
"""

from __future__ import annotations

import os
import ssl
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.files import written_lines
from tests.integration.kubetrail_proc import KubetrailProcess, wait_for
from tests.integration.rotation import (
    QUICK_RETRIES,
    Nginx,
    Recorder,
    append_lines,
    assert_exactly_once,
    http_output,
    output_section,
    require_nginx,
    service,
    stops_cleanly,
    tail_input,
)
from tests.servers import free_port
from tests.servers.rsyslog import RsyslogServer, gtls_available, rsyslogd
from tests.unit.test_secrets import secret_volume
from tests.unit.test_tls_reload import Pki, encrypted_secret, pem

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cluster"))
from localcluster import pki


def tls_nginx(work: Path, recorder: Recorder) -> Nginx:
    """nginx with TLS and client certificates required (the files :func:`configure` writes),
    passing the verified subject on."""
    return Nginx(
        work,
        recorder,
        "$ssl_client_s_dn",
        server=f"""ssl_certificate {work}/server.crt;
        ssl_certificate_key {work}/server.key;
        ssl_client_certificate {work}/client-ca.crt;
        ssl_verify_client on;""",
        ssl=True,
    )


def configure(server: Nginx, serving: pki.KeyPair, client_ca: pki.KeyPair) -> None:
    """nginx's serving certificate and the CA whose clients it accepts (read at start or reload)."""
    serving.write(server.work / "server.crt", server.work / "server.key")
    (server.work / "client-ca.crt").write_text(Pki.ca_pem(client_ca))


def refused(port: int, ca: pki.KeyPair, client: pki.KeyPair, tmp: Path) -> bool:
    """Whether nginx refuses a request made with ``client``'s certificate (trusting ``ca``)."""
    client.write(tmp / "probe.crt", tmp / "probe.key")
    ctx = ssl.create_default_context(cadata=Pki.ca_pem(ca))
    ctx.load_cert_chain(tmp / "probe.crt", tmp / "probe.key")
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/probe", b"{}", timeout=10, context=ctx):
            return False
    except urllib.error.HTTPError as exc:
        return exc.code == 400  # nginx answers a certificate it does not verify with 400
    except (ssl.SSLError, OSError):
        return True


@pytest.fixture
def nginx_tls(tmp_path: Path) -> Iterator[tuple[Nginx, Recorder, Pki]]:
    require_nginx()
    recorder = Recorder().serve_in_thread()
    work = tmp_path / "nginx"
    work.mkdir()
    certs = Pki()
    server = tls_nginx(work, recorder)
    configure(server, certs.server1, certs.ca1)
    try:
        server.start()
        yield server, recorder, certs
    finally:
        server.stop()
        recorder.shutdown()


def metric(port: int, name: str, option: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/metrics/prometheus", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'option="{option}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def secret_tls_files(volume: Path) -> tuple[str, ...]:
    """An output's CA bundle, certificate and key from the cert-manager Secret in ``volume``."""
    return (f"tls.ca_file {volume}/ca.crt", f"tls.crt_file {volume}/tls.crt", f"tls.key_file {volume}/tls.key")


def kubetrail(tmp_path: Path, log: Path, port: int, volume: Path, metrics_port: int, *tls: str) -> KubetrailProcess:
    """The http output with its TLS files in ``volume`` (and the ``tls`` options), tailing ``log``."""
    return KubetrailProcess(
        tmp_path / "kt",
        service(*QUICK_RETRIES, "http_server on", "http_listen 127.0.0.1", f"http_port {metrics_port}")
        + tail_input(log, "parser json")
        + http_output(
            port,
            "tls on",
            *secret_tls_files(volume),
            *tls,
        ),
    ).start()


def test_http_output_client_certificate_and_ca_rotate_exactly_once(
    tmp_path: Path, nginx_tls: tuple[Nginx, Recorder, Pki]
) -> None:
    server, recorder, certs = nginx_tls
    volume = secret_volume(tmp_path / "secret", certs.secret(certs.ca1, certs.alice))
    log = tmp_path / "in.log"
    log.touch()
    metrics_port = free_port()
    proc = kubetrail(tmp_path, log, server.port, volume, metrics_port)

    with stops_cleanly(proc):
        append_lines(log, 0, 200)
        wait_for(lambda: recorder.count() >= 200, 60, "the first 200 records as alice")
        # The rotation: nginx moves to CA 2 (its serving certificate and the clients it
        # trusts), then the client's Secret follows, as two cert-manager Certificates would.
        configure(server, certs.server2, certs.ca2)
        server.reload()
        assert refused(server.port, certs.ca2, certs.alice, tmp_path), "alice must be refused by now"
        append_lines(log, 200, 100)  # sent while kubetrail still holds CA 1 and alice: retried
        time.sleep(1.5)
        secret_volume(volume, certs.secret(certs.ca2, certs.bob))
        append_lines(log, 300, 100)
        wait_for(lambda: recorder.count() >= 400, 60, "200 more records as bob")
        # A key that does not match its certificate: bob's pair is kept, delivery goes on.
        bad = certs.secret(certs.ca2, certs.bob)
        bad["tls.key"] = pem(certs.carol)[1]
        secret_volume(volume, bad)
        time.sleep(1.5)
        append_lines(log, 400, 100)
        wait_for(lambda: recorder.count() >= 500, 60, "100 more records with the last good pair")
        wait_for(lambda: metric(metrics_port, "kubetrail_secret_reload_errors_total", "tls.key_file") >= 1, 10, "count")
        assert metric(metrics_port, "kubetrail_secret_reloads_total", "tls.crt_file") == 1
        assert metric(metrics_port, "kubetrail_secret_reloads_total", "tls.ca_file") == 1
    recorder.assert_rotated_once(500, "CN=alice", "CN=bob")
    output = proc.log()
    assert "TLS files changed" in output
    assert "cannot reload a TLS file" in output and "tls.key_file" in output and "does not match" in output
    assert output.count("cannot reload a TLS file") == 1, "logged once"
    assert os.path.exists(server.work / "access.log")


def test_a_client_certificate_nginx_refuses_with_400_is_held_back_until_it_rotates(
    tmp_path: Path, nginx_tls: tuple[Nginx, Recorder, Pki]
) -> None:
    """nginx trusts a new client CA before the client's certificate rotates: it answers 400 ("The
    SSL certificate error") after the handshake. That refuses the client, not the records: they
    are retried (not rejected) and delivered once the certificate rotates."""
    server, recorder, certs = nginx_tls
    volume = secret_volume(tmp_path / "secret", certs.secret(certs.ca1, certs.alice))
    log = tmp_path / "in.log"
    log.touch()
    proc = kubetrail(tmp_path, log, server.port, volume, free_port())

    with stops_cleanly(proc):
        append_lines(log, 0, 100)
        wait_for(lambda: recorder.count() >= 100, 60, "100 records as alice")
        configure(server, certs.server1, certs.ca2)  # same serving certificate, only CA 2's clients
        server.reload()
        append_lines(log, 100, 100)
        wait_for(lambda: '" 400 ' in (server.work / "access.log").read_text(), 30, "nginx to refuse alice")
        time.sleep(2)
        assert recorder.count() == 100
        secret_volume(volume, certs.secret(certs.ca1, certs.bob))  # bob is from CA 2; nginx serves CA 1
        wait_for(lambda: recorder.count() >= 200, 60, "the held records as bob")
    received = recorder.records()
    assert_exactly_once((record["n"] for _, record in received), 200)
    assert {cn for cn, record in received if record["n"] >= 100} == {"CN=bob"}
    assert "refused the client certificate" in proc.log()


def test_an_encrypted_key_and_its_password_file_rotate_together_exactly_once(
    tmp_path: Path, nginx_tls: tuple[Nginx, Recorder, Pki]
) -> None:
    """``tls.key_passwd ${file:...}``: the new key arrives before its password (two Secrets, or
    one written twice); until both are there the old pair is used (nginx refuses it by then, so
    the records wait), then every record is delivered once as the new certificate."""
    server, recorder, certs = nginx_tls
    volume = secret_volume(tmp_path / "secret", encrypted_secret(certs, certs.ca1, certs.alice, "pw-1", "pw-1"))
    log = tmp_path / "in.log"
    log.touch()
    metrics_port = free_port()
    passwd = f"tls.key_passwd ${{file:{volume}/key-password}}"
    proc = kubetrail(tmp_path, log, server.port, volume, metrics_port, passwd)

    with stops_cleanly(proc):
        append_lines(log, 0, 100)
        wait_for(lambda: recorder.count() >= 100, 60, "100 records as alice")
        configure(server, certs.server2, certs.ca2)
        server.reload()
        # The new key, encrypted with a password that is not in the volume yet.
        secret_volume(volume, encrypted_secret(certs, certs.ca2, certs.bob, "pw-2", "pw-1"))
        append_lines(log, 100, 100)
        wait_for(lambda: metric(metrics_port, "kubetrail_secret_reload_errors_total", "tls.key_file") >= 1, 30, "count")
        time.sleep(1.5)
        assert recorder.count() == 100  # alice is refused and bob's key does not open yet: held
        secret_volume(volume, encrypted_secret(certs, certs.ca2, certs.bob, "pw-2", "pw-2"))
        wait_for(lambda: recorder.count() >= 200, 60, "the held records as bob")
        assert metric(metrics_port, "kubetrail_secret_reloads_total", "tls.key_passwd") == 1
    recorder.assert_rotated_once(200, "CN=alice", "CN=bob", switch=100)
    assert "tls.key_passwd is wrong" in proc.log()


@dataclass
class MutualTlsRsyslog(RsyslogServer):
    """rsyslog's TLS input (gtls) requiring a client certificate from ``client_ca`` whose name is
    ``peer`` (``authMode="x509/name"``, ``permittedPeer``): the identity check is rsyslog's."""

    serving: pki.KeyPair | None = None
    client_ca: pki.KeyPair | None = None
    peer: str = ""

    def _config(self) -> str:
        assert self.serving is not None and self.client_ca is not None and self.tls_port is not None
        self.serving.write(self.workdir / "server.crt", self.workdir / "server.key")
        (self.workdir / "client-ca.crt").write_text(Pki.ca_pem(self.client_ca))
        return (
            f'global(workDirectory="{self.workdir}" maxMessageSize="64k"'
            f' DefaultNetstreamDriverCAFile="{self.workdir / "client-ca.crt"}"'
            f' DefaultNetstreamDriverCertFile="{self.workdir / "server.crt"}"'
            f' DefaultNetstreamDriverKeyFile="{self.workdir / "server.key"}")\n'
            'module(load="imtcp")\nmodule(load="imudp")\n'
            f'input(type="imtcp" port="{self.tcp_port}" name="tcp")\n'
            f'input(type="imudp" port="{self.udp_port}" name="udp")\n'
            f'input(type="imtcp" port="{self.tls_port}" name="tls" streamDriver.name="gtls"'
            f' streamDriver.mode="1" streamDriver.authMode="x509/name" permittedPeer=["{self.peer}"])\n'
            'template(name="msg" type="string" string="%msg%\\n")\n'
            f'action(type="omfile" file="{self.output}" template="msg")\n'
        )

    def messages(self) -> list[str]:
        return [line.strip() for line in written_lines(self.output) if line.strip()]


@pytest.mark.skipif(rsyslogd() is None or not gtls_available(), reason="rsyslog + rsyslog-gnutls (scripts/setup)")
def test_syslog_output_reconnects_with_the_rotated_certificate_exactly_once(tmp_path: Path) -> None:
    certs = Pki()
    server = MutualTlsRsyslog(tmp_path / "rsyslog", serving=certs.server1, client_ca=certs.ca1, peer="alice")
    volume = secret_volume(tmp_path / "secret", certs.secret(certs.ca1, certs.alice))
    log = tmp_path / "in.log"
    log.touch()
    server.start(tls=True)
    proc = KubetrailProcess(
        tmp_path / "kt",
        service(*QUICK_RETRIES)
        + tail_input(log)
        + output_section(
            "syslog",
            "host 127.0.0.1",
            f"port {server.tls_port}",
            "mode tls",
            "syslog_format rfc5424",
            "syslog_message_key log",
            "tls on",
            "tls.vhost localhost",
            *secret_tls_files(volume),
        ),
    ).start()

    def received(total: int) -> bool:
        return len(server.messages()) >= total

    try:
        append_lines(log, 0, 100)
        wait_for(lambda: received(100), 60, "100 messages as alice")
        # rsyslog moves to CA 2 and accepts only bob; kubetrail's connection is closed by the
        # restart and its reconnects fail (it trusts CA 1) until the Secret rotates.
        server.stop()
        server.serving, server.client_ca, server.peer = certs.server2, certs.ca2, "bob"
        server.start(tls=True)
        append_lines(log, 100, 100)
        time.sleep(2)
        assert len(server.messages()) == 100
        secret_volume(volume, certs.secret(certs.ca2, certs.bob))
        wait_for(lambda: received(200), 60, "the held messages as bob")
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
        server.stop()
    assert_exactly_once((orjson.loads(m)["n"] for m in server.messages()), 200)
    assert "TLS files changed" in proc.log()
