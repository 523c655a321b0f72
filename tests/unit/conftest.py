"""Fixtures shared by the unit tests: the real OpenTelemetry Collector (OTLP and fluentforward
receivers) that the opentelemetry and forward sinks are tested against."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import required
from tests.servers import ServerUnavailable, otelcol


@pytest.fixture(scope="session")
def collector_binary() -> Path:
    try:
        return otelcol.build()
    except ServerUnavailable as exc:
        required.unavailable(f"{exc} (python -m tests.servers.otelcol build)", kind="servers")


@pytest.fixture
def collector(collector_binary: Path, tmp_path: Path) -> Iterator[otelcol.Collector]:
    """A collector of its own for each test, stopped afterwards."""
    coll = otelcol.Collector(collector_binary, tmp_path / "otelcol")
    coll.start()
    try:
        yield coll
    finally:
        coll.stop()
