"""Real servers for the sink tests, fetched from the registries this machine reaches.

* ``search``: OpenSearch and Elasticsearch from Maven Central (codelibs' runners, pinned in
  ``tests/servers/{opensearch,elasticsearch}/pom.xml``), run with the local Java 17.
* ``loki``: Loki built from its Go module (pinned in ``tests/servers/loki/go.mod``).
* ``minio``: MinIO built from its Go module (``tests/servers/minio/go.mod``), for ``s3``.
* ``moto``: moto's AWS API emulator in server mode (PyPI, ``requirements/ci.txt``), for
  ``cloudwatch_logs``: AWS itself cannot be reached from here.
* ``gelf``: graygelf's GELF UDP server (npm, ``tests/servers/gelf/package-lock.json``) run by Node.

Both are fetched or built once into ``~/.cache/kubetrail/`` (or ``$KUBETRAIL_CACHE_DIR``),
keyed by version. ``python -m tests.servers build`` does it ahead of the tests (scripts/test
calls it); the test fixtures build on demand too and skip with a message when they cannot.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


class ServerUnavailable(Exception):
    """The server cannot be built or started here; the message says how to get it."""


def cache_root() -> Path:
    base = os.environ.get("KUBETRAIL_CACHE_DIR")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "kubetrail"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """What every server wrapper here shares: a process in its own session, a log file, a work
    directory; stopping is SIGTERM to the whole group, SIGKILL if it does not go in 30 s."""

    workdir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop_process(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # a runner whose main waits on its input stops at its end
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def stop(self) -> None:
        self.stop_process()
        shutil.rmtree(self.workdir, ignore_errors=True)
