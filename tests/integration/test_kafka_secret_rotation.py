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
from collections.abc import Callable, Iterator
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

from tests.integration.kubetrail_proc import KubetrailProcess, file_output, read_records, wait_for
from tests.integration.rotation import (
    append_lines,
    assert_exactly_once,
    config_section,
    output_section,
    service,
    stops_cleanly,
    tail_input,
)
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


def sasl_options(volume: Path) -> tuple[str, ...]:
    return (
        "rdkafka.security.protocol SASL_PLAINTEXT",
        "rdkafka.sasl.mechanisms SCRAM-SHA-256",
        f"rdkafka.sasl.username ${{file:{volume}/username}}",
        f"rdkafka.sasl.password ${{file:{volume}/password}}",
    )


def new_topic(cluster: kafka.KafkaCluster) -> str:
    name = f"rot-{uuid.uuid4().hex[:10]}"
    cluster.create_topic(name, 1)
    return name


def rotate(
    cluster: kafka.KafkaCluster,
    volume: Path,
    users: tuple[str, str],
    send: Callable[[int], None],
    count: Callable[[], int],
    done: str,
) -> None:
    """200 records as ``users[0]``; the volume swapped to ``users[1]`` and ``users[0]`` deleted at
    the broker; 200 more. Then a wrong password in the file holds the next 100 back (past several
    re-authentications) until the right one lets them through. ``done``: "as" or "read as"."""
    old, new = users
    send(200)
    wait_for(lambda: count() >= 200, 90, f"200 records {done} {old}")
    secret_volume(volume, {"username": new, "password": "b-pw"})
    set_user(cluster, old, None)  # revoked: a connection still on it fails its re-authentication
    time.sleep(REAUTH_MS / 1000 * 2)
    send(200)
    wait_for(lambda: count() >= 400, 90, f"200 more records {done} {new}")
    secret_volume(volume, {"username": new, "password": "wrong-password"})
    time.sleep(REAUTH_MS / 1000 * 2)  # every connection has re-authenticated (and failed) by now
    send(100)
    time.sleep(REAUTH_MS / 1000 * 2)
    assert count() == 400, "records got through with a wrong password in the file"
    secret_volume(volume, {"username": new, "password": "b-pw"})
    wait_for(lambda: count() >= 500, 90, "the held records once the password is right again")


def test_output_rotates_sasl_users_exactly_once(cluster: kafka.KafkaCluster, tmp_path: Path) -> None:
    set_user(cluster, "out-a", "a-pw")
    set_user(cluster, "out-b", "b-pw")
    topic = new_topic(cluster)
    volume = secret_volume(tmp_path / "secret", {"username": "out-a", "password": "a-pw\n"})
    log = tmp_path / "in.log"
    log.touch()
    proc = KubetrailProcess(
        tmp_path / "kt",
        service("scheduler.base 0.5", "scheduler.cap 2")
        + tail_input(log, "parser json")
        + output_section("kafka", f"brokers {cluster.bootstrap_sasl}", f"topics {topic}", *sasl_options(volume)),
    ).start()
    sent = 0

    def send(count: int) -> None:
        nonlocal sent
        append_lines(log, sent, count)
        sent += count

    def in_topic() -> int:
        return len(read_topic(cluster, topic, 0, timeout=3))

    with stops_cleanly(proc):
        rotate(cluster, volume, ("out-a", "out-b"), send, in_topic, "as")
    messages = read_topic(cluster, topic, 500)
    assert_exactly_once((orjson.loads(m.value())["n"] for m in messages), 500)
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

    def send(count: int) -> None:
        nonlocal sent
        for i in range(sent, sent + count):
            producer.produce(topic, orjson.dumps({"n": i}))
        producer.flush(30)
        sent += count

    volume = secret_volume(tmp_path / "secret", {"username": "in-a", "password": "a-pw"})
    out = tmp_path / "out"
    proc = KubetrailProcess(
        tmp_path / "kt",
        service()
        + config_section(
            "INPUT",
            "kafka",
            "tag kafka",
            f"brokers {cluster.bootstrap_sasl}",
            f"topics {topic}",
            f"group_id rotation-{uuid.uuid4().hex[:6]}",
            "format json",
            "poll_ms 200",
            *sasl_options(volume),
        )
        + file_output(out),
    ).start()

    def consumed() -> int:
        return len(read_records(out / "out.jsonl"))

    with stops_cleanly(proc):
        rotate(cluster, volume, ("in-a", "in-b"), send, consumed, "read as")
    assert_exactly_once((r["payload"]["n"] for r in read_records(out / "out.jsonl")), 500)
    output = proc.log()
    assert "SASL credentials changed" in output
    assert output.count("partitions assigned") == 1, "a credential change must not rebalance the group"
