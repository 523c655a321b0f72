"""Benchmark: replay rate and recovery time of ~1 GB in the filesystem buffer after ``kill -9``.

1. **Fill**: ``tail`` (with a ``db``) -> ``storage.type filesystem`` -> ``file`` output whose
   directory does not exist yet (the output is down: every delivery fails and is retried), until
   the tail's checkpoint reaches the end of the input; the checkpoint moves only once a batch's
   frame is in the buffer, so at that point everything is buffered. Then ``kill -9``.
2. **Recover**: create the output's directory and start the same configuration again. Recovery
   time = from starting the process until the output holds every record (the output file reaches
   the input's size; ``format plain`` writes each record's original line). Replay rate = buffered
   input bytes (MB/s) and records per second over that time.
3. **Baseline** (same run): the same records read straight from the source with
   ``storage.type memory`` (``tail`` -> ``file``, same parser and output), timed the same way.

Every output is checked by content: the multiset of ``(auditID, stage)`` identities must equal
the input's (nothing lost, nothing duplicated), and no undelivered segment may be left.

    .venv/bin/python bench/bench_recovery.py [--lines 1200000]     # ~1.07 GB of audit events
    .venv/bin/python bench/bench_recovery.py --cold   # input and buffer read from the disk, not the page cache

Without ``--cold`` the buffer is still in the page cache when the replay starts (``kill -9``
does not empty it), as after a process crash; ``--cold`` evicts the segment files (and, for the
baseline, the input file) with ``posix_fadvise(DONTNEED)``, as after a reboot.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import REPO, audit_lines_file, audit_tail_config, cpu_count_hint

IDENTITY = re.compile(rb'"auditID":"([^"]+)","stage":"([^"]+)"')


def identities(path: Path) -> Counter[bytes]:
    counts: Counter[bytes] = Counter()
    with path.open("rb") as handle:
        for line in handle:
            match = IDENTITY.search(line)
            counts[match.group(1) + b"/" + match.group(2) if match else b"<no identity> " + line[:80]] += 1
    return counts


def proc_peak_rss(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)], cwd=REPO, stdout=out, stderr=out
        )


def wait_delivered(proc: subprocess.Popen[bytes], output: Path, size: int, timeout: float) -> tuple[float, float]:
    """Seconds from now until ``output`` reaches ``size`` bytes; also the peak RSS seen."""
    started = time.perf_counter()
    deadline = started + timeout
    while time.perf_counter() < deadline:
        if output.exists() and output.stat().st_size >= size:
            return time.perf_counter() - started, proc_peak_rss(proc.pid)
        if proc.poll() is not None:
            raise SystemExit(f"kubetrail exited (rc={proc.returncode}) before delivering everything")
        time.sleep(0.02)
    raise SystemExit(f"not delivered within {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def checkpoint(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            row = conn.execute("SELECT max(offset) FROM in_tail_files").fetchone()
            return int(row[0] or 0)
    except sqlite3.Error:
        return 0


def drop_cache(*paths: Path) -> None:
    """Write ``paths`` out and evict them from the page cache (no root needed: only these files),
    so the next read comes from the disk as after a reboot."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_200_000)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--cold", action="store_true", help="evict the input and the buffer from the page cache first")
    args = parser.parse_args()
    src = audit_lines_file(args.lines)
    size = src.stat().st_size
    expected = identities(src)
    assert sum(expected.values()) == args.lines and max(expected.values()) == 1, "input identities must be unique"
    cache = "cold (input and buffer evicted from the page cache)" if args.cold else "warm page cache"
    print(f"input: {args.lines:,} audit lines, {size / 1e6:,.0f} MB, {cache}; {cpu_count_hint()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="kubetrail-bench-recovery-"))
    failures: list[str] = []
    try:
        # baseline: memory buffer, straight from the source
        base_dir = work / "memory"
        (base_dir / "out").mkdir(parents=True)
        config = base_dir / "bench.conf"
        config.write_text(audit_tail_config(src, base_dir / "out"))
        if args.cold:
            drop_cache(src)
        proc = start(config, base_dir / "kubetrail.log")
        base_time, base_rss = wait_delivered(proc, base_dir / "out" / "audit.jsonl", size, args.timeout)
        stop(proc)
        if identities(base_dir / "out" / "audit.jsonl") != expected:
            failures.append("memory baseline: output identities differ from the input")
        shutil.rmtree(base_dir / "out")
        print(f"baseline (memory) {base_time:.2f} s, peak RSS {base_rss:.0f} MB", flush=True)

        # fill: filesystem buffer, output down
        fs_dir = work / "fs"
        fs_dir.mkdir()
        storage, out_dir, db = fs_dir / "storage", fs_dir / "out", fs_dir / "tail.db"
        config = fs_dir / "bench.conf"
        config.write_text(
            audit_tail_config(
                src,
                out_dir,
                service=f"    storage.path {storage}\n    storage.sync normal\n    scheduler.cap 5",
                input_extra=f"    storage.type filesystem\n    db {db}",
                exit_on_eof=False,
            )
        )
        log = fs_dir / "kubetrail.log"
        filled_at = time.perf_counter()
        proc = start(config, log)
        deadline = filled_at + args.timeout
        while checkpoint(db) < size and time.perf_counter() < deadline and proc.poll() is None:
            time.sleep(0.1)
        fill_time = time.perf_counter() - filled_at
        if checkpoint(db) < size:
            raise SystemExit(f"fill did not finish (checkpoint {checkpoint(db)} of {size}); see {log}")
        fill_rss = proc_peak_rss(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        buffered = dir_bytes(storage)
        segments = len(list(storage.glob("*/*.seg")))
        print(
            f"filled: {buffered / 1e6:,.0f} MB in {segments} segments in {fill_time:.1f} s "
            f"(peak RSS {fill_rss:.0f} MB); killed with SIGKILL",
            flush=True,
        )

        # recover: the output is back
        out_dir.mkdir()
        if args.cold:
            drop_cache(*storage.glob("*/*.seg"))
        proc = start(config, log)
        recovery, replay_rss = wait_delivered(proc, out_dir / "audit.jsonl", size, args.timeout)
        time.sleep(2)  # anything extra (a duplicate) would arrive now
        stop(proc)
        got = identities(out_dir / "audit.jsonl")
        lost = sum((expected - got).values())
        dups = sum((got - expected).values())
        if lost or dups:
            failures.append(f"recovery: {lost} records lost, {dups} extra (duplicated or unknown)")
        leftover = list(storage.glob("*/*.seg"))
        if leftover and any(p.stat().st_size > 8 for p in leftover):
            failures.append(f"recovery left {len(leftover)} segments with data")
        print(f"--- {cpu_count_hint()}")
        print(
            f"baseline  memory, from the source: {base_time:7.2f} s  {args.lines / base_time:>10,.0f} records/s  "
            f"{size / 1e6 / base_time:6.1f} MB/s  peak RSS {base_rss:.0f} MB"
        )
        print(
            f"recovery  filesystem replay      : {recovery:7.2f} s  {args.lines / recovery:>10,.0f} records/s  "
            f"{size / 1e6 / recovery:6.1f} MB/s (input bytes; {buffered / 1e6 / recovery:.1f} MB/s of buffer)  "
            f"peak RSS {replay_rss:.0f} MB  ratio vs memory {base_time / recovery:.2f}x"
        )
        print(f"fill (buffer write, output down): {fill_time:.1f} s, {size / 1e6 / fill_time:.1f} MB/s of input")
        print(f"records: lost {lost}, duplicated/extra {dups}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
