"""An output's client certificate and CA bundle rotated under a running kubetrail, against nginx
requiring client certificates (``ssl_verify_client on``).

nginx (Debian's ``nginx-light``, installed by ``scripts/setup``) terminates TLS, verifies the
client certificate against its ``ssl_client_certificate`` CA and passes the verified subject on
(``$ssl_client_s_dn``) to a recorder behind it (``test_secret_rotation.Recorder``), so every
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
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.files import written_lines
from tests.integration.kubetrail_proc import KubetrailProcess, wait_for
from tests.integration.test_secret_rotation import Recorder, append_lines
from tests.servers import free_port, port_open
from tests.servers.rsyslog import RsyslogServer, gtls_available, rsyslogd
from tests.unit.test_secrets import secret_volume
from tests.unit.test_tls_reload import Pki, pem

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cluster"))
from localcluster import pki

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


class Nginx:
    """nginx with TLS and client certificates required, in front of a :class:`Recorder`."""

    def __init__(self, work: Path, recorder: Recorder) -> None:
        self.work = work
        self.port = free_port()
        self.recorder = recorder
        self.proc: subprocess.Popen[bytes] | None = None

    def configure(self, serving: pki.KeyPair, client_ca: pki.KeyPair) -> None:
        serving.write(self.work / "server.crt", self.work / "server.key")
        (self.work / "client-ca.crt").write_text(Pki.ca_pem(client_ca))

    def start(self) -> None:
        w = self.work
        temp = "".join(
            f"{kind}_temp_path {w}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (w / "nginx.conf").write_text(
            f"""daemon off;
user root;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log info;
events {{}}
http {{
    access_log {w}/access.log;
    {temp}
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {w}/server.crt;
        ssl_certificate_key {w}/server.key;
        ssl_client_certificate {w}/client-ca.crt;
        ssl_verify_client on;
        location / {{
            proxy_set_header X-Remote-User $ssl_client_s_dn;
            proxy_pass http://127.0.0.1:{self.recorder.server_address[1]};
        }}
    }}
}}
"""
        )
        self.proc = subprocess.Popen(
            [NGINX, "-c", str(w / "nginx.conf"), "-p", str(w)],
            stderr=subprocess.STDOUT,
            stdout=(w / "stdout.log").open("wb"),
        )
        wait_for(lambda: port_open(self.port), 20, "nginx to listen")

    def reload(self) -> None:
        """SIGHUP: new workers with the new files; returns once the old worker has exited (it
        finishes the requests it has and closes kept-alive connections), so every later request
        meets the new configuration."""
        assert self.proc is not None
        error_log = self.work / "error.log"
        before = error_log.read_text().count("exited with code")
        self.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: error_log.read_text().count("exited with code") > before, 30, "nginx's old worker to exit")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


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
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (scripts/setup installs Debian's nginx-light)")
    recorder = Recorder()
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    work = tmp_path / "nginx"
    work.mkdir()
    certs = Pki()
    server = Nginx(work, recorder)
    server.configure(certs.server1, certs.ca1)
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


def kubetrail(tmp_path: Path, log: Path, port: int, volume: Path, metrics_port: int) -> KubetrailProcess:
    """The http output with its TLS files in ``volume``, tailing ``log``."""
    return KubetrailProcess(
        tmp_path / "kt",
        f"""[SERVICE]
    flush 0.2
    grace 5
    log_level info
    scheduler.base 0.2
    scheduler.cap 1
    http_server on
    http_listen 127.0.0.1
    http_port {metrics_port}
[INPUT]
    name tail
    path {log}
    parser json
    read_from_head on
    refresh_interval 1
[OUTPUT]
    name http
    match *
    host 127.0.0.1
    port {port}
    uri /ingest
    format json_lines
    tls on
    tls.ca_file {volume}/ca.crt
    tls.crt_file {volume}/tls.crt
    tls.key_file {volume}/tls.key
""",
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

    def delivered(total: int) -> bool:
        with recorder.lock:
            return len(recorder.received) >= total

    try:
        append_lines(log, 0, 200)
        wait_for(lambda: delivered(200), 60, "the first 200 records as alice")
        # The rotation: nginx moves to CA 2 (its serving certificate and the clients it
        # trusts), then the client's Secret follows, as two cert-manager Certificates would.
        server.configure(certs.server2, certs.ca2)
        server.reload()
        assert refused(server.port, certs.ca2, certs.alice, tmp_path), "alice must be refused by now"
        append_lines(log, 200, 100)  # sent while kubetrail still holds CA 1 and alice: retried
        time.sleep(1.5)
        secret_volume(volume, certs.secret(certs.ca2, certs.bob))
        append_lines(log, 300, 100)
        wait_for(lambda: delivered(400), 60, "200 more records as bob")
        # A key that does not match its certificate: bob's pair is kept, delivery goes on.
        bad = certs.secret(certs.ca2, certs.bob)
        bad["tls.key"] = pem(certs.carol)[1]
        secret_volume(volume, bad)
        time.sleep(1.5)
        append_lines(log, 400, 100)
        wait_for(lambda: delivered(500), 60, "100 more records with the last good pair")
        wait_for(lambda: metric(metrics_port, "kubetrail_secret_reload_errors_total", "tls.key_file") >= 1, 10, "count")
        assert metric(metrics_port, "kubetrail_secret_reloads_total", "tls.crt_file") == 1
        assert metric(metrics_port, "kubetrail_secret_reloads_total", "tls.ca_file") == 1
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    with recorder.lock:
        received = list(recorder.received)
    counts = Counter(record["n"] for _, record in received)
    assert sorted(counts) == list(range(500)) and set(counts.values()) == {1}, "every record exactly once"
    by_cn = {record["n"]: cn for cn, record in received}
    assert {by_cn[i] for i in range(200)} == {"CN=alice"}
    assert {by_cn[i] for i in range(200, 500)} == {"CN=bob"}
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

    def delivered(total: int) -> bool:
        with recorder.lock:
            return len(recorder.received) >= total

    try:
        append_lines(log, 0, 100)
        wait_for(lambda: delivered(100), 60, "100 records as alice")
        server.configure(certs.server1, certs.ca2)  # same serving certificate, only CA 2's clients
        server.reload()
        append_lines(log, 100, 100)
        wait_for(lambda: '" 400 ' in (server.work / "access.log").read_text(), 30, "nginx to refuse alice")
        time.sleep(2)
        with recorder.lock:
            assert len(recorder.received) == 100
        secret_volume(volume, certs.secret(certs.ca1, certs.bob))  # bob is from CA 2; nginx serves CA 1
        wait_for(lambda: delivered(200), 60, "the held records as bob")
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    with recorder.lock:
        received = list(recorder.received)
    counts = Counter(record["n"] for _, record in received)
    assert sorted(counts) == list(range(200)) and set(counts.values()) == {1}, "every record exactly once"
    assert {cn for cn, record in received if record["n"] >= 100} == {"CN=bob"}
    assert "refused the client certificate" in proc.log()


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
        f"""[SERVICE]
    flush 0.2
    grace 5
    log_level info
    scheduler.base 0.2
    scheduler.cap 1
[INPUT]
    name tail
    path {log}
    read_from_head on
    refresh_interval 1
[OUTPUT]
    name syslog
    match *
    host 127.0.0.1
    port {server.tls_port}
    mode tls
    syslog_format rfc5424
    syslog_message_key log
    tls on
    tls.vhost localhost
    tls.ca_file {volume}/ca.crt
    tls.crt_file {volume}/tls.crt
    tls.key_file {volume}/tls.key
""",
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
    counts = Counter(orjson.loads(m)["n"] for m in server.messages())
    assert sorted(counts) == list(range(200)) and set(counts.values()) == {1}, "every record exactly once"
    assert "TLS files changed" in proc.log()
