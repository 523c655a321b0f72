"""Both audit paths into ONE ``kubernetes_audit`` filter: each (auditID, stage) exactly once overall.

A user running the API server's audit webhook *and* a tail of its audit log for redundancy,
both matched by one ``kubernetes_audit`` filter with a ``db``, and one output. A real control
plane (its own, as in :mod:`test_audit`: webhook with mutual TLS to kubetrail, log rotating at
1 MB with gzip), kubetrail as a real process, a scripted burst of API activity with kubetrail
SIGKILLed in the middle of it (twice, at different points) and restarted. The API server's own
audit log is the ground truth: every (auditID, stage) it holds is delivered exactly once,
whichever path brought it, and no key is delivered twice.

The output is Fluent Bit's ``out_file`` format (``TAG: [TIME, RECORD]``), so a failure says
which paths each repeated key came by.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from localcluster import LocalCluster, pki
from localcluster.process import free_port
from tests.files import written_lines
from tests.integration.test_audit import POLICY, Kubetrail, read_log, wait_listening, workload

pytestmark = pytest.mark.cluster

CONFIG = """
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
[FILTER]
    name  kubernetes_audit
    match audit.*
    db    {dir}/dedupe.db
[OUTPUT]
    name   file
    match  audit.*
    path   {dir}/out
    file   audit.out
"""


@pytest.fixture
def setup(control_plane_binaries: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    work = tmp_path
    ca = pki.make_ca("audit-one-filter-ca")
    pki.write_cert(work / "ca.crt", ca.cert)
    pki.serving_cert(ca, "kubetrail-receiver").write(work / "receiver.crt", work / "receiver.key")
    pki.issue(ca, "kube-apiserver", client=True).write(work / "apiserver.crt", work / "apiserver.key")
    (work / "policy.yaml").write_text(POLICY)
    (work / "out").mkdir()
    port = free_port(set())
    cluster_dir = work / "cluster"
    config = work / "kubetrail.conf"
    config.write_text(CONFIG.format(port=port, dir=work, audit_log=cluster_dir / "audit" / "audit.log"))
    kt = Kubetrail(config, work / "kubetrail.log")
    kt.start()  # before the cluster: the API server's first audit batches must find it
    wait_listening(port)
    cluster = LocalCluster.up(
        cluster_dir,
        bin_dir=control_plane_binaries,
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
        yield {"work": work, "cluster": cluster, "kubetrail": kt, "port": port}
    finally:
        cluster.down()
        if kt.proc is not None and kt.proc.poll() is None:
            kt.stop()


def delivered(path: Path) -> dict[tuple[str, str], list[str]]:
    """(auditID, stage) -> the tags of its copies in the output, from ``TAG: [TIME, RECORD]`` lines."""
    out: dict[tuple[str, str], list[str]] = {}
    for line in written_lines(path):
        tag, _, rest = line.partition(b": ")
        record = orjson.loads(rest)[1]
        out.setdefault((record["auditID"], record["stage"]), []).append(tag.decode())
    return out


def burst(cluster: LocalCluster, prefix: str, round_: int, clients: int = 3) -> None:
    """``clients`` copies of the scripted workload at once (each its own namespace and clients)."""
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            workload(cluster.client("admin"), cluster.client("norbac"), f"{prefix}-{index}", round_)
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def killed_in(kt: Kubetrail, port: int, run: Any, after: float) -> None:
    """``run()`` with kubetrail SIGKILLed ``after`` seconds into it, restarted once it returns."""
    killer = threading.Timer(after, kt.kill9)
    killer.start()
    run()
    killer.join()
    kt.start()
    wait_listening(port)


def test_webhook_and_log_into_one_filter_each_key_once_across_sigkill(setup: dict[str, Any]) -> None:
    cluster: LocalCluster = setup["cluster"]
    kt: Kubetrail = setup["kubetrail"]
    work: Path = setup["work"]
    port: int = setup["port"]
    stamp = int(time.time())

    burst(cluster, f"one-1-{stamp}", 1)
    # SIGKILL in the middle of a burst; then again soon after the restart, while the tail reads
    # what was logged meanwhile and the API server re-sends the webhook batches that failed.
    killed_in(kt, port, lambda: burst(cluster, f"one-2-{stamp}", 2), 1.0)
    killed_in(kt, port, lambda: burst(cluster, f"one-3-{stamp}", 3), 0.5)
    killed_in(kt, port, lambda: burst(cluster, f"one-4-{stamp}", 4), 2.0)
    burst(cluster, f"one-5-{stamp}", 5)

    audit_dir = cluster.audit_log_path.parent
    assert [p for p in audit_dir.iterdir() if p.suffix == ".gz"], "the workload did not rotate the audit log"
    truth_records = read_log(audit_dir)
    truth = Counter((r["auditID"], r["stage"]) for r in truth_records)
    assert len(truth) == len(truth_records), "the API server's log itself has duplicates"
    out = work / "out" / "audit.out"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not set(truth) <= set(delivered(out)):
        time.sleep(0.5)
    assert kt.stop() == 0
    got = delivered(out)

    missing = [key for key in truth if key not in got]
    repeated = {key: tags for key, tags in got.items() if len(tags) > 1}
    by_paths = Counter(" + ".join(sorted(tags)) for tags in repeated.values())
    assert not missing, f"{len(missing)} of {len(truth)} keys lost, e.g. {missing[:3]}"
    assert not repeated, (
        f"{len(repeated)} of {len(got)} keys delivered more than once (copies by path: {dict(by_paths)}), "
        f"e.g. {list(repeated.items())[:3]}"
    )
    # Both paths took part (the test would not notice a path that delivers nothing otherwise).
    paths = Counter(tags[0] for tags in got.values())
    assert paths["audit.webhook"] > 0 and paths["audit.file"] > 0, paths
