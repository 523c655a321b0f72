"""Kafka SASL/SCRAM credentials read from files that rotate, against the real broker.

A one-node KRaft cluster (``tests/servers/kafka.py``, from Maven Central) with
``connections.max.reauth.ms`` set: every connection re-authenticates (KIP-368) every few
seconds, so the broker checks again whatever credential the client holds, as a production
cluster that revokes credentials should. Users are created and revoked through the Admin API
(``alter_user_scram_credentials``).

The producer and the consumer get their new credentials with librdkafka's
``set_sasl_credentials`` (used from the next authentication; no new client, so no consumer group
rebalance and no new idempotent producer id). Each test: records before the swap as user A,
swap the Secret volume to user B and delete A at the broker, records after it; then a wrong
password in the file, which stops delivery until the file is fixed: proof that what the file
says is what reaches the broker. Every record is delivered exactly once, counted by its number.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import (
    AdminClient,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialDeletion,
    UserScramCredentialUpsertion,
)

from tests.files import written_lines
from tests.integration.kubetrail_proc import KubetrailProcess, wait_for
from tests.servers import kafka, running
from tests.unit.test_kafka import read_topic
from tests.unit.test_secrets import secret_volume

pytestmark = pytest.mark.slow

REAUTH_MS = 3000


class ReauthCluster(kafka.KafkaCluster):
    """The test cluster, with connections re-authenticated every REAUTH_MS."""

    def _properties(self, node: kafka.Node) -> str:
        return super()._properties(node) + f"connections.max.reauth.ms={REAUTH_MS}\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kafka.KafkaCluster]:
    with running(lambda: ReauthCluster(tmp_path_factory.mktemp("kafka-reauth"), brokers=1), "Kafka") as server:
        yield server


def set_user(cluster: kafka.KafkaCluster, user: str, password: str | None) -> None:
    """Create or change a SCRAM-SHA-256 user, or delete it (password None)."""
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
    change: Any
    if password is None:
        change = UserScramCredentialDeletion(user, ScramMechanism.SCRAM_SHA_256)
    else:
        change = UserScramCredentialUpsertion(
            user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, 4096), password.encode()
        )
    for future in admin.alter_user_scram_credentials([change]).values():
        future.result(timeout=30)


def sasl_options(volume: Path) -> str:
    return f"""    rdkafka.security.protocol SASL_PLAINTEXT
    rdkafka.sasl.mechanisms SCRAM-SHA-256
    rdkafka.sasl.username ${{file:{volume}/username}}
    rdkafka.sasl.password ${{file:{volume}/password}}
"""


def new_topic(cluster: kafka.KafkaCluster) -> str:
    name = f"rot-{uuid.uuid4().hex[:10]}"
    cluster.create_topic(name, 1)
    return name


def rotate_wrong_then_right(volume: Path, user: str, password: str, send: Any, count: Any, expected: int) -> None:
    """A wrong password in the file holds the next records back (past several re-authentications);
    the right one lets them through."""
    secret_volume(volume, {"username": user, "password": "wrong-password"})
    time.sleep(REAUTH_MS / 1000 * 2)  # every connection has re-authenticated (and failed) by now
    send()
    time.sleep(REAUTH_MS / 1000 * 2)
    assert count() == expected - 100, "records got through with a wrong password in the file"
    secret_volume(volume, {"username": user, "password": password})


def test_output_rotates_sasl_users_exactly_once(cluster: kafka.KafkaCluster, tmp_path: Path) -> None:
    set_user(cluster, "out-a", "a-pw")
    set_user(cluster, "out-b", "b-pw")
    topic = new_topic(cluster)
    volume = secret_volume(tmp_path / "secret", {"username": "out-a", "password": "a-pw\n"})
    log = tmp_path / "in.log"
    log.touch()
    proc = KubetrailProcess(
        tmp_path / "kt",
        f"""[SERVICE]
    flush 0.2
    grace 5
    log_level info
    scheduler.base 0.5
    scheduler.cap 2
[INPUT]
    name tail
    path {log}
    parser json
    read_from_head on
    refresh_interval 1
[OUTPUT]
    name kafka
    match *
    brokers {cluster.bootstrap_sasl}
    topics {topic}
{sasl_options(volume)}""",
    ).start()
    sent = 0

    def send(count: int = 100) -> None:
        nonlocal sent
        with log.open("a") as handle:
            handle.writelines(orjson.dumps({"n": i}).decode() + "\n" for i in range(sent, sent + count))
        sent += count

    def in_topic() -> int:
        return len(read_topic(cluster, topic, 0, timeout=3))

    try:
        send(200)
        wait_for(lambda: in_topic() >= 200, 90, "200 records as out-a")
        secret_volume(volume, {"username": "out-b", "password": "b-pw"})
        set_user(cluster, "out-a", None)  # revoked: a connection still on out-a fails its re-authentication
        time.sleep(REAUTH_MS / 1000 * 2)
        send(200)
        wait_for(lambda: in_topic() >= 400, 90, "200 more records as out-b")
        rotate_wrong_then_right(volume, "out-b", "b-pw", send, in_topic, 500)
        wait_for(lambda: in_topic() >= 500, 90, "the held records once the password is right again")
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    messages = read_topic(cluster, topic, 500)
    counts = Counter(orjson.loads(m.value())["n"] for m in messages)
    assert sorted(counts) == list(range(500)) and set(counts.values()) == {1}, "every record exactly once"
    output = proc.log()
    assert "SASL credentials changed" in output
    assert "Authentication failed" in output or "SASL authentication error" in output, output[-3000:]
    assert "b-pw" not in output and "a-pw" not in output


def test_input_rotates_sasl_users_without_rebalancing(cluster: kafka.KafkaCluster, tmp_path: Path) -> None:
    set_user(cluster, "in-a", "a-pw")
    set_user(cluster, "in-b", "b-pw")
    topic = new_topic(cluster)
    producer = Producer({"bootstrap.servers": cluster.bootstrap, "enable.idempotence": True})
    sent = 0

    def send(count: int = 100) -> None:
        nonlocal sent
        for i in range(sent, sent + count):
            producer.produce(topic, orjson.dumps({"n": i}))
        producer.flush(30)
        sent += count

    volume = secret_volume(tmp_path / "secret", {"username": "in-a", "password": "a-pw"})
    out = tmp_path / "out"
    proc = KubetrailProcess(
        tmp_path / "kt",
        f"""[SERVICE]
    flush 0.2
    grace 5
    log_level info
[INPUT]
    name kafka
    tag kafka
    brokers {cluster.bootstrap_sasl}
    topics {topic}
    group_id rotation-{uuid.uuid4().hex[:6]}
    format json
    poll_ms 200
{sasl_options(volume)}[OUTPUT]
    name file
    match *
    path {out}
    file out.jsonl
    format plain
    mkdir on
""",
    ).start()

    def consumed() -> int:
        path = out / "out.jsonl"
        return len([line for line in written_lines(path) if line.strip()]) if path.exists() else 0

    try:
        send(200)
        wait_for(lambda: consumed() >= 200, 90, "200 records read as in-a")
        secret_volume(volume, {"username": "in-b", "password": "b-pw"})
        set_user(cluster, "in-a", None)
        time.sleep(REAUTH_MS / 1000 * 2)
        send(200)
        wait_for(lambda: consumed() >= 400, 90, "200 more records read as in-b")
        rotate_wrong_then_right(volume, "in-b", "b-pw", send, consumed, 500)
        wait_for(lambda: consumed() >= 500, 90, "the held records once the password is right again")
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    records = [orjson.loads(line) for line in written_lines(out / "out.jsonl") if line.strip()]
    counts = Counter(r["payload"]["n"] for r in records)
    assert sorted(counts) == list(range(500)) and set(counts.values()) == {1}, "every record exactly once"
    output = proc.log()
    assert "SASL credentials changed" in output
    assert output.count("partitions assigned") == 1, "a credential change must not rebalance the group"
