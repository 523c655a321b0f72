"""A real Loki for the loki sink tests, built from its Go module.

``tests/servers/loki/go.mod`` pins ``github.com/grafana/loki/v3`` (and repeats Loki's own
replace directives, which Go ignores for a dependency). The binary goes to
``~/.cache/kubetrail/loki-<version>-<go version>/loki``; a cold build takes about 6-10 minutes
and up to ~3 GB of memory on 2 cores, later runs reuse it. It runs single-process ("all"
target) with filesystem storage in a temporary directory, on free loopback ports.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from tests.servers import HERE, ServerProcess, cache_root, find_go, free_port, go_build, go_version, http_get

MODULE_DIR = HERE / "loki"
PACKAGE = "github.com/grafana/loki/v3/cmd/loki"
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


def binary_path(go: str) -> Path:
    return cache_root() / f"loki-{version()}-{go_version(go)}" / "loki"


def build() -> Path:
    """The Loki binary, built once; :class:`ServerUnavailable` says why it cannot be."""
    go = find_go("Loki")
    return go_build(f"Loki {version()}", go, MODULE_DIR, PACKAGE, binary_path(go), BUILD_TIMEOUT)


class Loki(ServerProcess):
    """One Loki process; ``url`` is its HTTP address. Always :meth:`stop` it (the fixture does)."""

    name = "Loki"

    def __init__(self, auth_enabled: bool = False) -> None:
        self.binary = build()
        self.auth_enabled = auth_enabled
        self.workdir = Path(tempfile.mkdtemp(prefix="kubetrail-loki-"))
        self.log_path = self.workdir / "loki.log"
        self.proc = None
        self.port = 0

    def start(self) -> None:
        def launch(attempt: int) -> None:
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
            self.spawn([str(self.binary), f"-config.file={config}"])

        def ready() -> bool | None:
            body = http_get(f"{self.url}/ready")
            return True if body is not None and body.strip() == b"ready" else None

        self.start_attempts(launch, ready, START_TIMEOUT, interval=0.5)
