"""Real servers for the sink tests, fetched from the registries this machine reaches.

* ``search``: OpenSearch and Elasticsearch from Maven Central (codelibs' runners, pinned in
  ``tests/servers/{opensearch,elasticsearch}/pom.xml``), run with the local Java 17.
* ``loki``: Loki built from its Go module (pinned in ``tests/servers/loki/go.mod``).

Both are fetched or built once into ``~/.cache/kubetrail/`` (or ``$KUBETRAIL_CACHE_DIR``),
keyed by version. ``python -m tests.servers build`` does it ahead of the tests (scripts/test
calls it); the test fixtures build on demand too and skip with a message when they cannot.
"""

from __future__ import annotations

import os
import socket
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
