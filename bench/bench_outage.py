"""Benchmark: a sink outage at 5,000 records/s with a 2 GB filesystem buffer (issue 6 target).

Target: "a 10-minute outage of a sink at 5,000 records/s loses nothing with a 2 GB buffer and
drains within 2 minutes once the sink returns".

Setup (loopback only, every loop bounded by a deadline):

* a writer (this process) appends ``--rate`` lines per second to a file, in 20 slices a second
  scheduled on a monotonic clock, each line ``seq=NNNNNNNNN <padding>`` of ``--line-bytes``;
* ``kubetrail run`` (child process): ``tail`` -> ``storage.type filesystem`` ->
  ``http`` (``json_lines``, ``storage.total_limit_size 2G``, ``retry_limit no_limits``);
* a receiver (aiohttp, its own process) answers 503 during the outage and 200 otherwise; it
  reads every accepted line's ``seq`` and keeps a bitmap, so every record is checked by identity:
  missing and duplicated ones are counted.

Phases: ``--warmup`` s sink up; ``--outage-minutes`` sink answering 503 (the backlog builds up
in the buffer); sink up again: the drain time is from that moment until every record written
before it has arrived (the writer keeps appending at the same rate meanwhile, as a real
workload would); the writer goes on for ``--after`` s, then stops, and the run waits for the
rest and stops kubetrail with SIGTERM. Figures: drain time, drain rate, peak buffer size on
disk (sampled every second), kubetrail's peak RSS (VmHWM) and CPU.

Baseline (same run): the records/s the writer produced, i.e. the drain rate is reported as a
multiple of the input rate (the backlog can only shrink at drain rate - input rate).

    .venv/bin/python bench/bench_outage.py                       # the target: 10 minutes
    .venv/bin/python bench/bench_outage.py --outage-minutes 0.5  # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, cpu_count_hint

sys.path.insert(0, str(REPO))

# The http output section the rotation tests use too (the same host, uri and json_lines format).
from tests.integration.rotation import http_output

CONFIG = """
[SERVICE]
    log_level    warn
    grace        30
    storage.path {storage}
    storage.sync normal
[INPUT]
    name             tail
    path             {src}
    tag              app
    read_from_head   on
    refresh_interval 1
    storage.type     filesystem
"""

SEQ = re.compile(rb"seq=(\d{9})")


def receiver(capacity: int, port_q: Any, down: Any, low: Any, stats: Any, stop: Any) -> None:
    """503 while ``down`` is set, else 200; ``low`` = smallest seq not yet received."""
    from aiohttp import web

    seen = bytearray(capacity)  # count per seq (saturating at 255)
    counters = {"lines": 0, "dups": 0, "bad": 0, "requests": 0, "rejected": 0}

    async def handle(request: web.Request) -> web.Response:
        counters["requests"] += 1
        if down.value:
            counters["rejected"] += 1
            await request.read()
            return web.Response(status=503, text="outage")
        body = await request.read()
        for match in SEQ.finditer(body):
            seq = int(match.group(1))
            counters["lines"] += 1
            if seq >= capacity:
                counters["bad"] += 1
                continue
            if seen[seq]:
                counters["dups"] += 1
            if seen[seq] < 255:
                seen[seq] += 1
        cursor = low.value
        while cursor < capacity and seen[cursor]:
            cursor += 1
        low.value = cursor
        return web.Response(status=200)

    async def main() -> None:
        app = web.Application(client_max_size=1024**3)
        app.router.add_post("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_q.put(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        while not stop.is_set():
            await asyncio.sleep(0.05)
        for index, key in enumerate(("lines", "dups", "bad", "requests", "rejected")):
            stats[index] = counters[key]
        await runner.cleanup()

    asyncio.run(main())


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def proc_status(pid: int, key: str) -> float:
    """A ``VmHWM``/``VmRSS`` line of /proc/<pid>/status in MB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outage-minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=5000, help="lines per second appended")
    parser.add_argument("--line-bytes", type=int, default=500, help="bytes per line, newline included")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds with the sink up before the outage")
    parser.add_argument("--after", type=float, default=150.0, help="seconds of writing after the sink returns")
    parser.add_argument("--limit", default="2G", help="storage.total_limit_size")
    parser.add_argument("--extra", action="append", default=[], help="extra output option 'key value'")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    outage = args.outage_minutes * 60
    total_seconds = args.warmup + outage + args.after
    capacity = int(args.rate * (total_seconds + 30)) + 1000
    work = Path(tempfile.mkdtemp(prefix="kubetrail-bench-outage-"))
    src = work / "app.log"
    src.touch()
    storage = work / "storage"
    mp = multiprocessing.get_context("spawn")
    port_q, stop = mp.Queue(), mp.Event()
    down, low = mp.Value("b", 0, lock=False), mp.Value("q", 0, lock=False)
    stats = mp.Array("q", 5, lock=False)
    recv = mp.Process(target=receiver, args=(capacity, port_q, down, low, stats, stop), daemon=True)
    recv.start()
    port = port_q.get(timeout=60)
    output = http_output(
        port, "json_date_key false", f"storage.total_limit_size {args.limit}", "retry_limit no_limits", *args.extra
    )
    config = work / "bench.conf"
    config.write_text(CONFIG.format(storage=storage, src=src) + output)
    log = (work / "kubetrail.log").open("wb")
    kt = subprocess.Popen(
        [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)], cwd=REPO, stdout=log, stderr=log
    )
    pad = b"x" * max(0, args.line_bytes - len(b"seq=000000000 \n"))
    slice_s = 0.05
    per_slice = args.rate * slice_s
    written = 0
    peak_disk = 0
    rss_samples: list[float] = []
    started = time.monotonic()
    phase_outage, phase_back = started + args.warmup, started + args.warmup + outage
    writer_end = phase_back + args.after
    returned_at: float | None = None
    seq_at_return = low_at_return = low_at_drained = 0
    drained_at: float | None = None
    first_after: float | None = None
    next_sample = started
    print(
        f"rate {args.rate}/s, {args.line_bytes} B/line, outage {outage:.0f} s, limit {args.limit}; "
        f"{cpu_count_hint()}; work dir {work}",
        flush=True,
    )
    try:
        with src.open("ab", buffering=0) as out:
            while True:
                now = time.monotonic()
                if kt.poll() is not None:
                    raise SystemExit(f"kubetrail exited early (rc={kt.returncode}); see {work}/kubetrail.log")
                if now >= phase_outage and now < phase_back and not down.value:
                    down.value = 1
                    print(f"[{now - started:7.1f} s] sink down (503); delivered so far {low.value:,}", flush=True)
                if now >= phase_back and returned_at is None:
                    down.value = 0
                    returned_at, seq_at_return, low_at_return = now, written, low.value
                    print(
                        f"[{now - started:7.1f} s] sink back; backlog {written - low.value:,} records, "
                        f"buffer on disk {dir_bytes(storage) / 1e6:,.0f} MB",
                        flush=True,
                    )
                if returned_at is not None and first_after is None and low.value > low_at_return:
                    first_after = now  # the first retry after the return succeeded (backoff wait over)
                    print(f"[{now - started:7.1f} s] first delivery after the return", flush=True)
                if returned_at is not None and drained_at is None and low.value >= seq_at_return:
                    drained_at, low_at_drained = now, low.value
                    print(f"[{now - started:7.1f} s] drained in {drained_at - returned_at:.1f} s", flush=True)
                if now >= next_sample:
                    peak_disk = max(peak_disk, dir_bytes(storage))
                    rss_samples.append(proc_status(kt.pid, "VmRSS"))
                    next_sample += 1.0
                    if int(now - started) % 30 == 0:
                        print(
                            f"[{now - started:7.1f} s] written {written:,} delivered {low.value:,} "
                            f"disk {peak_disk / 1e6:,.0f} MB peak, RSS {rss_samples[-1]:.0f} MB",
                            flush=True,
                        )
                if now >= writer_end and (drained_at is not None or now >= writer_end + 600):
                    break
                if now < writer_end:
                    # catch up to the schedule: never fewer lines than rate * elapsed
                    due = min(int((now - started) / slice_s * per_slice), capacity - 1000)
                    if due > written:
                        out.write(b"".join(b"seq=%09d %s\n" % (n, pad) for n in range(written, due)))
                        written = due
                time.sleep(slice_s / 2)
        produced_for = min(time.monotonic(), writer_end) - started
        print(f"writer stopped: {written:,} lines in {produced_for:.1f} s", flush=True)
        deadline = time.monotonic() + 900
        while low.value < written and time.monotonic() < deadline and kt.poll() is None:
            time.sleep(0.5)
            peak_disk = max(peak_disk, dir_bytes(storage))
        peak_rss = proc_status(kt.pid, "VmHWM")
        end_disk = dir_bytes(storage)
        cpu = proc_cpu(kt.pid)
        time.sleep(2)  # let in-flight answers settle before counting duplicates
    finally:
        if kt.poll() is None:
            kt.send_signal(signal.SIGTERM)
            try:
                kt.wait(timeout=120)
            except subprocess.TimeoutExpired:
                kt.kill()
                kt.wait()
        stop.set()
        recv.join(timeout=60)
        if recv.is_alive():
            recv.kill()
        log.close()
    lines, dups, bad, requests, rejected = list(stats)
    missing = written - low.value
    print(f"--- {cpu_count_hint()}")
    print(f"records written {written:,}; received {lines:,}; missing {missing:,}; duplicated {dups:,}; bad {bad}")
    print(f"requests {requests:,}, answered 503: {rejected:,}")
    print(
        f"peak buffer on disk {peak_disk / 1e6:,.0f} MB (limit {args.limit}), {end_disk / 1e6:,.1f} MB at the end; "
        f"kubetrail peak RSS {peak_rss:.0f} MB"
    )
    print(f"kubetrail CPU {cpu:.0f} s over {time.monotonic() - started:.0f} s")
    ok = missing == 0 and dups == 0 and bad == 0
    if returned_at is not None and drained_at is not None:
        drain = drained_at - returned_at
        delivered = low_at_drained - low_at_return  # the backlog plus what came in meanwhile
        rate = delivered / drain if drain > 0 else float("inf")
        print(
            f"drain time {drain:.1f} s: backlog {seq_at_return - low_at_return:,} records "
            f"({delivered:,} delivered in that time, in order) while {args.rate}/s kept coming; "
            f"mean delivery {rate:,.0f} records/s = {rate / args.rate:.1f}x the input rate (baseline)"
        )
        print(
            f"target: nothing lost {'met' if ok else 'NOT met'}; drain <= 120 s {'met' if drain <= 120 else 'NOT met'}"
        )
    else:
        print("target NOT met: the backlog did not drain")
        ok = False
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
