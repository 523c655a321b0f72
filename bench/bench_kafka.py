"""Benchmark: audit lines -> tail -> ``kafka`` output, then a group of 2 ``kafka`` inputs -> file.

One run, one real 3-broker Kafka 4.1.1 cluster (tests/servers/kafka.py, started and stopped
here), one 6-partition topic (replication factor 3, ``min.insync.replicas`` 2):

1. ``tail`` (json parser) of N audit lines -> ``kafka`` output (``acks=all``, idempotent): one
   kubetrail child process until ``exit_on_eof``; records/s, CPU-s per 100k records, peak RSS;
2. two ``kafka`` input members of one group -> ``file`` (plain JSON lines), until the two
   files together hold N records; records/s, CPU-s per 100k and peak RSS of each member;
3. the ceiling: Kafka's own ``kafka-producer-perf-test`` (``ProducerPerformance``, the same
   JVM tool the shell script runs) producing N records of the same average size into the same
   topic with the same ``acks=all`` and idempotence.

    .venv/bin/python bench/bench_kafka.py [--lines 1000000] [--workers 1]

Target (issue 20): the output reaches at least 60% of the perf-test ceiling.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, Measured, audit_lines_file, cpu_count_hint, measure

sys.path.insert(0, str(REPO))

from tests.servers import kafka

OUTPUT_CONFIG = """
[SERVICE]
    log_level warn
    grace 60
[INPUT]
    name tail
    path {src}
    tag audit
    read_from_head on
    exit_on_eof on
    parser json
[OUTPUT]
    name kafka
    match *
    brokers {brokers}
    topics {topic}
    workers {workers}
"""

INPUT_CONFIG = """
[SERVICE]
    log_level warn
    grace 10
[INPUT]
    name kafka
    tag audit
    brokers {brokers}
    topics {topic}
    group_id bench
    poll_ms 100
    format json
[OUTPUT]
    name file
    match *
    path {out}
    file audit.jsonl
    format plain
"""


def line_count(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def consume_with_group(work: Path, cluster: kafka.KafkaCluster, topic: str, total: int) -> tuple[float, list[Measured]]:
    procs = []
    outs = []
    started = time.perf_counter()
    for i in range(2):
        out = work / f"member{i}"
        out.mkdir()
        config = work / f"in{i}.conf"
        config.write_text(INPUT_CONFIG.format(brokers=cluster.bootstrap, topic=topic, out=out))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)],
                cwd=REPO,
                stderr=subprocess.DEVNULL,
            )
        )
        outs.append(out / "audit.jsonl")
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline and sum(line_count(o) for o in outs) < total:
        time.sleep(0.5)
    wall = time.perf_counter() - started
    measured = []
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        _, status, usage = os.wait4(proc.pid, 0)
        measured.append(
            Measured(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status))
        )
    print(f"  records per member: {[line_count(o) for o in outs]}")
    return wall, measured


def perf_test(cluster: kafka.KafkaCluster, topic: str, total: int, size: int) -> float:
    command = kafka.java_command(
        cluster.lib,
        kafka.PERF_TOOL,
        "--topic",
        topic,
        "--num-records",
        str(total),
        "--record-size",
        str(size),
        "--throughput",
        "-1",
        "--producer-props",
        f"bootstrap.servers={cluster.bootstrap}",
        "acks=all",
        "enable.idempotence=true",
        heap="512m",
    )
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=3600).stdout
    final = [line for line in out.splitlines() if "records sent" in line][-1]
    print(f"  perf test: {final.strip()}")
    match = re.search(r"([\d.]+) records/sec", final)
    assert match, final
    return float(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=1, help="the output's workers (groups in flight)")
    args = parser.parse_args()
    total = args.lines
    src = audit_lines_file(total)
    size = round(src.stat().st_size / total)
    print(f"{total} audit lines of {size} bytes on average; {cpu_count_hint()}")
    with tempfile.TemporaryDirectory(prefix="kubetrail-bench-kafka-") as tmp:
        work = Path(tmp)
        cluster = kafka.KafkaCluster(work / "kafka", brokers=3)
        cluster.start()
        try:
            topic = "bench-audit"
            cluster.create_topic(topic, 6)
            config = work / "out.conf"
            config.write_text(
                OUTPUT_CONFIG.format(src=src, brokers=cluster.bootstrap, topic=topic, workers=args.workers)
            )
            out = measure([sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)], cwd=REPO)
            assert out.returncode == 0, out
            out_rate = total / out.wall
            print(
                f"output: {out_rate:9.0f} records/s  {out.cpu / total * 100_000:6.2f} CPU-s/100k  "
                f"RSS {out.max_rss_mb:.0f} MB  (wall {out.wall:.1f}s)"
            )
            wall, members = consume_with_group(work, cluster, topic, total)
            cpu = sum(m.cpu for m in members)
            rss = ", ".join(f"{m.max_rss_mb:.0f}" for m in members)
            print(
                f"input (2 members): {total / wall:9.0f} records/s  {cpu / total * 100_000:6.2f} CPU-s/100k "
                f"(both)  RSS {rss} MB  (wall {wall:.1f}s)"
            )
            ceiling = perf_test(cluster, topic, total, size)
            print(f"ceiling (producer perf test): {ceiling:9.0f} records/s")
            print(f"output / ceiling: {out_rate / ceiling:.0%} (target >= 60%)")
            print(f"broker RSS MB: {', '.join(f'{r:.0f}' for r in cluster.rss_mb())}")
        finally:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
