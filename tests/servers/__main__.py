"""``python -m tests.servers build``: fetch/build the real servers the sink tests use.

Failures are reported, not fatal: the tests that need a missing server skip with the reason.
"""

from __future__ import annotations

import sys
import time

from tests.servers import ServerUnavailable, gelf, loki, minio, otelcol, search


def main(argv: list[str]) -> int:
    if argv != ["build"]:
        print("usage: python -m tests.servers build", file=sys.stderr)
        return 2
    builds = (
        ("OpenSearch", lambda: search.build("opensearch")),
        ("Elasticsearch", lambda: search.build("elasticsearch")),
        ("Loki", loki.build),
        ("OpenTelemetry Collector", otelcol.build),
        ("GELF receiver (graygelf)", gelf.build),
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
