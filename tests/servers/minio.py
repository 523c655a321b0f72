"""A real MinIO (S3-compatible object store) for the s3 sink tests, built from its Go module.

``tests/servers/minio/go.mod`` pins ``github.com/minio/minio`` (a commit's pseudo-version: MinIO
tags releases as ``RELEASE.*``, which Go does not read as versions). The binary goes to
``~/.cache/kubetrail/minio-<version>-<go version>/minio``; a cold build took about 3 minutes on
2 cores here. It runs as a single-drive server in a temporary directory on free loopback ports,
with fixed root credentials (:data:`ACCESS_KEY`, :data:`SECRET_KEY`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.servers import HERE, ServerProcess, ServerUnavailable, cache_root, free_port

MODULE_DIR = HERE / "minio"
PACKAGE = "github.com/minio/minio"
BUILD_ENV = {"GOWORK": "off", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
BUILD_TIMEOUT = 30 * 60
START_TIMEOUT = 60.0
ACCESS_KEY = "kubetrail"
SECRET_KEY = "kubetrail-secret"


def version() -> str:
    match = re.search(r"github\.com/minio/minio (v\S+)", (MODULE_DIR / "go.mod").read_text())
    assert match, "tests/servers/minio/go.mod does not require github.com/minio/minio"
    return match.group(1)


def _go() -> str:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)
    if go is None:
        raise ServerUnavailable("Go is not installed (needed to build MinIO)")
    return go


def binary_path(go: str) -> Path:
    go_version = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60).stdout.strip()
    return cache_root() / f"minio-{version()}-{go_version}" / "minio"


def build() -> Path:
    """The MinIO binary, built once; :class:`ServerUnavailable` says why it cannot be."""
    go = _go()
    target = binary_path(go)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"minio.tmp{os.getpid()}")
    env = {**os.environ, **BUILD_ENV}
    with tempfile.TemporaryDirectory(prefix="kubetrail-minio-build-") as workdir:
        # A copy: -mod=mod may tidy go.mod, and the work tree is not the build's to change.
        for name in ("go.mod", "go.sum"):
            shutil.copy(MODULE_DIR / name, Path(workdir) / name)
        try:
            proc = subprocess.run(
                [go, "build", "-trimpath", "-o", str(tmp), PACKAGE],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            tmp.unlink(missing_ok=True)
            raise ServerUnavailable(f"building MinIO took over {BUILD_TIMEOUT // 60} minutes") from None
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ServerUnavailable(f"building MinIO {version()} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    os.replace(tmp, target)
    return target


class MinioServer(ServerProcess):
    """One MinIO process; ``url`` is its S3 endpoint. Always :meth:`stop` it (the fixture does)."""

    def __init__(self) -> None:
        self.binary = build()
        self.workdir = Path(tempfile.mkdtemp(prefix="kubetrail-minio-"))
        self.log_path = self.workdir / "minio.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        env = {
            **os.environ,
            "MINIO_ROOT_USER": ACCESS_KEY,
            "MINIO_ROOT_PASSWORD": SECRET_KEY,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_CONFIG_ENV_FILE": "",
        }
        for attempt in range(3):  # a free port can be taken between picking and binding
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [str(self.binary), "server", str(self.workdir / f"data{attempt}"), "--quiet",
                     "--address", f"127.0.0.1:{self.port}", "--console-address", f"127.0.0.1:{free_port()}"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=env,
                )  # fmt: skip
            if self._wait_ready():
                return
            self.stop_process()
        raise ServerUnavailable(f"MinIO did not start; last log lines:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/minio/health/ready", timeout=5) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        return False
