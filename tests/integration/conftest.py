"""Fixtures that give integration tests a real Kubernetes control plane.

* ``local_cluster`` (session): etcd + kube-apiserver + kube-controller-manager +
  kube-scheduler, started once per test run in a temp dir and stopped at the end (the dir,
  with every component's log and the audit log, is kept; its path is printed in the summary).
  Options: controllers on, ``--event-ttl=10m``, periodic compaction off (``0``) so
  resourceVersions stay valid for the whole run unless a test calls ``compact_now()``,
  Event watch cache off (Event watches hit etcd, so compaction gives real 410s), audit log
  rotating at 1 MB with gzip and 20 backups, audit webhook to ``audit_sink``.
* ``audit_sink`` (session): HTTPS receiver for the audit webhook, created before the
  cluster because its URL and CA are fixed at apiserver start.
* ``compacting_cluster`` (session, started on first use): a second, small cluster (no
  controllers) whose apiserver compacts etcd every 2 s and expires Events after 5 s, for
  tests of 410 Gone, TTL expiry and API-server restarts that must not disturb the shared one.

Without Go (and without cached binaries) or when the build fails, every test that needs a
cluster is skipped with a message pointing at ``scripts/local-cluster build``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import required

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "cluster"))

from localcluster import (  # noqa: E402
    AuditSink,
    BuildError,
    GoNotFoundError,
    KubeAPI,
    LocalCluster,
    ensure_binaries,
)

SHARED_CLUSTER_OPTIONS: dict[str, Any] = {
    "controllers": True,
    "event_ttl": "10m",
    "compaction_interval": "0",
    "no_watch_cache_for_events": True,
    "audit_log_maxsize": 1,
    "audit_log_maxbackup": 20,
    "audit_log_compress": True,
}
COMPACTING_CLUSTER_OPTIONS: dict[str, Any] = {
    "controllers": False,
    "event_ttl": "5s",
    "compaction_interval": "2s",
    "no_watch_cache_for_events": True,
    # Events share etcd leases for this long; the default 60 s would delay TTL expiry.
    "apiserver_extra_args": ["--lease-reuse-duration-seconds=1"],
}

_REPORT: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: needs the real local control plane (scripts/local-cluster); skipped without Go"
    )
    config.addinivalue_line(
        "markers", "node: needs a real node (containerd + kubelet, root); skipped with the reason when it cannot start"
    )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _REPORT:
        terminalreporter.section("local control plane")
        for line in _REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def control_plane_binaries(request: pytest.FixtureRequest) -> Path:
    """Directory with etcd and the kube binaries; builds them on first use (minutes)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    show = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
    try:
        with show:  # a cold build takes minutes: let its progress reach the terminal
            return ensure_binaries(log=sys.stderr)
    except GoNotFoundError as exc:
        required.unavailable(f"no control-plane binaries: {exc}")
    except BuildError as exc:
        required.unavailable(
            f"building the control plane failed; run `scripts/local-cluster build` to see why "
            f"and fix it: {str(exc)[:2000]}"
        )


@pytest.fixture(scope="session")
def audit_sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditSink]:
    sink = AuditSink(tmp_path_factory.mktemp("audit-sink")).start()
    yield sink
    sink.stop()


def _rss_mib(cluster: LocalCluster) -> str:
    return ", ".join(f"{name} {kb / 1024:.0f}" for name, kb in cluster.rss_kb().items() if kb)


@contextlib.contextmanager
def _running(name: str, directory: Path, binaries: Path, **options: Any) -> Iterator[LocalCluster]:
    cluster = LocalCluster.up(directory, bin_dir=binaries, **options)
    started = {"up_seconds": cluster.startup_seconds, "rss_kb_after_up": cluster.rss_kb()}
    try:
        yield cluster
    finally:
        ended = {"rss_kb_at_teardown": cluster.rss_kb()}
        (directory / "rss.json").write_text(json.dumps({**started, **ended}, indent=2) + "\n")
        _REPORT.append(
            f"{name}: {directory} (logs kept); up in {cluster.startup_seconds:.1f}s; "
            f"RSS MiB at teardown: {_rss_mib(cluster)}"
        )
        cluster.down()


def _cluster_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """``$KUBETRAIL_TEST_CLUSTER_DIR/<name>`` if set (e.g. a CI artifacts dir), else a pytest tmp dir.

    pytest keeps only the last three runs' tmp dirs; set the variable to keep logs longer.
    """
    base = os.environ.get("KUBETRAIL_TEST_CLUSTER_DIR")
    if not base:
        return tmp_path_factory.mktemp(name)
    directory = Path(base) / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


@pytest.fixture(scope="session")
def local_cluster(
    control_plane_binaries: Path, audit_sink: AuditSink, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    directory = _cluster_dir(tmp_path_factory, "local-cluster")
    with _running(
        "local_cluster",
        directory,
        control_plane_binaries,
        webhook_url=audit_sink.url,
        webhook_ca=str(audit_sink.ca_file),
        webhook_token_file=str(audit_sink.token_file),
        **SHARED_CLUSTER_OPTIONS,
    ) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def compacting_cluster(
    control_plane_binaries: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    directory = _cluster_dir(tmp_path_factory, "compacting-cluster")
    with _running("compacting_cluster", directory, control_plane_binaries, **COMPACTING_CLUSTER_OPTIONS) as c:
        yield c


@pytest.fixture
def admin(local_cluster: LocalCluster) -> KubeAPI:
    return local_cluster.client("admin")


@pytest.fixture
def namespace(admin: KubeAPI, request: pytest.FixtureRequest) -> str:
    """A fresh namespace per test (names are unique, so tests never see each other's objects)."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{base}-{int(time.time() * 1000) % 10**8}"
    resp = admin.post("/api/v1/namespaces", {"metadata": {"name": name}})
    assert resp.status == 201, resp
    return name


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test's report carries the end of each kubetrail log it started: CI keeps
    only the console output, and the temp dirs are gone by the time anyone looks."""
    report = yield
    if report.when == "call" and report.failed:
        from tests.integration.kubetrail_proc import log_tails

        tails = log_tails()
        if tails:
            report.sections.append(("kubetrail logs", tails))
    return report


@pytest.fixture(autouse=True)
def _no_kubetrail_left_running() -> Iterator[None]:
    """Every kubetrail process a test started is killed when the test ends, pass or fail."""
    yield
    from tests.integration.kubetrail_proc import kill_leftovers

    kill_leftovers()
