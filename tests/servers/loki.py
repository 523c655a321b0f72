"""A real Loki for the loki sink tests, built from its Go module.

``tests/servers/loki/go.mod`` pins ``github.com/grafana/loki/v3`` (and repeats Loki's own
replace directives, which Go ignores for a dependency). The binary goes to
``~/.cache/kubetrail/loki-<version>-<go version>/loki``; a cold build takes about 6-10 minutes
and up to ~3 GB of memory on 2 cores, later runs reuse it. It runs single-process ("all"
target) with filesystem storage in a temporary directory, on free loopback ports.
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

MODULE_DIR = HERE / "loki"
PACKAGE = "github.com/grafana/loki/v3/cmd/loki"
BUILD_ENV = {"GOWORK": "off", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
BUILD_TIMEOUT = 40 * 60
START_TIMEOUT = 120.0
REJECT_OLD_SAMPLES_MAX_AGE = "168h"  # entries older than a week are refused (the too-old tests)

CONFIG = """\
auth_enabled: {auth}
server:
  http_listen_address: 127.0.0.1
  http_listen_port: {http_port}
  grpc_listen_address: 127.0.0.1
  grpc_listen_port: {grpc_port}
  log_level: warn
common:
  instance_addr: 127.0.0.1
  path_prefix: {data}
  storage:
    filesystem:
      chunks_directory: {data}/chunks
      rules_directory: {data}/rules
  replication_factor: 1
  ring:
    kvstore:
      store: inmemory
ingester:
  lifecycler:
    min_ready_duration: 0s
schema_config:
  configs:
    - from: 2020-10-24
      store: tsdb
      object_store: filesystem
      schema: v13
      index:
        prefix: index_
        period: 24h
limits_config:
  reject_old_samples: true
  reject_old_samples_max_age: {max_age}
  ingestion_rate_mb: 64
  ingestion_burst_size_mb: 128
memberlist:
  bind_addr: [127.0.0.1]
  bind_port: {memberlist_port}
analytics:
  reporting_enabled: false
"""


def version() -> str:
    match = re.search(r"github\.com/grafana/loki/v3 (v\S+)", (MODULE_DIR / "go.mod").read_text())
    assert match, "tests/servers/loki/go.mod does not require github.com/grafana/loki/v3"
    return match.group(1)


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise ServerUnavailable("no Go toolchain on PATH: install Go 1.26 to build Loki")
    return go


def binary_path(go: str) -> Path:
    gover = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, check=True).stdout.strip()
    return cache_root() / f"loki-{version()}-{gover}" / "loki"


def build() -> Path:
    """The Loki binary, built once; :class:`ServerUnavailable` says why it cannot be."""
    go = _go()
    target = binary_path(go)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"loki.tmp{os.getpid()}")
    env = {**os.environ, **BUILD_ENV}
    try:
        proc = subprocess.run(
            [go, "build", "-trimpath", "-o", str(tmp), PACKAGE],
            cwd=MODULE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        tmp.unlink(missing_ok=True)
        raise ServerUnavailable(f"building Loki took over {BUILD_TIMEOUT // 60} minutes") from None
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ServerUnavailable(f"building Loki {version()} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    os.replace(tmp, target)
    return target


class Loki(ServerProcess):
    """One Loki process; ``url`` is its HTTP address. Always :meth:`stop` it (the fixture does)."""

    def __init__(self, auth_enabled: bool = False) -> None:
        self.binary = build()
        self.auth_enabled = auth_enabled
        self.workdir = Path(tempfile.mkdtemp(prefix="kubetrail-loki-"))
        self.log_path = self.workdir / "loki.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        for attempt in range(3):  # a free port can be taken between picking and binding
            self.port = free_port()
            config = self.workdir / f"loki-{attempt}.yaml"
            config.write_text(
                CONFIG.format(
                    auth="true" if self.auth_enabled else "false",
                    http_port=self.port,
                    grpc_port=free_port(),
                    memberlist_port=free_port(),
                    data=self.workdir / f"data{attempt}",
                    max_age=REJECT_OLD_SAMPLES_MAX_AGE,
                )
            )
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [str(self.binary), f"-config.file={config}"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._wait_ready():
                return
            self.stop_process()
        raise ServerUnavailable(f"Loki did not start; last log lines:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/ready", timeout=5) as response:
                    if response.read().strip() == b"ready":
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        return False
