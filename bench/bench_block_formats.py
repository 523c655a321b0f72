"""Benchmark: a user's json parser's blocks formatted by the file output's writers, in-process.

The part of ``bench_user_configs.py``'s format rows that differs between formats, without the
child process, the tail and the disk: each 1 MB block of the cached ``gen_audit.py`` lines goes
through the ``audit_time`` parser (``time_key stageTimestamp``, ``time_format
%Y-%m-%dT%H:%M:%S.%LZ``, ``time_keep off``) and is written to ``/dev/null`` as ``plain`` (the
validated block as it is: the baseline, measured in the same run) or by the native
``csv``/``ltsv`` writer (``FieldsWriter``, with the member spans the parser's scan kept). CPU
seconds, the best of ``--repeat`` rounds, each format in turn within a round.

    .venv/bin/python bench/bench_block_formats.py [--lines 300000] [--repeat 7]

With ``PYTHONPATH`` set to another checkout (and its native module), the same for that tree.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import kubetrail_native

from _common import audit_lines_file
from kubetrail.parsers.json_parser import JsonParser
from kubetrail.sinks.json_format import times_bytes

FORMATS = ("plain", "csv", "ltsv")


def blocks_of(data: bytes, size: int = 1 << 20) -> list[bytes]:
    """``data`` in blocks of whole lines of about ``size`` bytes, as the tail reads them."""
    blocks, at = [], 0
    while at < len(data):
        end = data.rfind(b"\n", at, at + size) + 1 or len(data)
        blocks.append(data[at:end])
        at = end
    return blocks


def run(fmt: str, blocks: list[bytes], parser: JsonParser, null: int, writers: dict[str, Any]) -> float:
    """CPU seconds to validate and write every block in ``fmt``."""
    start = time.process_time()
    for block in blocks:
        lazy = parser.line_block(block, "audit")
        assert lazy is not None
        lazy.keep_members = fmt != "plain"  # as the file output asks before validation
        data = lazy.data()
        assert data is not None and lazy.times is not None, "the audit lines are one block each"
        if fmt == "plain":
            os.write(null, data)
            continue
        extra = (lazy.members,) if lazy.members is not None else ()
        left = writers[fmt].write(null, data, times_bytes(lazy.times), 0, *extra)
        assert left is None, "every audit line is written natively"
    return time.process_time() - start


def main() -> int:
    parser_args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser_args.add_argument("--lines", type=int, default=300_000)
    parser_args.add_argument("--repeat", type=int, default=7)
    args = parser_args.parse_args()
    blocks = blocks_of(audit_lines_file(args.lines).read_bytes())
    parser = JsonParser("audit_time", time_key="stageTimestamp", time_format="%Y-%m-%dT%H:%M:%S.%LZ")
    writers = {
        name: kubetrail_native.FieldsWriter(kind, delimiter, b":", [])
        for name, kind, delimiter in (
            ("csv", 0, b","),
            ("ltsv", 1, b"\t"),
        )
    }
    null = os.open(os.devnull, os.O_WRONLY)
    best = dict.fromkeys(FORMATS, float("inf"))
    for _ in range(args.repeat):
        for fmt in FORMATS:
            best[fmt] = min(best[fmt], run(fmt, blocks, parser, null, writers))
    print(f"{args.lines:,} audit lines in {len(blocks)} blocks; CPU seconds, best of {args.repeat} rounds")
    for fmt in FORMATS:
        print(f"{fmt:6} {best[fmt]:.3f} s  {best[fmt] / best['plain']:.2f}x plain")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
