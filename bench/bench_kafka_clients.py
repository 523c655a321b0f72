"""Which Python Kafka client the ``kafka`` output uses: confluent-kafka or aiokafka, measured.

Both produce the same N audit-sized JSON records (about 1 KB, a key per object) into a fresh
6-partition topic with the guarantees the output needs (``acks=all``, the idempotent producer,
waiting for every delivery report), and the script prints records/s and CPU-seconds per 100k
records of this process (the client's own threads included). Run against a cluster from
``python -m tests.servers kafka up DIR``::

    KAFKA_BOOTSTRAP=... python bench/bench_kafka_clients.py [N]

aiokafka is not a kubetrail dependency: install it into a scratch venv to repeat the comparison.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import time
import uuid

import orjson


def records(count: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(count):
        body = {
            "kind": "Event",
            "apiVersion": "audit.k8s.io/v1",
            "level": "Metadata",
            "auditID": str(uuid.UUID(int=i)),
            "stage": "ResponseComplete",
            "requestURI": f"/api/v1/namespaces/shop/pods/web-{i % 500}",
            "verb": "get",
            "user": {"username": "system:serviceaccount:shop:web", "groups": ["system:serviceaccounts"]},
            "sourceIPs": ["10.0.0.1"],
            "userAgent": "kubectl/v1.36.0 (linux/amd64) kubernetes/abcdef",
            "objectRef": {"resource": "pods", "namespace": "shop", "name": f"web-{i % 500}", "apiVersion": "v1"},
            "responseStatus": {"metadata": {}, "code": 200},
            "requestReceivedTimestamp": "2026-12-05T03:00:00.000000Z",
            "stageTimestamp": "2026-12-05T03:00:00.001000Z",
            "annotations": {"authorization.k8s.io/decision": "allow", "authorization.k8s.io/reason": "RBAC" * 40},
        }
        out.append((f"shop/web-{i % 500}".encode(), orjson.dumps(body)))
    return out


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def create_topic(bootstrap: str) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    name = f"bench-clients-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, 6)])[name].result(60)
    time.sleep(2)
    return name


def confluent(bootstrap: str, topic: str, data: list[tuple[bytes, bytes]]) -> None:
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    failed = []

    def report(err: object, _msg: object) -> None:
        if err is not None:
            failed.append(err)

    for key, value in data:
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(120)
    assert not failed, failed[:3]


async def aiokafka_run(bootstrap: str, topic: str, data: list[tuple[bytes, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in data]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def main() -> None:
    bootstrap = os.environ["KAFKA_BOOTSTRAP"]
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    data = records(count)
    size = sum(len(v) for _, v in data) / count
    print(f"{count} records of {size:.0f} bytes, acks=all, idempotent, 6 partitions")
    for name in ("confluent-kafka", "aiokafka"):
        topic = create_topic(bootstrap)
        started, cpu_before = time.perf_counter(), cpu()
        if name == "confluent-kafka":
            confluent(bootstrap, topic, data)
        else:
            asyncio.run(aiokafka_run(bootstrap, topic, data))
        wall, used = time.perf_counter() - started, cpu() - cpu_before
        print(f"{name:16} {count / wall:9.0f} records/s  {used / count * 100_000:6.2f} CPU-s/100k  wall {wall:.1f}s")


if __name__ == "__main__":
    main()
