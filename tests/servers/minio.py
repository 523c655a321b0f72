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
import tempfile
from pathlib import Path

from tests.servers import HERE, ServerProcess, cache_root, find_go, free_port, go_build, go_version, http_get

MODULE_DIR = HERE / "minio"
PACKAGE = "github.com/minio/minio"
BUILD_TIMEOUT = 30 * 60
START_TIMEOUT = 60.0
ACCESS_KEY = "kubetrail"
SECRET_KEY = "kubetrail-secret"


def version() -> str:
    match = re.search(r"github\.com/minio/minio (v\S+)", (MODULE_DIR / "go.mod").read_text())
    assert match, "tests/servers/minio/go.mod does not require github.com/minio/minio"
    return match.group(1)


def binary_path(go: str) -> Path:
    return cache_root() / f"minio-{version()}-{go_version(go)}" / "minio"


def build() -> Path:
    """The MinIO binary, built once; :class:`ServerUnavailable` says why it cannot be."""
    go = find_go("MinIO")
    return go_build(f"MinIO {version()}", go, MODULE_DIR, PACKAGE, binary_path(go), BUILD_TIMEOUT)


class MinioServer(ServerProcess):
    """One MinIO process; ``url`` is its S3 endpoint. Always :meth:`stop` it (the fixture does)."""

    name = "MinIO"

    def __init__(self) -> None:
        self.binary = build()
        self.workdir = Path(tempfile.mkdtemp(prefix="kubetrail-minio-"))
        self.log_path = self.workdir / "minio.log"
        self.proc = None
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

        def launch(attempt: int) -> None:
            self.port = free_port()
            self.spawn(
                [str(self.binary), "server", str(self.workdir / f"data{attempt}"), "--quiet",
                 "--address", f"127.0.0.1:{self.port}", "--console-address", f"127.0.0.1:{free_port()}"],
                env=env,
            )  # fmt: skip

        def ready() -> bool | None:
            return True if http_get(f"{self.url}/minio/health/ready") is not None else None

        self.start_attempts(launch, ready, START_TIMEOUT, interval=0.3)
