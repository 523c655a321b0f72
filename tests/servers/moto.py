"""moto's server mode (``moto[server]`` from PyPI) as a real process on loopback: the AWS API
emulator for the ``cloudwatch_logs`` and ``s3`` sink tests, since AWS itself cannot be reached.

It speaks the real wire protocols (CloudWatch Logs' JSON API, S3's REST/XML API with multipart
uploads, STS for role assumption and web identity) to the real aiobotocore client, so the
requests, signatures and error codes the sinks see are the SDK's. ``reset()`` empties it
between tests (moto's ``/moto-api/reset``).
"""

from __future__ import annotations

import sys
import tempfile
import urllib.request
from pathlib import Path

from tests.servers import ServerProcess, ServerUnavailable, free_port, http_get

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

    name = "moto"

    def __init__(self) -> None:
        reason = available()
        if reason:
            raise ServerUnavailable(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix="kubetrail-moto-"))
        self.log_path = self.workdir / "moto.log"
        self.proc = None
        self.port = 0

    def start(self) -> None:
        def launch(attempt: int) -> None:
            self.port = free_port()
            self.spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], cwd=self.workdir)

        def ready() -> bool | None:
            return True if http_get(f"{self.url}/moto-api/") is not None else None

        self.start_attempts(launch, ready, START_TIMEOUT)

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=30):
            pass
