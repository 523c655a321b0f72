"""Audit records end to end, with the API server's own audit log as the ground truth.

One real control plane whose audit webhook points at kubetrail's ``kubernetes_audit`` receiver
(mutual TLS: the API server presents a client certificate) and whose audit log (rotating at
1 MB, gzip-compressed backups) kubetrail also tails. The audit policy logs Secrets at
RequestResponse, so real secret values flow through and redaction is tested on real data.

kubetrail runs as a real process: webhook -> kubernetes_audit filter (dedupe db) -> file, and
tail(audit.log, k8s_audit) -> kubernetes_audit filter -> file. A kill -9 in the middle of the
workload checks the restart (tail offsets and dedupe keys from their dbs). For "sinks down" the
same config then runs inside the test process, on the same port and dbs, with both file sinks
wrapped to fail for a few seconds (as root, the filesystem cannot be made to refuse writes): the
receiver answers 503/429 and the real API server retries.

After a scripted workload (creates, updates, patches, deletes, RBAC denials, a watch, a Secret
written and read, an exec attempt), every (auditID, stage) of the log appears exactly once in
each output, and no secret value appears anywhere in them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetrail.core.config import load_config
from kubetrail.core.errors import RetryableError
from kubetrail.runtime.pipeline import Pipeline
from kubetrail.sources.kubernetes_audit import KubernetesAuditSource
from localcluster import KubeAPI, LocalCluster, pki
from localcluster.process import free_port
from tests.files import written_json_lines
from tests.timing import scaled

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
PLAIN = "kubetrail-plain-secret-7f3a"
B64_SOURCE = "kubetrail-b64-secret-91c2"
B64 = base64.b64encode(B64_SOURCE.encode()).decode()
PLAIN_AS_B64 = base64.b64encode(PLAIN.encode()).decode()  # how the API server returns stringData

POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
rules:
  - level: None
    nonResourceURLs: ["/healthz*", "/livez*", "/readyz*", "/version", "/version/"]
  - level: RequestResponse
    resources:
      - group: ""
        resources: ["secrets", "events", "serviceaccounts/token"]
  - level: Metadata
"""

# The two paths of the audit records into kubetrail: the webhook receiver and a tail of the log.
AUDIT_INPUTS = """
[SERVICE]
    grace     5
    log_level info
[INPUT]
    name           kubernetes_audit
    tag            audit.webhook
    listen         127.0.0.1
    port           {port}
    tls.crt_file   {dir}/receiver.crt
    tls.key_file   {dir}/receiver.key
    tls.ca_file    {dir}/ca.crt
    ack_timeout    3
[INPUT]
    name           tail
    tag            audit.file
    path           {audit_log}
    parser         k8s_audit
    read_from_head on
    rotate_wait    30
    db             {dir}/tail.db
"""
CONFIG = (
    AUDIT_INPUTS
    + """\
[FILTER]
    name  kubernetes_audit
    match audit.webhook
    db    {dir}/dedupe-webhook.db
[FILTER]
    name  kubernetes_audit
    match audit.file
    db    {dir}/dedupe-file.db
[OUTPUT]
    name   file
    match  audit.webhook
    path   {dir}/out
    file   webhook.jsonl
    format plain
[OUTPUT]
    name   file
    match  audit.file
    path   {dir}/out
    file   file.jsonl
    format plain
"""
)


class FlakySink:
    """Wraps a sink; while ``down`` is set every write fails as a network sink's would."""

    def __init__(self, inner: Any, down: threading.Event) -> None:
        self.inner, self.down = inner, down

    async def start(self) -> None:
        await self.inner.start()

    async def write(self, batch: Any) -> None:
        if self.down.is_set():
            raise RetryableError("sink down (test)")
        await self.inner.write(batch)

    async def close(self) -> None:
        await self.inner.close()


class InProcess:
    """The same kubetrail config, run in a thread of the test process, with flaky sinks."""

    def __init__(self, config: Path) -> None:
        self.down = threading.Event()
        self.pipeline = Pipeline(load_config(config))
        for runner in self.pipeline.runners:
            runner.sink = FlakySink(runner.sink, self.down)  # type: ignore[assignment]
            runner.backoff_base = 0.2
        self.loop = asyncio.new_event_loop()
        self.result: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.result.append(self.loop.run_until_complete(self.pipeline.run()))

    @property
    def source(self) -> KubernetesAuditSource:
        return self.pipeline.sources[0].instance  # type: ignore[no-any-return]

    def stop(self) -> int:
        self.loop.call_soon_threadsafe(self.pipeline.request_stop)
        self.thread.join(30)
        return self.result[0]


class Kubetrail:
    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(self.config)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def wait_listening(port: int, timeout: float = 20.0) -> None:
    import socket

    timeout = scaled(timeout)  # kubetrail's start on a loaded machine: see tests/timing.py
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"kubetrail did not listen on {port}")


def read_log(directory: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted(directory.iterdir()):
        opener: Any = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            records.extend(json.loads(line) for line in fh if line.strip())
    return records


def keys_of(records: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    return Counter((obj["auditID"], obj["stage"]) for obj in records)


@contextlib.contextmanager
def webhook_and_log_cluster(work: Path, binaries: Path, config_text: str, ca_name: str) -> Iterator[dict[str, Any]]:
    """kubetrail (a real process, ``config_text`` formatted with ``port``, ``dir`` and
    ``audit_log``) and a control plane whose API server sends its audit webhook to it (mutual
    TLS, certificates of a new CA ``ca_name``) and logs to ``audit_log`` (rotating at 1 MB,
    gzip backups) under :data:`POLICY`. Yields work, cluster, kubetrail, port and config."""
    ca = pki.make_ca(ca_name)
    pki.write_cert(work / "ca.crt", ca.cert)
    pki.serving_cert(ca, "kubetrail-receiver").write(work / "receiver.crt", work / "receiver.key")
    pki.issue(ca, "kube-apiserver", client=True).write(work / "apiserver.crt", work / "apiserver.key")
    (work / "policy.yaml").write_text(POLICY)
    (work / "out").mkdir()
    port = free_port(set())
    cluster_dir = work / "cluster"
    config = work / "kubetrail.conf"
    config.write_text(config_text.format(port=port, dir=work, audit_log=cluster_dir / "audit" / "audit.log"))
    kt = Kubetrail(config, work / "kubetrail.log")
    kt.start()  # before the cluster: the API server's first audit batches must find it
    wait_listening(port)
    cluster = LocalCluster.up(
        cluster_dir,
        bin_dir=binaries,
        controllers=False,
        webhook_url=f"https://127.0.0.1:{port}/audit",
        webhook_ca=str(work / "ca.crt"),
        webhook_client_cert=str(work / "apiserver.crt"),
        webhook_client_key=str(work / "apiserver.key"),
        audit_log_maxsize=1,
        audit_log_maxbackup=100,
        audit_log_compress=True,
        apiserver_extra_args=[f"--audit-policy-file={work / 'policy.yaml'}"],
    )
    try:
        yield {"work": work, "cluster": cluster, "kubetrail": kt, "port": port, "config": config}
    finally:
        cluster.down()
        if kt.proc is not None and kt.proc.poll() is None:
            kt.stop()


@pytest.fixture(scope="module")
def setup(control_plane_binaries: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("audit-e2e")
    with webhook_and_log_cluster(work, control_plane_binaries, CONFIG, "audit-e2e-ca") as env:
        yield env


def workload(api: KubeAPI, norbac: KubeAPI, ns: str, round_: int) -> None:
    """Creates, updates, patches, deletes, RBAC denials, a watch, a Secret written and read, exec."""
    assert api.post("/api/v1/namespaces", {"metadata": {"name": ns}}).status == 201
    cms = f"/api/v1/namespaces/{ns}/configmaps"
    for i in range(15):
        assert api.post(cms, {"metadata": {"name": f"cm-{i}"}, "data": {"k": "v" * 2000}}).status == 201
    for i in range(15):
        cm = api.get(f"{cms}/cm-{i}").json()
        cm["data"]["k"] = "w" * 2000
        assert api.put(f"{cms}/cm-{i}", cm).status == 200
        patch = api.request(
            "PATCH", f"{cms}/cm-{i}", {"data": {"p": str(round_)}}, content_type="application/merge-patch+json"
        )
        assert patch.status == 200, patch
    secrets = f"/api/v1/namespaces/{ns}/secrets"
    secret = {"metadata": {"name": "db"}, "stringData": {"password": PLAIN}, "data": {"token": B64}}
    assert api.post(secrets, secret).status == 201
    assert api.get(f"{secrets}/db").ok and api.get(secrets).ok
    patch = api.request(
        "PATCH",
        f"{secrets}/db",
        [{"op": "replace", "path": "/data/token", "value": B64}],
        content_type="application/json-patch+json",
    )
    assert patch.status == 200, patch
    # A patch whose body holds a number beyond a double beside a secret value: the API server
    # refuses it, and logs the body as sent. The scan reads the number, orjson does not: the
    # filter must still redact (it failed, and its whole batch went on unredacted).
    huge = b'{"stringData":{"password":"' + PLAIN.encode() + b'"},"metadata":{"labels":{"n":1e999}}}'
    refused = api.request("PATCH", f"{secrets}/db", huge, content_type="application/merge-patch+json")
    assert refused.status == 400 and b"1e999" in refused.body, refused
    assert norbac.get(secrets).status == 403
    assert norbac.post(cms, {"metadata": {"name": "nope"}}).status == 403
    pod = {
        "metadata": {"name": "web"},
        "spec": {"containers": [{"name": "web", "image": "nginx"}]},
    }
    assert api.post(f"/api/v1/namespaces/{ns}/pods", pod).status == 201
    exec_resp = api.request("POST", f"/api/v1/namespaces/{ns}/pods/web/exec", params={"command": "ls"})
    assert exec_resp.status >= 400  # no kubelet: refused, but audited
    with api.watch(cms, timeoutSeconds=1) as stream:
        stream.next()
    for i in range(15):
        assert api.delete(f"{cms}/cm-{i}").status == 200
    for _ in range(10):  # bulky responses push the log over 1 MB: rotation
        assert api.get(secrets).ok and api.get(cms).ok


def test_every_audit_record_exactly_once_from_webhook_and_log(setup: dict[str, Any]) -> None:
    cluster: LocalCluster = setup["cluster"]
    kt: Kubetrail = setup["kubetrail"]
    work: Path = setup["work"]
    api, norbac = cluster.client("admin"), cluster.client("norbac")
    stamp = int(time.time())

    workload(api, norbac, f"round-1-{stamp}", 1)

    # kill -9 in the middle of the next round's traffic, then restart
    killer = threading.Timer(1.0, kt.kill9)
    killer.start()
    workload(api, norbac, f"round-2-{stamp}", 2)
    killer.join()
    kt.start()
    wait_listening(setup["port"])
    workload(api, norbac, f"round-3-{stamp}", 3)
    assert kt.stop() == 0

    # sinks down: the receiver answers 503/429, the API server retries; then the sinks recover
    inproc = InProcess(setup["config"])
    wait_listening(setup["port"])
    inproc.down.set()
    workload(api, norbac, f"round-4-{stamp}", 4)
    time.sleep(4)
    inproc.down.clear()
    workload(api, norbac, f"round-5-{stamp}", 5)

    audit_dir = cluster.audit_log_path.parent
    backups = [p for p in audit_dir.iterdir() if p.suffix == ".gz"]
    assert backups, "the workload did not rotate the audit log"

    truth_records = read_log(audit_dir)
    truth = Counter((r["auditID"], r["stage"]) for r in truth_records)
    assert len(truth) == len(truth_records), "the API server's log itself has duplicates"
    webhook_out, file_out = work / "out" / "webhook.jsonl", work / "out" / "file.jsonl"

    def outputs() -> tuple[Counter[tuple[str, str]], Counter[tuple[str, str]]]:
        # one kill -9 above: each output may hold the fragment of one write it cut short
        return keys_of(written_json_lines(webhook_out, 1)), keys_of(written_json_lines(file_out, 1))

    deadline = time.monotonic() + scaled(60)  # a loaded machine: see tests/timing.py
    while time.monotonic() < deadline:
        webhook, tailed = outputs()
        if set(truth) <= set(webhook) and set(truth) <= set(tailed):
            break
        time.sleep(0.5)
    refused = dict(inproc.source.requests)
    assert inproc.stop() == 0
    webhook, tailed = outputs()
    for name, got in (("webhook", webhook), ("tail", tailed)):
        missing = [k for k in truth if got[k] == 0]
        repeated = {k: n for k, n in got.items() if n > 1}
        assert not missing, f"{name}: {len(missing)} of {len(truth)} records lost, e.g. {missing[:3]}"
        assert not repeated, f"{name}: {len(repeated)} records repeated, e.g. {list(repeated.items())[:3]}"

    assert refused.get(503, 0) + refused.get(429, 0) > 0, f"no pushback while the sinks were down: {refused}"
    everything = webhook_out.read_bytes() + file_out.read_bytes() + (work / "kubetrail.log").read_bytes()
    for value in (PLAIN, PLAIN_AS_B64, B64, B64_SOURCE):
        assert value.encode() not in everything, f"secret value {value} leaked into the output"
    # ...while the ground truth has them: the test would notice a leak
    truth_text = json.dumps(truth_records)
    assert PLAIN_AS_B64 in truth_text and B64 in truth_text
    flat = written_json_lines(webhook_out, 1)
    assert any(r.get("k8s.audit.redacted") and r.get("k8s.audit.resource") == "secrets" for r in flat)
    # The patches with 1e999 beside a secret value, in both outputs: the number as its text.
    expected = {"stringData": {"password": "[REDACTED]"}, "metadata": {"labels": {"n": "1e999"}}}
    for path in (webhook_out, file_out):
        bodies = [r.get("requestObject") for r in written_json_lines(path, 1)]
        huge = [body for body in bodies if "1e999" in json.dumps(body)]
        assert len(huge) >= 5 and all(body == expected for body in huge), f"{path.name}: {huge}"
    # the workload's kinds of traffic all arrived
    assert {"create", "update", "patch", "delete", "watch", "get", "list"} <= {r.get("k8s.audit.verb") for r in flat}
    assert any(r.get("k8s.audit.authz.decision") == "forbid" for r in flat)
    assert any(r.get("k8s.audit.subresource") == "exec" for r in flat)
    assert any(r.get("k8s.audit.stage") == "ResponseStarted" for r in flat)
