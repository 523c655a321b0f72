"""A GELF receiver for the gelf output's tests: graygelf (npm, pinned in
``tests/servers/gelf/package-lock.json``) run by Node.

graygelf's server is an independent GELF UDP decoder (chunk reassembly, gzip and zlib), so the
UDP tests check our chunking and compression against someone else's reading of the spec. GELF
over TCP/TLS (JSON documents ended by NUL) has no such package; ``receiver.js`` reads that
framing with Node's ``net``/``tls`` (a few lines, stated in the README's list of fakes).
``npm ci`` installs into ``~/.cache/kubetrail/gelf-receiver-<lock hash>/`` once.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from tests.servers import HERE, ServerProcess, ServerUnavailable, cache_root, free_port
from tests.timing import scaled

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cluster"))
from localcluster import pki

SOURCE = HERE / "gelf"
START_TIMEOUT = 30.0


def build() -> Path:
    """The receiver's directory with graygelf installed (``npm ci``, cached by the lock's hash)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise ServerUnavailable("Node.js and npm are needed for the GELF receiver (apt-get install nodejs npm)")
    lock = (SOURCE / "package-lock.json").read_bytes()
    target = cache_root() / f"gelf-receiver-{hashlib.sha256(lock).hexdigest()[:12]}"
    if (target / "node_modules" / "graygelf" / "server.js").exists():
        shutil.copy(SOURCE / "receiver.js", target / "receiver.js")
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json", "receiver.js"):
        shutil.copy(SOURCE / name, target / name)
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
        cwd=target,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise ServerUnavailable(f"npm ci failed: {result.stderr[-1500:]}")
    return target


class GelfReceiver(ServerProcess):
    """The receiver process; :attr:`messages` collects what it decoded, in arrival order."""

    name = "the GELF receiver"

    def __init__(self, tls: bool = False) -> None:
        self.directory = build()
        self.workdir = Path(tempfile.mkdtemp(prefix="kubetrail-gelf-"))
        self.log_path = self.workdir / "receiver.log"
        self.proc = None
        self.udp_port = self.port = 0
        self.tcp_port = self.tls_port = 0
        self.ca_file: Path | None = None
        self.tls = tls
        self.messages: list[dict[str, Any]] = []
        self._ready = threading.Event()

    def start(self) -> None:
        args = []
        if self.tls:
            ca = pki.make_ca("gelf-test-ca")
            server = pki.serving_cert(ca, "localhost")
            self.ca_file = self.workdir / "ca.crt"
            pki.write_cert(self.ca_file, ca.cert)
            server.write(self.workdir / "server.crt", self.workdir / "server.key")
            args = [str(self.workdir / "server.crt"), str(self.workdir / "server.key")]
        self.udp_port, self.tcp_port, self.tls_port = free_port(socket.SOCK_DGRAM), free_port(), free_port()
        self.port = self.udp_port

        def launch(attempt: int) -> None:
            # It says it is ready on stdout, where the messages it decodes come after.
            self.spawn(
                ["node", "receiver.js", str(self.udp_port), str(self.tcp_port), str(self.tls_port), *args],
                stdout=subprocess.PIPE,
                cwd=self.directory,
            )
            threading.Thread(target=self._read, daemon=True).start()

        self.start_attempts(launch, lambda: True if self._ready.is_set() else None, START_TIMEOUT, 0.02, attempts=1)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            item = orjson.loads(line)
            if item.get("ready"):
                self._ready.set()
            else:
                self.messages.append(item)

    def wait_for(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + scaled(timeout)  # a loaded machine: see tests/timing.py
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.messages)
