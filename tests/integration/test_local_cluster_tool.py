"""The ``scripts/local-cluster`` tool fails clearly and never leaves processes behind.

Bad input covered: no Go toolchain, an unreachable module proxy, a port already in use, a
component that dies at start, bad webhook options, and ``up`` over a running cluster.  The
first ones need neither Go nor binaries; the rest are marked ``cluster``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localcluster import ClusterError, LocalCluster
from tests import required

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "scripts" / "local-cluster"


def run_tool(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TOOL), *args], env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def _path_without_go() -> str:
    parts = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(p for p in parts if p and not os.access(Path(p) / "go", os.X_OK))


def _pids(directory: Path) -> dict[str, int]:
    state = json.loads((directory / "state.json").read_text())
    return {name: comp["pid"] for name, comp in state["components"].items()}


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


@pytest.mark.parametrize("command", [["build"], ["up", "DIR"]])
def test_missing_go_toolchain_is_reported(tmp_path: Path, command: list[str]) -> None:
    args = [str(tmp_path / "c") if a == "DIR" else a for a in command]
    env = {"PATH": _path_without_go(), "KUBETRAIL_CACHE_DIR": str(tmp_path / "empty-cache")}
    if shutil.which("go", path=env["PATH"]):
        pytest.skip("cannot hide Go from PATH on this machine")
    result = run_tool(*args, env=env)
    assert result.returncode == 1, result
    assert "no Go toolchain found on PATH" in result.stderr
    assert "scripts/local-cluster build" in result.stderr
    assert not (tmp_path / "c" / "state.json").exists()


def test_unreachable_module_proxy_is_reported_and_leaves_no_binary(tmp_path: Path) -> None:
    if shutil.which("go") is None:
        required.unavailable("needs Go")
    cache = tmp_path / "cache"
    env = {
        "KUBETRAIL_CACHE_DIR": str(cache),
        "GOMODCACHE": str(tmp_path / "modcache"),  # cold module cache
        "GOPROXY": "http://127.0.0.1:9",  # nothing listens on the discard port
    }
    result = run_tool("build", env=env)
    subprocess.run(["chmod", "-R", "u+w", str(tmp_path / "modcache")], check=False)
    assert result.returncode == 1, result
    assert "downloading Go modules failed" in result.stderr
    assert "GOPROXY=http://127.0.0.1:9" in result.stderr
    leftovers = [p.name for p in cache.rglob("*") if p.is_file()]
    assert leftovers == [], leftovers


def test_port_in_use_is_reported_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_tool("up", str(tmp_path / "c"), "--api-port", str(port))
    assert result.returncode == 1, result
    assert f"port 127.0.0.1:{port} for kube-apiserver is already in use" in result.stderr
    assert not (tmp_path / "c" / "state.json").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"webhook_url": "https://127.0.0.1:1/a"}, "needs --webhook-ca"),
        ({"webhook_url": "http://127.0.0.1:1/a", "webhook_ca": "x"}, "must be https"),
        ({"webhook_url": "https://127.0.0.1:1/a", "webhook_ca": "/etc/hostname"}, "exactly one of"),
        ({"webhook_token_file": "/etc/hostname"}, "need --webhook-url"),
        ({"event_ttl": "ten minutes"}, "not a Go duration"),
        ({"nodes": 2, "controllers": True}, "only 0 or 1 is supported"),
        ({"nodes": 1}, "needs --controllers"),
        ({"images": ["/etc/hostname"]}, "needs --nodes 1"),
        ({"nodes": 1, "controllers": True, "container_log_max_size": "1MB"}, "not a quantity like 1Mi"),
        ({"nodes": 1, "controllers": True, "container_log_max_files": 1}, "must be >= 2"),
        ({"nodes": 1, "controllers": True, "images": ["/nonexistent.tar"]}, "image archive not found"),
    ],
)
def test_bad_options_are_rejected_up_front(tmp_path: Path, options: dict[str, str], message: str) -> None:
    with pytest.raises(ClusterError, match=message):
        LocalCluster.up(tmp_path / "c", **options)  # type: ignore[arg-type]
    assert not (tmp_path / "c").exists()


@pytest.mark.cluster
def test_component_dying_at_start_is_reported_with_its_log(control_plane_binaries: Path, tmp_path: Path) -> None:
    directory = tmp_path / "c"
    result = run_tool("up", str(directory), "--apiserver-arg=--no-such-flag")
    assert result.returncode == 1, result
    assert "kube-apiserver exited during startup (exit code 1)" in result.stderr
    assert "unknown flag: --no-such-flag" in result.stderr  # from the component's own log
    pids = _pids(directory)
    assert set(pids) == {"etcd", "kube-apiserver"}
    assert not any(_running(pid) for pid in pids.values()), "etcd was left running"


@pytest.mark.cluster
def test_cli_up_status_down(control_plane_binaries: Path, tmp_path: Path) -> None:
    directory = tmp_path / "c"
    up = run_tool("up", str(directory), "--event-ttl", "3m")
    assert up.returncode == 0, up
    try:
        status = run_tool("status", str(directory), "--json")
        assert status.returncode == 0, status
        components = json.loads(status.stdout)["components"]
        assert set(components) == {"etcd", "kube-apiserver"}
        assert all(c["healthy"] and c["rss_kb"] > 0 for c in components.values())

        sourced = subprocess.run(
            ["bash", "-c", f". {directory / 'env'} && echo $KUBE_URL $AUDIT_LOG_PATH $ETCD_URL"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        cluster = LocalCluster.attach(directory)
        assert sourced == [cluster.url, str(cluster.audit_log_path), cluster.etcd_url]
        assert cluster.client("admin").get("/api/v1/namespaces/kubetrail").status == 200
        assert cluster.client("collector").get("/api/v1/events").status == 200
        assert "--event-ttl=3m" in cluster.components["kube-apiserver"].args

        again = run_tool("up", str(directory))
        assert again.returncode == 1 and "already running" in again.stderr, again
    finally:
        down = run_tool("down", str(directory))
    assert down.returncode == 0, down
    assert not any(_running(pid) for pid in _pids(directory).values())
    after = run_tool("status", str(directory))
    assert after.returncode == 3 and "stopped" in after.stdout
    assert (directory / "kube-apiserver.log").stat().st_size > 0  # logs are kept


@pytest.mark.cluster
def test_cluster_is_stopped_when_its_owner_is_killed(control_plane_binaries: Path, tmp_path: Path) -> None:
    """SIGKILL of a test run (no atexit, no fixture teardown) must not leave daemons behind."""
    directory = tmp_path / "c"
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[1]); from localcluster import LocalCluster; "
            "LocalCluster.up(sys.argv[2], bin_dir=sys.argv[3]); print('up', flush=True); time.sleep(600)",
            str(ROOT / "cluster"),
            str(directory),
            str(control_plane_binaries),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "up"
        pids = _pids(directory)
        assert all(_running(pid) for pid in pids.values())
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(pid) for pid in pids.values()), "components outlived their killed owner"


@pytest.mark.cluster
def test_helm_and_kubectl_are_built_and_exported(local_cluster: LocalCluster) -> None:
    """helm and kubectl come from the same pins as the cluster and work against it via DIR/env."""
    assert local_cluster.helm is not None and local_cluster.kubectl is not None
    env_file = (local_cluster.dir / "env").read_text()
    assert f"export HELM={local_cluster.helm}" in env_file
    assert f"export KUBECTL={local_cluster.kubectl}" in env_file
    env = {**os.environ, "KUBECONFIG": str(local_cluster.kubeconfig)}
    version = subprocess.run(
        [str(local_cluster.kubectl), "version", "-o", "json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0, version.stderr
    info = json.loads(version.stdout)
    assert info["clientVersion"]["gitVersion"] == info["serverVersion"]["gitVersion"] == "v1.36.3"
    helm = subprocess.run(
        [str(local_cluster.helm), "list", "-A", "-o", "json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert helm.returncode == 0 and json.loads(helm.stdout) == [], helm.stderr
    short = subprocess.run([str(local_cluster.helm), "version", "--short"], capture_output=True, text=True, timeout=30)
    assert short.stdout.startswith("v4."), short
    assert LocalCluster.attach(local_cluster.dir).helm == local_cluster.helm
