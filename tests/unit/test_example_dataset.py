"""The recorded example (examples/history/data, from the real control plane by
scripts/record-example) and ``scripts/run`` with no arguments: it ingests the example into the
store under .kubetrail/, prints the Deployment's history, serves the UI and prints its URL,
and reads nothing outside the repository (checked with strace on every file it opens)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from kubetrail.cli.main import main
from tests import required
from tests.timing import scaled

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
DATA = EXAMPLES / "history" / "data"


def test_the_dataset_is_small_and_self_contained() -> None:
    size = sum(p.stat().st_size for p in (EXAMPLES / "history").rglob("*") if p.is_file())
    assert size < 5 * 1024 * 1024
    for path in EXAMPLES.rglob("*"):
        if path.is_file() and path.suffix in (".conf", ".py", ".lua", ".yaml", ".md"):
            assert "shared" not in path.read_text(), f"{path} refers to ../shared"
    audit = [json.loads(line) for line in (DATA / "audit.log").read_text().splitlines()]
    # The story, as the API server recorded it.
    verbs = {(e["verb"], e["objectRef"].get("resource"), e["objectRef"].get("subresource"), e["user"]["username"],
              e["responseStatus"]["code"]) for e in audit}  # fmt: skip
    assert ("create", "deployments", None, "admin", 201) in verbs
    assert ("update", "deployments", "scale", "admin", 200) in verbs
    assert ("patch", "deployments", None, "admin", 200) in verbs
    assert ("delete", "pods", None, "admin", 200) in verbs
    assert ("get", "secrets", None, "system:serviceaccount:shop:reader", 200) in verbs
    assert ("delete", "deployments", None, "norbac", 403) in verbs
    assert "not-a-real-password" not in (DATA / "audit.log").read_text()  # the policy logs Secrets' metadata only


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("example") / "store.db"
    env = {**os.environ, "KUBETRAIL_EXAMPLES": str(EXAMPLES), "KUBETRAIL_STORE": str(path)}
    counts = []
    for _ in range(2):  # the second run stores nothing new
        done = subprocess.run(
            [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(EXAMPLES / "history" / "ingest.conf")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        with sqlite3.connect(path) as conn:
            counts.append(dict(conn.execute("SELECT kind, count(*) FROM records GROUP BY kind").fetchall()))
    assert counts[0] == counts[1]
    assert counts[0]["alert"] >= 4 and counts[0]["event"] and counts[0]["log"]
    return path


def history(store: Path, *args: str) -> list[dict]:  # type: ignore[type-arg]
    result = CliRunner().invoke(main, [*args, "--store", str(store), "--json"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_the_deployments_history(store: Path) -> None:
    entries = history(store, "history", "deploy/shop/web")
    audit = [
        e
        for e in entries
        if e["kind"] == "audit" and e["user"] != "system:serviceaccount:kube-system:deployment-controller"
    ]
    assert [(e["verb"], e.get("subresource"), e["user"], e["code"]) for e in audit] == [
        ("create", None, "admin", 201),
        ("get", "scale", "admin", 200),
        ("update", "scale", "admin", 200),
        ("patch", None, "admin", 200),
        ("patch", None, "admin", 200),
        ("delete", None, "norbac", 403),
    ]
    create, _, scale, broken, back, refused = audit
    # The alerts each request fired, right after it.
    after = {e["id"]: entries[i + 1 : i + 3] for i, e in enumerate(entries) if e["kind"] == "audit"}
    assert [a["rule"] for a in after[create["id"]][:1]] == ["K8s Deployment Created"]
    assert {a["rule"] for a in after[refused["id"]]} == {"Disallowed K8s User", "K8s Request Forbidden"}
    assert all(a["kind"] == "alert" and a["trigger_id"] == refused["id"] for a in after[refused["id"]])
    assert [e["rule"] for e in entries if e["kind"] == "alert"] == [
        "K8s Deployment Created",
        *sorted(["Disallowed K8s User", "K8s Request Forbidden"]),
    ]
    assert any(c["path"] == "/spec/replicas" and c["new"] == 1 for c in create["changes"])
    assert scale["changes"] == [{"op": "replace", "path": "/spec/replicas", "old": 1, "new": 3}]
    image = "/spec/template/spec/containers/0/image"
    assert [(c["old"], c["new"]) for c in broken["changes"] if c["path"] == image] == [
        ("localhost/busybox:latest", "localhost/busybox:1.37")
    ]
    assert [(c["old"], c["new"]) for c in back["changes"] if c["path"] == image] == [
        ("localhost/busybox:1.37", "localhost/busybox:latest")
    ]
    events = [e["message"] for e in entries if e["kind"] == "event"]
    assert "Scaled up replica set" in events[0] and any("from 1 to 3" in m for m in events)
    times = [e["time_ns"] for e in entries]
    assert times == sorted(times)
    # Recorded with a node: the missing image is a Warning on the new ReplicaSet's pod, and the
    # pods' log lines join the timeline with --logs.
    warnings = [e for e in entries if e["kind"] == "event" and e["reason"] == "ErrImageNeverPull"]
    assert warnings and all(e["type"] == "Warning" and e["name"].startswith("web-") for e in warnings)
    # (core/v1 Events keep whole seconds)
    assert broken["time_ns"] // 10**9 <= warnings[0]["time_ns"] // 10**9 <= back["time_ns"] // 10**9
    logs = [e for e in history(store, "history", "deploy/shop/web", "--logs") if e["kind"] == "log"]
    assert len({e["name"] for e in logs}) >= 3 and all("served request" in e["message"] for e in logs)


def test_who_read_the_secret(store: Path) -> None:
    entries = history(store, "who", "system:serviceaccount:shop:reader")
    # The read, and right after it the alert Falco's rules raise for it (the detect filter in
    # ingest.conf ran them on the recorded audit log).
    assert [(e["kind"], e["verb"], e["resource"], e["name"], e.get("code") or e.get("rule")) for e in entries] == [
        ("audit", "get", "secrets", "db-credentials", 200),
        ("alert", "get", "secrets", "db-credentials", "K8s Secret Get Successfully"),
    ]
    read, alert = entries
    assert alert["priority"] == "Error" and alert["trigger_id"] == read["id"]
    assert alert["audit_id"] == read["audit_id"] and alert["stage"] == "ResponseComplete"
    assert "user=system:serviceaccount:shop:reader secret=db-credentials" in alert["output"]
    denied = history(store, "search", "--code", "403")
    # The refused request and the two alerts it fired (their output prints resp=403).
    assert [(e["kind"], e["user"], e["verb"], e["resource"], e["name"]) for e in denied] == [
        ("audit", "norbac", "delete", "deployments", "web"),
        ("alert", "norbac", "delete", "deployments", "web"),
        ("alert", "norbac", "delete", "deployments", "web"),
    ]
    assert {e.get("rule") for e in denied[1:]} == {"Disallowed K8s User", "K8s Request Forbidden"}


def test_alerts_of_the_story(store: Path) -> None:
    alerts = history(store, "search", "--kind", "alert", "--priority", "warning")
    assert [(e["rule"], e["priority"], e["user"]) for e in alerts] == [
        ("Create Disallowed Namespace", "Warning", "admin"),
        ("K8s Secret Get Successfully", "Error", "system:serviceaccount:shop:reader"),
        ("Disallowed K8s User", "Warning", "norbac"),
        ("K8s Request Forbidden", "Warning", "norbac"),
    ]
    # Each names the record that fired it (its object and user are that record's).
    assert all(e["trigger"]["user"] == e["user"] and e["trigger"]["verb"] == e["verb"] for e in alerts)
    assert history(store, "search", "--rule", "K8s Deployment Created")[0]["name"] == "web"
    text = CliRunner().invoke(main, ["history", "deploy/shop/web", "--store", str(store)]).output.splitlines()
    refused = next(i for i, line in enumerate(text) if "delete deployments/shop/web by norbac" in line)
    assert "ALERT  Warning " in text[refused + 1] and "ALERT  Warning " in text[refused + 2]


def test_scripts_run_without_arguments(tmp_path: Path) -> None:
    if shutil.which("strace") is None:
        required.unavailable("no strace to see which files scripts/run opens")
    trace = tmp_path / "trace"
    # scripts/run begins with scripts/setup, which (re)builds the environment when the
    # project's requirements or native code changed; done here first, so that the trace shows
    # what running kubetrail reads (setup's second pass finds everything in place).
    subprocess.run([str(REPO / "scripts" / "setup")], check=True, capture_output=True, timeout=900)
    shutil.rmtree(REPO / ".kubetrail", ignore_errors=True)
    env = {**os.environ, "KUBETRAIL_UI_PORT": "0"}
    env.pop("KUBETRAIL_EXAMPLES", None)
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=open,openat,execve", "-o", str(trace), str(REPO / "scripts" / "run")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    out = []
    url = None
    deadline = time.monotonic() + scaled(240)
    for line in proc.stdout:
        out.append(line)
        match = re.search(r"kubetrail ui: (http://\S+)", line)
        if match:
            url = match.group(1)
            break
        assert time.monotonic() < deadline
    try:
        assert url, "".join(out) + (proc.stderr.read() if proc.poll() is not None else "")  # type: ignore[union-attr]
        text = "".join(out)
        assert "# deployments/shop/web:" in text
        assert "create deployments/shop/web by admin" in text
        assert "~ /spec/template/spec/containers/0/image: localhost/busybox:latest -> localhost/busybox:1.37" in text
        page = urllib.request.urlopen(url, timeout=scaled(10)).read().decode()
        assert "<title>kubetrail" in page
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert (REPO / ".kubetrail" / "store.db").exists()
    # Nothing outside the repository but the system's own files (the interpreter, libraries,
    # /etc, /proc, the browser-less tools the shell runs): no ../shared, no home directory.
    base = Path(sys.base_prefix)  # the interpreter's installation (pyenv's, here) is the system's
    toolchain = str(base.parents[1] if base.parent.name == "versions" else base)
    opened = set()
    for line in trace.read_text().splitlines():
        match = re.search(r'(?:open|openat|execve)\((?:AT_FDCWD, )?"([^"]+)"', line)
        if match and "ENOENT" not in line:
            opened.add(match.group(1))
    outside = sorted(
        p
        for p in opened
        if p.startswith("/")
        and not p.startswith(str(REPO))
        and not p.startswith(("/usr/", "/lib", "/etc/", "/proc/", "/dev/", "/sys/", "/bin/", "/tmp/", "/var/tmp/"))
        and not p.startswith(("/var/lib/dpkg/", toolchain))
        and p not in ("/etc", "/usr", "/")
    )
    assert outside == [], outside
    assert not [p for p in opened if p.startswith(str(REPO.parent / "shared"))]
