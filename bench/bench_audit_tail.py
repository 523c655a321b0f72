"""Benchmark: audit log file -> tail (k8s_audit) -> [kubernetes_audit filter] -> file.

Same input, same run, two kubetrail child processes: tail alone, and tail plus the
``kubernetes_audit`` filter (flattening, secret redaction, in-memory dedupe). The figure that
matters is the cost of the filter as a share of tail-only throughput.

    .venv/bin/python bench/bench_audit_tail.py [--lines 1000000] [--repeat 3] [--without-dedupe]
        [--breakdown] [--python-scan] [--with-db] [--output-dir /dev/shm] [--cold]

``--with-db`` adds the filter with a ``db``: every delivered key is then stored (what one filter
fed by both the webhook and the tail needs to stay exact across a restart).

The file output fsyncs each group of queued batches, and the filter's flat keys nearly double
the bytes written, so on a disk-bound machine part of the filter's cost is the disk's;
``--output-dir /dev/shm`` (tmpfs) shows the CPU side alone. Before each run 2 GB are written
and deleted in the output directory, so that no variant pays for memory this VM had handed
back to its host (see ``_common.warm_free_memory``; ``--cold`` skips it).

The filter uses its native scan (kubetrail_native) when built; ``--python-scan`` adds a run
with the pure-Python scan for comparison.

Target (issue 5): normalisation plus redaction costs at most 30% of tail-only throughput.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from _common import Measured, audit_lines_file, audit_tail_config, cpu_count_hint, measure, warm_free_memory

FILTER = """[FILTER]
    name    kubernetes_audit
    match   *
    dedupe  {dedupe}
    native  {native}
    flatten {flatten}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument(
        "--without-dedupe", action="store_true", help="also run the filter with dedupe off (normalisation, redaction)"
    )
    parser.add_argument("--python-scan", action="store_true", help="also run the filter with its pure-Python scan")
    parser.add_argument("--with-db", action="store_true", help="also run the filter with a db (delivered keys stored)")
    parser.add_argument(
        "--breakdown", action="store_true", help="also run dedupe off + flatten off (the scan and redaction alone)"
    )
    parser.add_argument(
        "--output-dir",
        help="where the file output writes (default: the temp dir); /dev/shm takes the disk out of the figure",
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds of all variants; medians are compared")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="skip writing and deleting 2 GB before each run (see _common.warm_free_memory)",
    )
    args = parser.parse_args()
    src = audit_lines_file(args.lines)
    size_mb = src.stat().st_size / 1e6
    variants = [("tail only", ""), ("tail + filter", FILTER.format(dedupe="on", native="on", flatten="on"))]
    if args.without_dedupe:
        variants.append(("tail + filter, dedupe off", FILTER.format(dedupe="off", native="on", flatten="on")))
    if args.breakdown:
        variants.append(("  ... and flatten off", FILTER.format(dedupe="off", native="on", flatten="off")))
    if args.python_scan:
        variants.append(("tail + filter, python scan", FILTER.format(dedupe="on", native="off", flatten="on")))
    if args.with_db:
        with_db = FILTER.format(dedupe="on", native="on", flatten="on") + "    db      @WORK@/dedupe.db\n"
        variants.append(("tail + filter, db", with_db))
    runs: dict[str, list[Measured]] = {name: [] for name, _ in variants}
    sizes: dict[str, int] = {}
    # Rounds alternate the variants, and the median of each is compared: on a shared machine a
    # single run can be off by a fifth either way.
    for _ in range(args.repeat):
        for name, flt in variants:
            work = Path(tempfile.mkdtemp(prefix="kubetrail-bench-", dir=args.output_dir))
            try:
                config = work / "bench.conf"
                filters = flt.replace("@WORK@", str(work))
                config.write_text(audit_tail_config(src, work, parser="k8s_audit", filters=filters))
                if not args.cold:
                    warm_free_memory(work)
                m = measure([sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)])
                output = work / "audit.jsonl"
                written = sum(1 for _ in output.open("rb"))
                sizes[name] = output.stat().st_size
                if m.returncode or written != args.lines:
                    print(f"FAILED: {name}: rc={m.returncode}, {written} of {args.lines} records", file=sys.stderr)
                    return 1
                runs[name].append(m)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    where = args.output_dir or tempfile.gettempdir()
    print(
        f"input: {args.lines} audit lines, {size_mb:.0f} MB ({cpu_count_hint()}); output in {where}; "
        f"median of {args.repeat} rounds"
    )
    results = {name: sorted(ms, key=lambda m: m.wall)[len(ms) // 2] for name, ms in runs.items()}
    for name, m in results.items():
        walls = ", ".join(f"{x.wall:.2f}" for x in runs[name])
        print(
            f"{name:<28} {args.lines / m.wall:>10,.0f} records/s  wall {m.wall:6.2f} s ({walls})  "
            f"cpu {m.cpu:6.2f} s  peak RSS {m.max_rss_mb:6.1f} MB  written {sizes[name] / 1e6:,.0f} MB"
        )
    base = results["tail only"]
    for name in results:
        if name != "tail only":
            cost = 1 - base.wall / results[name].wall  # share of tail-only throughput lost
            cpu = results[name].cpu / base.cpu
            verdict = "PASS" if cost <= 0.30 else "MISS"
            print(
                f"{name}: filter cost {cost:.0%} of tail-only throughput (CPU {cpu:.2f}x tail only)   "
                f"target <= 30%: {verdict}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
