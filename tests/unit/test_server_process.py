"""The base every test server wrapper uses (tests/servers/__init__.py: ServerProcess), on small
real processes: readiness, a process that dies, attempts and the log tail in the error, and a
stop that escalates to SIGKILL for a process that ignores SIGTERM, children included."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.servers import ServerProcess, ServerUnavailable, free_port, http_get, port_open


class Python(ServerProcess):
    name = "the test server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / "server.log"
        self.proc = None
        self.launched = 0

    def run(self, code: str, ready: str = "", timeout: float = 10.0, attempts: int = 3) -> None:
        def launch(attempt: int) -> None:
            self.launched += 1
            self.port = free_port()
            self.spawn([sys.executable, "-c", code.replace("PORT", str(self.port))])

        def is_ready() -> bool | None:
            return True if port_open(self.port) else None

        self.start_attempts(launch, is_ready, timeout, interval=0.05, attempts=attempts)


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


HTTP = (
    "import http.server, sys\n"
    "print('serving', flush=True)\n"
    "http.server.HTTPServer(('127.0.0.1', PORT), http.server.SimpleHTTPRequestHandler).serve_forever()\n"
)


def test_starts_when_ready_and_stop_removes_the_workdir(tmp_path: Path) -> None:
    server = Python(tmp_path / "w")
    server.workdir.mkdir()
    server.run(HTTP)
    assert server.launched == 1 and http_get(server.url + "/") is not None
    assert "serving" in server.log_tail()
    server.stop()
    assert server.proc is None and not server.workdir.exists() and not port_open(server.port)


def test_a_process_that_exits_fails_each_attempt_fast_with_its_log(tmp_path: Path) -> None:
    server = Python(tmp_path)
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match="the test server did not start; last log lines:\nbroken config"):
        server.run("import sys; print('broken config'); sys.exit(3)", timeout=30)
    assert server.launched == 3 and time.monotonic() - started < 15 and server.proc is None


def test_a_server_never_ready_is_stopped_after_the_timeout(tmp_path: Path) -> None:
    server = Python(tmp_path)
    server.start_error = RuntimeError
    with pytest.raises(RuntimeError, match="did not start"):
        server.run("import time; time.sleep(60)", timeout=0.5, attempts=1)
    assert server.proc is None


def test_stop_kills_a_group_that_ignores_sigterm(tmp_path: Path) -> None:
    server = Python(tmp_path)
    server.stop_timeout = 0.5
    child = tmp_path / "child.pid"
    code = (
        "import signal, subprocess, sys, socket\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(child)!r}, 'w').write(str(p.pid))\n"
        "s = socket.socket(); s.bind(('127.0.0.1', PORT)); s.listen()\n"
        "import time; time.sleep(60)\n"
    )
    server.run(code)
    pid = int(child.read_text())
    started = time.monotonic()
    server.stop_process()
    assert time.monotonic() - started < 10
    for _ in range(100):  # the child (same group) got SIGKILL too: gone, or a zombie not reaped yet
        if not gone(pid):
            time.sleep(0.05)
            continue
        break
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the server's child outlived stop_process")


def test_two_search_servers_alive_at_once_never_form_one_cluster() -> None:
    """An Elasticsearch and an OpenSearch node (wire-compatible) started by one pytest process
    were named alike and joined through the default discovery ports: an index on one lost its
    primary when the other stopped (red indices in a CI run). Each server's cluster has one node."""
    import json

    from tests.servers import running
    from tests.servers.search import SearchServer

    with (
        running(lambda: SearchServer("elasticsearch"), "no real Elasticsearch") as first,
        running(lambda: SearchServer("opensearch"), "no real OpenSearch") as second,
    ):
        assert first.cluster_name != second.cluster_name
        time.sleep(3)  # discovery of a same-named node takes about a second
        for server in (first, second):
            nodes = json.loads(http_get(f"{server.url}/_cat/nodes?format=json", timeout=20) or "[]")
            assert len(nodes) == 1, (server.kind, nodes)
