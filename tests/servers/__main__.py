"""``python -m tests.servers build``: fetch/build the real servers the sink tests use.

Failures are reported, not fatal: the tests that need a missing server skip with the reason.

``python -m tests.servers kafka up DIR [--brokers N]`` starts a Kafka cluster for people (and the
benchmark) that keeps running after the command, writing ``DIR/env`` (``KAFKA_BOOTSTRAP`` and the
SASL/TLS addresses and credentials); ``python -m tests.servers kafka down DIR`` stops it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tests.servers import ServerUnavailable, gelf, kafka, loki, minio, otelcol, search


def kafka_command(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "up":
        brokers = int(argv[3]) if len(argv) == 4 and argv[2] == "--brokers" else 3
        directory = Path(argv[1]).resolve()
        try:
            cluster = kafka.up(directory, brokers)
        except ServerUnavailable as exc:
            print(f"Kafka did not start: {exc}", file=sys.stderr)
            return 1
        print(f"Kafka {kafka.version()}: {len(cluster.nodes)} brokers at {cluster.bootstrap}; {directory / 'env'}")
        return 0
    if len(argv) == 2 and argv[0] == "down":
        print(f"stopped {kafka.down(Path(argv[1]))} Kafka node(s)")
        return 0
    print("usage: python -m tests.servers kafka up DIR [--brokers N] | kafka down DIR", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    if argv[:1] == ["kafka"]:
        return kafka_command(argv[1:])
    if argv != ["build"]:
        print("usage: python -m tests.servers build | kafka up DIR | kafka down DIR", file=sys.stderr)
        return 2
    builds = (
        ("OpenSearch", lambda: search.build("opensearch")),
        ("Elasticsearch", lambda: search.build("elasticsearch")),
        ("Loki", loki.build),
        ("OpenTelemetry Collector", otelcol.build),
        ("GELF receiver (graygelf)", gelf.build),
        ("Kafka", kafka.build),
        ("MinIO", minio.build),
    )
    for name, build in builds:
        started = time.monotonic()
        try:
            path = build()
        except ServerUnavailable as exc:
            print(f"{name}: not available, its tests will be skipped: {exc}", file=sys.stderr)
            continue
        print(f"{name}: {path} ({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
