"""Memory of a pipeline whose output is slower than its input (issue: "520 MB peak RSS").

``tail`` (read_from_head, exit_on_eof, the ``audit_json`` parser: ``format json`` with
``time_format``) reads the cached ``gen_audit.py`` file into a ``file`` output whose writes are
made slow on purpose (each write, of one batch or of a group, sleeps ``--delay`` seconds first), so the
input runs far ahead of the output unless something bounds it. Each variant runs in a child
process of its own that reports its own peak RSS (``VmHWM`` from ``/proc/self/status``) and
the largest undelivered bytes seen in the output's buffer: the
``ru_maxrss`` of ``wait4`` is not used, because Linux carries the parent's peak RSS into a
child's (``exec`` keeps ``signal->maxrss``), so a parent that once held 500 MB makes every
later child report at least 500 MB.

The ``batch_size 8M`` rows compare the output buffer bounded by batches only (16, as before
``MAX_BUFFER_BYTES``) with the default, which also bounds it by bytes, in the same rounds.

    .venv/bin/python bench/bench_slow_output.py --delay 0.1 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import audit_lines_file, audit_tail_config, cpu_count_hint


def vm(field: str) -> float:
    """A ``/proc/self/status`` memory field in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(src: Path, delay: float, input_extra: str, max_bytes: int) -> None:
    """One run in this process; prints a JSON line with what it measured."""
    from kubetrail.core.config import load_config
    from kubetrail.runtime.pipeline import Pipeline

    work = Path(tempfile.mkdtemp(prefix="kubetrail-slow-"))
    config = work / "bench.conf"
    config.write_text(audit_tail_config(src, work, input_extra=input_extra))
    pipeline = Pipeline(load_config(config))
    runner = pipeline.runners[0]
    if max_bytes:  # 0: the runner's default (MAX_BUFFER_BYTES)
        runner.max_bytes = max_bytes
    sink = runner.sink
    write_group = sink.write_group  # the file output's write is a group of one: all pass here

    async def slow_group(batches):  # type: ignore[no-untyped-def]
        await asyncio.sleep(delay)
        await write_group(batches)

    sink.write_group = slow_group
    peaks = {"buffered_mb": 0.0, "buffered_batches": 0, "rss_mb": 0.0}
    done = threading.Event()

    def sample() -> None:  # a thread: reads plain ints, never touches the loop
        while not done.wait(0.02):
            peaks["buffered_mb"] = max(peaks["buffered_mb"], runner._buffered_bytes / 2**20)
            peaks["buffered_batches"] = max(peaks["buffered_batches"], runner._buffered_batches)
            peaks["rss_mb"] = max(peaks["rss_mb"], vm("VmRSS"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    rc = asyncio.run(pipeline.run())
    done.set()
    sampler.join()
    out = work / "audit.jsonl"
    with out.open("rb") as handle:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    out.unlink()
    print(json.dumps({"rc": rc, "wall": time.perf_counter() - start, "lines": lines, "hwm_mb": vm("VmHWM"), **peaks}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=300_000)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds each output write waits first")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--child", nargs=4, metavar=("SRC", "DELAY", "INPUT_EXTRA", "MAX_BYTES"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), float(args.child[1]), args.child[2], int(args.child[3]))
        return 0
    src = audit_lines_file(args.lines)
    big = "    batch_size 8M"
    variants = [  # name, delay, input options, the output buffer's max_bytes (0: default)
        ("fast output", 0.0, "", 0),
        (f"slow output ({args.delay} s/write)", args.delay, "", 0),
        ("slow, mem_buf_limit 8M", args.delay, "    mem_buf_limit 8M", 0),
        ("slow, batch_size 8M, batches only", args.delay, big, 2**62),  # as before the byte bound
        ("slow, batch_size 8M", args.delay, big, 0),
    ]
    print(f"{cpu_count_hint()}; {args.lines:,} lines, {src.stat().st_size / 1e6:.0f} MB")
    for round_ in range(args.repeat):  # variants alternate within each round
        for name, delay, extra, max_bytes in variants:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(src), str(delay), extra, str(max_bytes)],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode:
                print(proc.stderr[-2000:])
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            ok = r["rc"] == 0 and r["lines"] == args.lines
            print(
                f"round {round_ + 1} {name:<34} wall {r['wall']:6.1f} s  peak RSS {r['hwm_mb']:6.1f} MB  "
                f"output buffer peak {r['buffered_mb']:5.1f} MB / {r['buffered_batches']} batches  "
                f"lines {r['lines']:,} {'ok' if ok else 'WRONG'}"
            )
            if not ok:
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
