"""moto's server mode (``moto[server]`` from PyPI) as a real process on loopback: the AWS API
emulator for the ``cloudwatch_logs`` and ``s3`` sink tests, since AWS itself cannot be reached.

It speaks the real wire protocols (CloudWatch Logs' JSON API, S3's REST/XML API with multipart
uploads, STS for role assumption and web identity) to the real aiobotocore client, so the
requests, signatures and error codes the sinks see are the SDK's. ``reset()`` empties it
between tests (moto's ``/moto-api/reset``).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.servers import ServerProcess, ServerUnavailable, free_port

START_TIMEOUT = 60.0


def available() -> str | None:
    """None when moto's server can run here, else why not."""
    try:
        import flask  # noqa: F401  (moto[server]'s extra)
        import moto.server  # noqa: F401
    except ImportError as exc:
        return f"moto[server] is not installed ({exc}); scripts/setup installs requirements/ci.txt"
    return None


class MotoServer(ServerProcess):
    """``python -m moto.server`` on a free loopback port; ``url`` is its endpoint."""

    def __init__(self) -> None:
        reason = available()
        if reason:
            raise ServerUnavailable(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix="kubetrail-moto-"))
        self.log_path = self.workdir / "moto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        for _ in range(3):  # a free port can be taken between picking and binding
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=self.workdir,
                )
            if self._wait_ready():
                return
            self.stop_process()
        raise ServerUnavailable(f"moto did not start; last log lines:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=5):
                    return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        return False

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=30):
            pass
