"""A missing component skips its tests on a developer's machine and fails them in CI."""

from __future__ import annotations

import pytest

from tests import required


@pytest.fixture(autouse=True)
def no_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    for kind in ("ALL", "NODE", "NATIVE", "SERVERS"):
        monkeypatch.delenv(f"KUBETRAIL_REQUIRE_{kind}", raising=False)


def test_skips_where_nothing_is_required() -> None:
    with pytest.raises(pytest.skip.Exception, match="no chromium"):
        required.unavailable("no chromium", kind="servers")


def test_ci_fails_every_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETRAIL_REQUIRE_ALL", "1")
    with pytest.raises(pytest.fail.Exception, match=r"Kafka did not start \(KUBETRAIL_REQUIRE_ALL=1"):
        required.unavailable("Kafka did not start", kind="servers")
    with pytest.raises(pytest.fail.Exception, match="no strace"):
        required.unavailable("no strace")


def test_one_kind_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETRAIL_REQUIRE_NODE", "1")
    with pytest.raises(pytest.fail.Exception, match=r"kubelet exited \(KUBETRAIL_REQUIRE_NODE=1"):
        required.unavailable("kubelet exited", kind="node")
    with pytest.raises(pytest.skip.Exception):
        required.unavailable("no helm")  # another kind still skips
