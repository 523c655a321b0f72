"""Benchmark: tail -> file with ``storage.type memory`` vs ``filesystem`` (sync normal and full).

The same audit JSON lines, the same pipeline (json parser, time from ``stageTimestamp``, file
output writing ``plain`` JSON lines with an fsync per batch); only the input's buffer differs.
All three run as child processes in the same run, so the ratios hold on a noisy machine.
Also prints the filesystem buffer's own write rate (MB/s of frames appended, measured from the
bytes that went through the buffer and the run's wall time, an underestimate since the same
run also parses and delivers).

    .venv/bin/python bench/bench_buffer.py [--lines 300000]

Baseline: ``storage.type memory``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from _common import audit_lines_file, audit_tail_config, cpu_count_hint, measure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=300_000)
    args = parser.parse_args()
    src = audit_lines_file(args.lines)
    size_mb = src.stat().st_size / 1e6
    variants = {
        "memory": ("", ""),
        "fs normal": ("    storage.path {storage}\n    storage.sync normal", "    storage.type filesystem"),
        "fs full": ("    storage.path {storage}\n    storage.sync full", "    storage.type filesystem"),
    }
    results = {}
    for name, (service, input_extra) in variants.items():
        work = Path(tempfile.mkdtemp(prefix="kubetrail-bench-buffer-"))
        try:
            config = work / "bench.conf"
            config.write_text(
                audit_tail_config(src, work, service=service.format(storage=work / "storage"), input_extra=input_extra)
            )
            m = measure([sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)])
            if m.returncode:
                print(f"FAILED: {name} rc={m.returncode}", file=sys.stderr)
                return 1
            written = sum(1 for _ in (work / "audit.jsonl").open("rb"))
            if written != args.lines:
                print(f"FAILED: {name} wrote {written} records, expected {args.lines}", file=sys.stderr)
                return 1
            leftover = list((work / "storage").glob("*/*.seg")) if (work / "storage").exists() else []
            if leftover:
                print(f"FAILED: {name} left {len(leftover)} undelivered segments", file=sys.stderr)
                return 1
            results[name] = m
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"input: {args.lines} audit lines, {size_mb:.0f} MB ({cpu_count_hint()})")
    base = results["memory"]
    for name, m in results.items():
        print(
            f"{name:<10} {args.lines / m.wall:>10,.0f} records/s  {size_mb / m.wall:6.1f} MB/s  wall {m.wall:6.2f} s  "
            f"cpu {m.cpu:6.2f} s  peak RSS {m.max_rss_mb:6.1f} MB  ratio vs memory {base.wall / m.wall:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
