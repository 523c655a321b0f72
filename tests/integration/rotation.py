"""What the credential and TLS rotation tests share: nginx in front of a recorder, kubetrail's config
sections, the records appended to its input and counted back by number and identity.

Used by test_secret_rotation.py (basic auth), test_tls_rotation.py (client certificates),
test_kafka_secret_rotation.py and bench/bench_outage.py (the http output section). nginx is
Debian's ``nginx-light`` (``scripts/setup``); a test that needs it skips without it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson

from tests import required
from tests.integration.kubetrail_proc import KubetrailProcess, wait_for
from tests.servers import free_port, port_open

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def require_nginx() -> None:
    if not Path(NGINX).exists():
        required.unavailable("nginx is not installed (scripts/setup installs Debian's nginx-light)")


class Recorder(ThreadingHTTPServer):
    """Stores each JSON-lines body with the identity nginx put in ``X-Remote-User``."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def serve_in_thread(self) -> Recorder:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def count(self) -> int:
        with self.lock:
            return len(self.received)

    def records(self) -> list[tuple[str, dict[str, Any]]]:
        """(identity, record) of everything received so far, a copy."""
        with self.lock:
            return list(self.received)

    def assert_rotated_once(self, total: int, before: str, after: str, switch: int = 200) -> None:
        """Records ``0 .. total - 1`` each received once, those below ``switch`` delivered as
        identity ``before`` and the rest as ``after``."""
        received = self.records()
        assert_exactly_once((record["n"] for _, record in received), total)
        by_identity = {record["n"]: identity for identity, record in received}
        assert {by_identity[i] for i in range(switch)} == {before}
        assert {by_identity[i] for i in range(switch, total)} == {after}


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


class Nginx:
    """nginx on a free port proxying to a :class:`Recorder`, passing ``remote_user`` (an nginx
    variable: who the server authenticated) as ``X-Remote-User``, or to another server on
    ``upstream`` (its port). ``server`` and ``location`` are extra directives (authentication,
    TLS) for the ``server`` and ``location /`` blocks."""

    def __init__(
        self,
        work: Path,
        recorder: Recorder | None,
        remote_user: str,
        server: str = "",
        location: str = "",
        ssl: bool = False,
        upstream: int | None = None,
    ) -> None:
        self.work = work
        self.port = free_port()
        self.recorder = recorder
        self.upstream = upstream if upstream is not None else recorder.server_address[1] if recorder else 0
        self.remote_user = remote_user
        self.server = server
        self.location = location
        self.ssl = ssl
        self.proc: subprocess.Popen[bytes] | None = None

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
        listen 127.0.0.1:{self.port}{" ssl" if self.ssl else ""};
        {self.server}
        location / {{
            {self.location}
            proxy_set_header X-Remote-User {self.remote_user};
            proxy_pass http://127.0.0.1:{self.upstream};
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


def service(*lines: str) -> str:
    """A ``[SERVICE]`` section: 0.2 s flushes, 5 s grace, info log (the rotation is logged at
    info), then ``lines``."""
    return "[SERVICE]\n    flush 0.2\n    grace 5\n    log_level info\n" + _options(lines)


# Retries a second apart at most, so a held record goes out soon after its credential is fixed.
QUICK_RETRIES = ("scheduler.base 0.2", "scheduler.cap 1")


def config_section(kind: str, name: str, *lines: str) -> str:
    """A ``[KIND]`` section of plugin ``name`` with ``lines`` as its options."""
    return f"[{kind}]\n    name {name}\n" + _options(lines)


def tail_input(log: Path, *lines: str) -> str:
    """A ``[INPUT]`` tail of ``log`` from its head, then ``lines``."""
    return config_section("INPUT", "tail", f"path {log}", "read_from_head on", "refresh_interval 1", *lines)


def output_section(name: str, *lines: str) -> str:
    """An ``[OUTPUT]`` of plugin ``name`` matching everything, then ``lines``."""
    return config_section("OUTPUT", name, "match *", *lines)


def http_output(port: int, *lines: str) -> str:
    """The http output posting JSON lines to ``127.0.0.1:port/ingest``, then ``lines``."""
    return output_section("http", "host 127.0.0.1", f"port {port}", "uri /ingest", "format json_lines", *lines)


def _options(lines: Iterable[str]) -> str:
    return "".join(f"    {line}\n" for line in lines)


@contextmanager
def stops_cleanly(proc: KubetrailProcess) -> Iterator[KubetrailProcess]:
    """The body runs with ``proc``; at its end ``proc`` is stopped by SIGTERM and must exit 0, and
    if the body fails it is killed, not left running."""
    try:
        yield proc
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()


def append_lines(path: Path, start: int, count: int) -> None:
    """Records ``{"n": start}`` .. ``{"n": start + count - 1}``, a JSON line each, appended to ``path``."""
    with path.open("a") as handle:
        for i in range(start, start + count):
            handle.write(orjson.dumps({"n": i}).decode() + "\n")


def assert_exactly_once(numbers: Iterable[int], total: int) -> None:
    """Every record ``0 .. total - 1`` counted once by its number: none lost, none twice."""
    counts = Counter(numbers)
    assert sorted(counts) == list(range(total)) and set(counts.values()) == {1}, "every record exactly once"
