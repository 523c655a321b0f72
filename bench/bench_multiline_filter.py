"""Benchmark: the ``multiline`` filter alone, its block path against its record path, in process.

    PYTHONPATH=. .venv/bin/python bench/bench_multiline_filter.py [--messages 240000] [--repeat 3]

The input is ``bench_user_configs.py``'s ``multiline`` row's (every 4th message a 3-line stack
trace; 420,000 lines, 23 MB) in 1 MB blocks as a tail with no parser hands them on
(``TextBlock``), through the ``app_trace`` ``[MULTILINE_PARSER]`` with ``buffer on``. Both paths
run in the same process and round: the block path (``kubetrail_native.LineRules``) and the
record path (the filter with its native rules switched off, fed the tail's records, as without
the native module). Each is timed as the filter plus what a ``plain`` file output then encodes
(the block's bytes, or ``json_bytes`` per record), best CPU seconds of ``--repeat``. Both must
give the same bytes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_user_configs import SERVICE, trace_file

from kubetrail.core.acks import AckToken
from kubetrail.core.block import TextBlock
from kubetrail.core.config import load_config
from kubetrail.core.record import Batch
from kubetrail.parsers.registry import ParserRegistry
from kubetrail.transforms.multiline import MultilineTransform
from tests.unit.helpers import build


def blocks_of(data: bytes, size: int = 1 << 20) -> list[tuple[int, bytes]]:
    """Whole lines of ``data`` in blocks of at most ``size`` bytes, with their offsets."""
    out, at = [], 0
    while at < len(data):
        end = data.rfind(b"\n", at, at + size) + 1
        out.append((at, data[at:end]))
        at = end
    return out


def run(parsers: ParserRegistry, blocks: list[tuple[int, bytes]], native: bool) -> tuple[float, bytes]:
    """CPU seconds of the filter and the plain encoding over every block, and the bytes."""
    filt = build(MultilineTransform, parsers=parsers, **{"multiline__parser": "app_trace", "buffer": "on"})
    if not native:
        filt.native = None
    batches = []
    for start, block in blocks:
        text = TextBlock(block, block.count(b"\n"), "bench", "log", 1, False)
        text.identity = ("uid", start)
        batch = Batch("bench", None, AckToken(lambda _delivered: None), len(block), block=text)
        if not native:
            batch.records  # noqa: B018 - the tail's records, made before the clock starts
        batches.append(batch)
    pieces: list[bytes] = []
    begin = time.process_time()
    for batch in batches:
        out, copies = filt.process_emitting(batch)
        for each in (out, *copies):
            if len(each):
                block = each.raw_block
                pieces.append(block if block is not None else b"".join(r.json_bytes() + b"\n" for r in each.records))
    return time.process_time() - begin, b"".join(pieces)


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--messages", type=int, default=240_000)
    args.add_argument("--repeat", type=int, default=3)
    options = args.parse_args()
    traces, _ = trace_file(options.messages)
    data = traces.read_bytes()
    config = Path(tempfile.mkdtemp(prefix="kubetrail-bench-")) / "multiline.conf"
    config.write_text(SERVICE)
    parsers = ParserRegistry()
    parsers.multiline_sections = list(load_config(config).multiline_parsers)  # type: ignore[attr-defined]
    shutil.rmtree(config.parent)
    blocks = blocks_of(data)
    best = {True: float("inf"), False: float("inf")}
    outputs: dict[bool, bytes] = {}
    for _ in range(options.repeat):
        for native in (True, False):  # alternating in each round
            seconds, outputs[native] = run(parsers, blocks, native)
            best[native] = min(best[native], seconds)
    if outputs[True] != outputs[False]:
        print("FAILED: the block path and the record path wrote different bytes")
        return 1
    lines = data.count(b"\n")
    records = outputs[True].count(b"\n")
    print(f"{lines:,} lines ({len(data) / 1e6:.0f} MB) -> {records:,} records, same bytes on both paths")
    print(f"block path:  {best[True]:.3f} s CPU (best of {options.repeat})")
    print(f"record path: {best[False]:.3f} s CPU (best of {options.repeat})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
