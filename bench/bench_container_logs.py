"""Benchmark: container logs (tail + multiline.parser cri -> file), with and without the
``kubernetes`` filter.

    .venv/bin/python bench/bench_container_logs.py throughput [--lines 1000000]
    .venv/bin/python bench/bench_container_logs.py cluster    [--pods 500 --lines-per-pod 5 --filter-lines 1000000]

throughput  LINES CRI lines (5% of messages cut into P + F pieces, stdout and stderr
            interleaved) in one file -> tail -> file (format plain, fsync per batch), as a child
            process: lines/s over wall time and per CPU second. Target: >= 150,000 lines/s on one
            core. ``--variants cri,docker,docker_cri,docker_cri_on_docker --rounds 3``: also the
            same messages as docker json-file lines (``multiline.parser docker``) and Fluent Bit's
            Helm chart default ``multiline.parser docker, cri`` on the CRI file and on the docker
            file, alternating, each with its ratio to the ``cri`` row of the same round.
cluster     starts a local control plane; PODS pods on one (fake) node; PODS files of
            LINES_PER_POD lines -> tail + kubernetes filter -> file. Reports the requests the
            collector user sent, by verb and resource, from the API server's audit log (target: a
            constant number of lists and watches, no GET per pod), kubetrail's peak RSS, and then
            FILTER_LINES lines spread over the same pods through the filter: lines/s (target
            >= 80,000). ``--json-logs --rounds R``: the messages written as JSON objects (as
            structured loggers do), through the filter with ``merge_log off`` and with ``merge_log
            on`` (Fluent Bit's Helm chart default, and this chart's), taking turns: what merging
            costs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import CACHE, REPO, cpu_count_hint, measure, medians_against

sys.path.insert(0, str(REPO / "cluster"))
from localcluster import LocalCluster

STAMP = "2024-05-01T12:00:{:02d}.{:09d}Z"
NODE = "bench-node"
NS = "bench"


def cri_lines(count: int, seed: int = 1, json_logs: bool = False) -> list[bytes]:
    """``count`` messages as CRI lines: ~100 bytes each, 5% cut in two pieces; ``json_logs``:
    each message a JSON object with the same fields."""
    rnd = random.Random(seed)
    out: list[bytes] = []
    for n in range(count):
        stamp = STAMP.format((n // 20_000) % 60, (n * 7919) % 1_000_000_000)
        stream = "stderr" if n % 7 == 0 else "stdout"
        if json_logs:
            message = (
                f'{{"level":"info","msg":"request handled","path":"/api/v{n % 3}/items/{n}","status":200,'
                f'"took":{rnd.random():.4f}}}'
            )
        else:
            message = (
                f'level=info msg="request handled" path=/api/v{n % 3}/items/{n} status=200 took={rnd.random():.4f}'
            )
        if n % 20 == 0:
            half = len(message) // 2
            out.append(f"{stamp} {stream} P {message[:half]}\n".encode())
            out.append(f"{stamp} {stream} F {message[half:]}\n".encode())
        else:
            out.append(f"{stamp} {stream} F {message}\n".encode())
    return out


def docker_lines(count: int) -> list[bytes]:
    """:func:`cri_lines`' messages as docker's json-file writes them (a piece without ``\\n``)."""
    out: list[bytes] = []
    for line in cri_lines(count):
        stamp, stream, flag, message = line.rstrip(b"\n").split(b" ", 3)
        log = message.decode() + ("\n" if flag == b"F" else "")
        out.append(
            json.dumps({"log": log, "stream": stream.decode(), "time": stamp.decode()}, separators=(",", ":")).encode()
            + b"\n"
        )
    return out


def cri_file(count: int, docker: bool = False) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / f"{'docker' if docker else 'cri'}-{count}.log"
    if not target.exists():
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(b"".join(docker_lines(count) if docker else cri_lines(count)))
        tmp.rename(target)
    return target


OUTPUT = """
[OUTPUT]
    name   file
    match  *
    path   {out}
    file   out.jsonl
    format plain
"""


# --variants: (docker file?, multiline.parser)
VARIANTS = {
    "cri": (False, "cri"),
    "docker": (True, "docker"),
    "docker_cri": (False, "docker, cri"),
    "docker_cri_on_docker": (True, "docker, cri"),
}


def tail_section(path: str, db: Path | None = None, parsers: str = "cri") -> str:
    return f"""
[SERVICE]
    log_level warn
[INPUT]
    name             tail
    path             {path}
    tag              kube.*
    read_from_head   on
    exit_on_eof      on
    multiline.parser {parsers}
    {"db " + str(db) if db else ""}
"""


def count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def run_kubetrail(config_text: str, work: Path) -> tuple[float, float, float, int]:
    config = work / "bench.conf"
    config.write_text(config_text)
    out = work / "out.jsonl"
    out.unlink(missing_ok=True)
    m = measure([sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)])
    if m.returncode:
        raise SystemExit(f"kubetrail failed: rc={m.returncode}")
    return m.wall, m.cpu, m.max_rss_mb, count_lines(out)


def bench_throughput(args: argparse.Namespace) -> None:
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    work = Path(tempfile.mkdtemp(prefix="kubetrail-bench-"))
    results: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
    try:
        for round_no in range(args.rounds):
            for variant in variants:
                docker, parsers = VARIANTS[variant]
                src = cri_file(args.lines, docker)
                if round_no == 0:
                    size = src.stat().st_size / 1e6
                    print(f"{variant}: {args.lines:,} messages, {size:.0f} MB, multiline.parser {parsers}")
                config = tail_section(str(src), parsers=parsers) + OUTPUT.format(out=work)
                wall, cpu, rss, written = run_kubetrail(config, work)
                if written != args.lines:
                    raise SystemExit(f"{variant}: wrote {written} records, expected {args.lines}")
                results[variant].append((wall, cpu, rss))
        print(f"({cpu_count_hint()}; {args.rounds} rounds, variants alternating; medians)")
        base = statistics.median(c for _, c, _ in results[variants[0]])
        for variant, rows in results.items():
            wall = statistics.median(w for w, _, _ in rows)
            cpu = statistics.median(c for _, c, _ in rows)
            rss = max(r for _, _, r in rows)
            print(
                f"tail + {variant:<20} -> file: {args.lines / wall:>9,.0f} lines/s wall, "
                f"{args.lines / cpu:>9,.0f} lines/CPU-s, wall {wall:.2f} s, cpu {cpu:.2f} s "
                f"({cpu / base:.2f}x {variants[0]}'s CPU), peak RSS {rss:.1f} MB"
            )
            print(f"  target >= 150,000 lines/s on one core: {'PASS' if args.lines / cpu >= 150_000 else 'MISS'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pod_file_name(i: int) -> tuple[str, str]:
    cid = f"{i:064x}"
    return f"pod-{i}", f"pod-{i}_{NS}_app-{cid}.log"


def audit_counts(cluster: LocalCluster, since: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    audit = Path(cluster.audit_log_path)
    for path in [audit, *sorted(audit.parent.glob(audit.stem + "-*"))]:
        if not path.exists() or path.suffix == ".gz":
            continue
        for line in path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            user = (event.get("user") or {}).get("username", "")
            if "collector" not in user or event.get("stage") not in ("ResponseComplete", "ResponseStarted"):
                continue
            if event.get("stage") == "ResponseComplete" and event.get("verb") == "watch":
                continue  # a watch is logged at ResponseStarted and again at its end: count once
            if event.get("requestReceivedTimestamp", "") < since:
                continue
            ref = event.get("objectRef") or {}
            counts[f"{event['verb']} {ref.get('resource')}"] += 1
    return counts


def bench_cluster(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="kubetrail-bench-"))
    cluster = LocalCluster.up(work / "cluster", log=open(os.devnull, "w"))  # noqa: SIM115
    try:
        api = cluster.client("admin")
        api.post("/api/v1/namespaces", {"metadata": {"name": NS, "labels": {"team": "bench"}}})
        started = time.time()
        for i in range(args.pods):
            name, _ = pod_file_name(i)
            body = {
                "metadata": {"name": name, "labels": {"app": "bench", "i": str(i)}, "annotations": {"a": "b"}},
                "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "example.com/app:1"}]},
            }
            resp = api.post(f"/api/v1/namespaces/{NS}/pods", body)
            assert resp.status == 201, resp
        print(f"{args.pods} pods created in {time.time() - started:.1f} s ({cpu_count_hint()})")
        logs = work / "containers"
        logs.mkdir()
        lines = cri_lines(args.lines_per_pod)
        for i in range(args.pods):
            (logs / pod_file_name(i)[1]).write_bytes(b"".join(lines))
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 1))
        filt = f"""
[FILTER]
    name             kubernetes
    match            kube.*
    kube_url         {cluster.url}
    kube_ca_file     {cluster.ca_file}
    kube_token_file  {cluster.collector_token_file}
    kube_tag_prefix  kube{str(logs).replace("/", ".")}.
    node_name        {NODE}
    namespace_labels on
"""
        config = tail_section(f"{logs}/*.log") + filt + OUTPUT.format(out=work)
        wall, cpu, rss, written = run_kubetrail(config, work)
        time.sleep(1.0)  # the audit log is written asynchronously
        counts = audit_counts(cluster, since)
        enriched = sum(1 for line in (work / "out.jsonl").open("rb") if b'"pod_id"' in line)
        total = sum(1 for _ in range(args.pods) for line in lines if b" F " in line)  # messages, P pieces joined
        print(
            f"{args.pods} pods x {args.lines_per_pod} lines: {written} records ({enriched} with pod metadata, "
            f"expected {total}); wall {wall:.2f} s, cpu {cpu:.2f} s, peak RSS {rss:.1f} MB"
        )
        print("requests by the collector (audit log): " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
        gets = sum(v for k, v in counts.items() if k.startswith("get "))
        print(f"per-pod GETs: {gets}  ({'PASS' if gets == 0 else 'MISS'}: no GET per pod)")
        # Throughput through the filter: FILTER_LINES over the same pods' files.
        per_pod = max(1, args.filter_lines // args.pods)
        big = cri_lines(per_pod, seed=2, json_logs=args.json_logs)
        shutil.rmtree(logs)
        logs.mkdir()
        for i in range(args.pods):
            (logs / pod_file_name(i)[1]).write_bytes(b"".join(big))
        messages = sum(1 for line in big if b" F " in line) * args.pods
        wall, cpu, rss, written = run_kubetrail(config, work)
        print(
            f"tail + cri + kubernetes -> file: {written:,} records, {written / wall:,.0f} lines/s wall, "
            f"{written / cpu:,.0f} lines/CPU-s, peak RSS {rss:.1f} MB (expected {messages:,})"
        )
        print(f"target >= 80,000 lines/s: {'PASS' if written / cpu >= 80_000 else 'MISS'}")
        if args.json_logs:
            merge_log(config, work, messages, args.rounds)
    finally:
        cluster.down()
        shutil.rmtree(work, ignore_errors=True)


def merge_log(config: str, work: Path, messages: int, rounds: int) -> None:
    """The same JSON-logging pods through the filter with ``merge_log off`` and ``on``, taking
    turns; with it on every record must have the log's fields at its top level."""
    filt = "    namespace_labels on\n"
    results: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    for _ in range(rounds):
        for mode in results:
            text = config.replace(filt, filt + f"    merge_log        {mode}\n")
            wall, cpu, _rss, written = run_kubetrail(text, work)
            if written != messages:
                raise SystemExit(f"merge_log {mode}: {written} records, expected {messages}")
            if mode == "on":
                # merged: the member unescaped at the top level (inside ``log`` its quotes are escaped)
                merged = sum(1 for line in (work / "out.jsonl").open("rb") if b'"status":200' in line)
                if merged != messages:
                    raise SystemExit(f"merge_log on: {merged} of {messages} records have the log's fields merged")
            results[mode].append((wall, cpu))
    for mode, wall, cpu, wall_ratio, cpu_ratio in medians_against(results, "off"):
        print(
            f"JSON logs, merge_log {mode:<3}: {messages / wall:>9,.0f} lines/s wall ({wall_ratio:.2f}x),"
            f" {messages / cpu:>9,.0f} lines/CPU-s ({cpu_ratio:.2f}x CPU)   rounds (wall s):"
            f" {', '.join(f'{w:.2f}' for w, _ in results[mode])}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--lines", type=int, default=1_000_000)
    t.add_argument("--variants", default="cri", help=f"comma list of {', '.join(VARIANTS)} (the first is the baseline)")
    t.add_argument("--rounds", type=int, default=1)
    c = sub.add_parser("cluster")
    c.add_argument("--pods", type=int, default=500)
    c.add_argument("--lines-per-pod", type=int, default=5)
    c.add_argument("--filter-lines", type=int, default=1_000_000)
    c.add_argument("--json-logs", action="store_true", help="JSON messages, merge_log off against on")
    c.add_argument("--rounds", type=int, default=1, help="--json-logs: rounds of off and on, taking turns")
    args = parser.parse_args()
    if args.mode == "throughput":
        bench_throughput(args)
    else:
        bench_cluster(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
