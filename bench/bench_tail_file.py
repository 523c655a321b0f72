"""Benchmark: audit JSON lines -> tail (json parser, time from stageTimestamp) -> file.

Compared, in the same run, with a naive loop on the same file: read a line, ``orjson.loads``,
``orjson.dumps({"time": ..., **record})``, write. Both run as child processes so CPU and peak
RSS are measured the same way.

    .venv/bin/python bench/bench_tail_file.py [--lines 1000000]

Target (issue 2): at least 2x the naive loop's records/s, peak RSS at most 150 MB.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from _common import audit_lines_file, audit_tail_config, cpu_count_hint, measure, warm_free_memory

NAIVE = r"""
import sys, orjson
src, dst = sys.argv[1], sys.argv[2]
with open(src, "rb") as f, open(dst, "wb") as out:
    for line in f:
        record = orjson.loads(line)
        out.write(orjson.dumps({"time": record["stageTimestamp"], **record}))
        out.write(b"\n")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    args = parser.parse_args()
    src = audit_lines_file(args.lines)
    size_mb = src.stat().st_size / 1e6
    work = Path(tempfile.mkdtemp(prefix="kubetrail-bench-"))
    try:
        warm_free_memory(work)  # each run starts with memory this VM has not handed back to its host
        naive = measure([sys.executable, "-c", NAIVE, str(src), str(work / "naive.jsonl")])
        config = work / "bench.conf"
        config.write_text(audit_tail_config(src, work))
        warm_free_memory(work)
        ours = measure([sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)])
        if naive.returncode or ours.returncode:
            print(f"FAILED: naive rc={naive.returncode}, kubetrail rc={ours.returncode}", file=sys.stderr)
            return 1
        written = sum(1 for _ in (work / "audit.jsonl").open("rb"))
        if written != args.lines:
            print(f"FAILED: kubetrail wrote {written} records, expected {args.lines}", file=sys.stderr)
            return 1
        print(f"input: {args.lines} audit lines, {size_mb:.0f} MB ({cpu_count_hint()})")
        for name, m in (("naive loop", naive), ("kubetrail", ours)):
            print(
                f"{name:<11} {args.lines / m.wall:>10,.0f} records/s  wall {m.wall:6.2f} s  "
                f"cpu {m.cpu:6.2f} s  peak RSS {m.max_rss_mb:6.1f} MB"
            )
        ratio = naive.wall / ours.wall
        print(
            f"ratio (kubetrail / naive records/s): {ratio:.2f}x   target >= 2x, peak RSS <= 150 MB: "
            f"{'PASS' if ratio >= 2 and ours.max_rss_mb <= 150 else 'MISS'}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
