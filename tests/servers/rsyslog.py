"""A real rsyslogd (Debian's package) for the syslog sink's tests, on free unprivileged ports.

It listens with imtcp (plain, and TLS through the gtls netstream driver when the
``rsyslog-gnutls`` package is installed) and imudp, and writes every message it parsed as one
JSON line (rsyslog's own ``jsonf`` template) with the fields it extracted: priority, facility,
severity, version, timestamp, hostname, app-name, procid, msgid, structured data and message.
Tests compare those with what the sink sent, so the check is rsyslog's parser, not ours.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.files import written_lines
from tests.servers import ServerProcess, free_port, port_open, udp_bound
from tests.timing import scaled

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cluster"))
from localcluster import pki

GTLS_MODULE = Path("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so")

_TEMPLATE = """
template(name="fields" type="list" option.jsonf="on") {
  property(outname="pri" name="pri" format="jsonf")
  property(outname="facility" name="syslogfacility" format="jsonf")
  property(outname="severity" name="syslogseverity" format="jsonf")
  property(outname="version" name="protocol-version" format="jsonf")
  property(outname="timestamp" name="timereported" dateFormat="rfc3339" format="jsonf")
  property(outname="hostname" name="hostname" format="jsonf")
  property(outname="appname" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="sd" name="structured-data" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
  property(outname="input" name="inputname" format="jsonf")
}
"""


def rsyslogd() -> str | None:
    return shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd" if os.access("/usr/sbin/rsyslogd", os.X_OK) else None)


def gtls_available() -> bool:
    return GTLS_MODULE.exists() or any(Path("/usr/lib").rglob("lmnsd_gtls.so"))


def version() -> str:
    binary = rsyslogd()
    if binary is None:
        return "not installed"
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=30).stdout
    return out.split("\n", 1)[0].split(" compiled")[0].strip()


@dataclass
class RsyslogServer(ServerProcess):
    """rsyslogd on its ports; restartable on the same ports, and what it wrote stays across
    :meth:`stop`. Not starting fails the test (RuntimeError): the fixture skips only when rsyslog
    is not installed at all."""

    workdir: Path
    tcp_port: int = field(default_factory=free_port)
    udp_port: int = field(default_factory=lambda: free_port(socket.SOCK_DGRAM))
    tls_port: int | None = None
    ca_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    name = "rsyslogd"
    start_error = RuntimeError
    stop_timeout = 20.0  # SIGTERM: rsyslog writes out its queue first

    @property
    def output(self) -> Path:
        return self.workdir / "received.jsonl"

    @property  # type: ignore[override]
    def log_path(self) -> Path:
        return self.workdir / "rsyslogd.log"

    def _config(self) -> str:
        tls_globals = ""
        tls_input = ""
        if self.tls_port is not None:
            ca = pki.make_ca("rsyslog-test-ca")
            server = pki.serving_cert(ca, "localhost")
            self.ca_file = self.workdir / "ca.crt"
            pki.write_cert(self.ca_file, ca.cert)
            server.write(self.workdir / "server.crt", self.workdir / "server.key")
            tls_globals = (
                f' DefaultNetstreamDriverCAFile="{self.ca_file}"'
                f' DefaultNetstreamDriverCertFile="{self.workdir / "server.crt"}"'
                f' DefaultNetstreamDriverKeyFile="{self.workdir / "server.key"}"'
            )
            tls_input = (
                f'input(type="imtcp" port="{self.tls_port}" name="tls" streamDriver.name="gtls"'
                ' streamDriver.mode="1" streamDriver.authMode="anon")\n'
            )
        return (
            f'global(workDirectory="{self.workdir}" maxMessageSize="64k"'
            f' parser.escapeControlCharactersOnReceive="off"{tls_globals})\n'
            'module(load="imtcp")\nmodule(load="imudp")\n'
            f'input(type="imtcp" port="{self.tcp_port}" name="tcp")\n'
            f'input(type="imudp" port="{self.udp_port}" name="udp")\n'
            f"{tls_input}{_TEMPLATE}"
            f'action(type="omfile" file="{self.output}" template="fields")\n'
        )

    def start(self, tls: bool = False, timeout: float = 30.0) -> None:
        binary = rsyslogd()
        assert binary is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        if tls and self.tls_port is None:
            self.tls_port = free_port()
        conf = self.workdir / "rsyslog.conf"
        conf.write_text(self._config())
        ports = [self.tcp_port] + ([self.tls_port] if self.tls_port else [])
        self.start_attempts(
            lambda attempt: self.spawn([binary, "-n", "-f", str(conf), "-i", str(self.workdir / "rsyslogd.pid")]),
            lambda: True if all(port_open(port) for port in ports) and udp_bound(self.udp_port) else None,
            timeout,
            interval=0.05,
            attempts=1,
        )

    def stop(self) -> None:
        self.stop_process()

    def records(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in written_lines(self.output) if line.strip()]

    def wait_for(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """At least ``count`` messages written out (rsyslog writes asynchronously)."""
        deadline = time.monotonic() + scaled(timeout)  # a loaded machine: see tests/timing.py
        while True:
            got = self.records()
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.05)
