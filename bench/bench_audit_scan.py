"""Benchmark: the kubernetes_audit filter's scan of tail blocks, in this process, no pipeline.

Cuts ``--lines`` audit lines into 1 MiB blocks (as the tail reads them) and times, per line,
the native scan (``scan_block``), the native scan plus the new block (``build``), and the
pure-Python scan plus its block (the baseline, same input, same run). Best of ``--repeat``
rounds, on one thread unless ``--threads`` says otherwise.

    .venv/bin/python bench/bench_audit_scan.py [--lines 300000] [--threads 1] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from _common import audit_lines_file

BLOCK = 1024 * 1024


def blocks_of(data: bytes) -> list[bytes]:
    out: list[bytes] = []
    start = 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + BLOCK)
        if end < 0:
            break
        out.append(data[start : end + 1])
        start = end + 1
    return out


def best(run: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.process_time()
        run()
        times.append(time.process_time() - began)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=300_000)
    parser.add_argument("--threads", type=int, default=1, help="scan_threads of the native scan")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from kubetrail.transforms.kubernetes_audit import NativeScanner, _PyScan, _ScanOptions

    if NativeScanner is None:
        print("kubetrail_native is not built (scripts/setup builds it)", file=sys.stderr)
        return 1
    blocks = blocks_of(audit_lines_file(args.lines).read_bytes())
    lines = sum(block.count(b"\n") for block in blocks)
    native = NativeScanner([], [], True, [], True, args.threads)
    options = _ScanOptions(frozenset(), frozenset(), True, (), True)

    def scan() -> None:
        for block in blocks:
            native.scan_block(block)

    def scan_build() -> None:
        for block in blocks:
            native.scan_block(block).build()

    def python() -> None:
        for block in blocks:
            _PyScan(options, block.split(b"\n")[:-1]).build()

    figures = {
        "native scan": best(scan, args.repeat),
        "native scan + build": best(scan_build, args.repeat),
        "python scan + build (baseline)": best(python, max(1, args.repeat // 2)),
    }
    print(f"input: {lines} audit lines in {len(blocks)} blocks of up to 1 MiB; native scan_threads {args.threads}")
    baseline = figures["python scan + build (baseline)"]
    for name, cpu in figures.items():
        print(f"{name:32s} {cpu / lines * 1e9:7.0f} ns CPU a line   {baseline / cpu:5.2f}x the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
