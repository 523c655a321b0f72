"""The ``cpu`` and ``mem`` inputs on this machine's real ``/proc``, in a running pipeline.

No fake: the numbers are checked for consistency with what ``/proc`` says at the same moment
(totals equal ``/proc/meminfo``'s, percentages in range and adding up, a busy process measured
as busy), and with the record shapes of Fluent Bit's ``in_cpu`` and ``in_mem``.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kubetrail.runtime.plugins import COMMON_INPUT_OPTIONS
from kubetrail.sources.cpu import CpuSource, parse_pid_stat, parse_stat
from kubetrail.sources.mem import MemSource, human_size, parse_meminfo
from tests.timing import factor
from tests.unit.helpers import build
from tests.unit.source_helpers import running, wait_until

FAST = "    interval_sec 0\n    interval_nsec 200000000\n"


def cpu_names() -> list[str]:
    return [line.split()[0] for line in Path("/proc/stat").read_text().splitlines() if re.match(r"cpu\d+ ", line)]


def meminfo() -> dict[str, int]:
    return parse_meminfo(Path("/proc/meminfo").read_text())


async def test_cpu_host_record_shape_and_ranges(tmp_path: Path) -> None:
    async with running(tmp_path, "    name cpu\n    tag host.cpu\n" + FAST) as run:
        records = await run.wait_records(3)
    names = cpu_names()
    assert names, "this machine's /proc/stat lists its CPUs"
    expected = ["cpu_p", "user_p", "system_p"] + [f"{n}.p_{k}" for n in names for k in ("cpu", "user", "system")]
    for record in records:
        body = record.body
        assert record.tag == "host.cpu"
        assert list(body) == expected  # Fluent Bit's keys, in its order
        for key, value in body.items():
            assert isinstance(value, float) and 0.0 <= value <= 100.0 + 1e-9, (key, value)
        assert body["cpu_p"] == pytest.approx(body["user_p"] + body["system_p"])
        for name in names:
            assert body[f"{name}.p_cpu"] == pytest.approx(body[f"{name}.p_user"] + body[f"{name}.p_system"])
        # The whole is the average of its CPUs (each CPU's jiffies advance at the same rate), up
        # to the kernel's own rounding: its "cpu" line and the per-CPU lines can differ by a tick
        # or two (seen: 5.0 against 0.0), and one tick in a 0.2 s interval is 5 points.
        tick = 100 / (os.sysconf("SC_CLK_TCK") * 0.2)
        mean = sum(body[f"{n}.p_cpu"] for n in names) / len(names)
        assert abs(body["cpu_p"] - mean) <= 2 * tick + 1e-9, (body["cpu_p"], mean)


async def test_cpu_of_a_busy_process_then_gone(tmp_path: Path) -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        config = f"    name cpu\n    tag proc\n    pid {busy.pid}\n    interval_sec 0\n    interval_nsec 500000000\n"
        async with running(tmp_path, config) as run:
            records = await run.wait_records(3)
            n_cpus = os.cpu_count() or 1
            for record in records[1:]:  # the first interval includes the interpreter's start
                body = record.body
                assert list(body) == ["cpu_p", "user_p", "system_p"]
                # One spinning thread: up to one CPU's share of all CPUs, mostly user time. The
                # machine is shared (load can be far above its cores: at load 19 on 2 cores it got
                # 1.7 of 100), so the lower bound shrinks with the load (tests/timing.py); an idle
                # process (the wrong pid, no reading) is 0.0 and still fails.
                assert 5 / n_cpus / factor() < body["cpu_p"] <= 100 / n_cpus * 1.1 + 1, body
                assert body["user_p"] > body["system_p"]
            busy.kill()
            busy.wait()
            seen = len(run.sink.records)
            await wait_until(lambda: run.metric("kubetrail_errors_total", type="proc_read") >= 2, 5, "read errors")
            assert len(run.sink.records) <= seen + 1  # at most one record in flight; none after
    finally:
        busy.kill()
        busy.wait()


async def test_mem_matches_proc_meminfo_and_measures_this_process(tmp_path: Path) -> None:
    config = f"    name mem\n    tag memory\n    pid {os.getpid()}\n" + FAST
    # /proc/meminfo and this process's VmRSS read every few ms while the input runs, in the same
    # event loop: each record is compared with the readings around its own (memory moved by
    # 1.6 GB between a record and one reading after them all at load 19, with others' JVMs starting)
    samples: list[tuple[dict[str, int], int]] = []

    async def sample() -> None:
        while True:
            status = Path("/proc/self/status").read_text()
            rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]
            samples.append((meminfo(), rss))
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        async with running(tmp_path, config) as run:
            records = await run.wait_records(3)
    finally:
        sampler.cancel()
    info = meminfo()

    def nearest(value: int, reading: Callable[[dict[str, int], int], int]) -> int:
        return min(abs(value - reading(m, rss)) for m, rss in samples)

    for record in records:
        body = record.body
        assert list(body) == [
            "Mem.total", "Mem.used", "Mem.free", "Swap.total", "Swap.used", "Swap.free", "proc_bytes", "proc_hr",
        ]  # fmt: skip
        assert body["Mem.total"] == info["MemTotal"]
        assert body["Swap.total"] == info["SwapTotal"]
        assert body["Swap.used"] == body["Swap.total"] - body["Swap.free"]
        slack = info["MemTotal"] // 20  # memory moves between the two readings (6 engineers here)
        assert nearest(body["Mem.used"], lambda m, _: m["MemTotal"] - m["MemFree"]) < slack
        assert nearest(body["Mem.free"], lambda m, _: m["MemAvailable"]) < slack  # Fluent Bit: MemAvailable
        assert 0 < body["Mem.used"] < body["Mem.total"] and 0 < body["Mem.free"] <= body["Mem.total"]
        vm_rss = samples[-1][1]
        assert nearest(body["proc_bytes"], lambda _, rss: rss) < vm_rss * 0.2, (body["proc_bytes"], vm_rss)
        assert body["proc_hr"] == human_size(body["proc_bytes"])
        assert re.fullmatch(r"\d+\.\d\d[KMG]", body["proc_hr"])


async def test_mem_of_a_gone_process_goes_on_with_the_host(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    async with running(tmp_path, f"    name mem\n    tag m\n    pid {gone.pid}\n" + FAST) as run:
        records = await run.wait_records(2)
        assert run.metric("kubetrail_errors_total", type="proc_read") == 1  # logged and counted once
    assert all("proc_bytes" not in r.body and r.body["Mem.total"] == meminfo()["MemTotal"] for r in records)


def test_parsers_and_fluent_bits_interval_rules() -> None:
    stat = "cpu  10 2 5 100 1 0 0 0 0 0\ncpu0 10 2 5 100 1 0 0 0 0 0\nintr 1 2 3\n"
    assert parse_stat(stat) == {"cpu": (12, 5, 118), "cpu0": (12, 5, 118)}
    with pytest.raises(ValueError, match="no 'cpu' line"):
        parse_stat("intr 1\n")
    # The command name may hold spaces and parentheses.
    fields = " ".join(str(n) for n in range(3, 30))
    assert parse_pid_stat(f"42 (evil ) (name) {fields}") == (14, 15)
    utime, stime = parse_pid_stat(Path("/proc/self/stat").read_text())
    assert utime >= 0 and stime >= 0
    with pytest.raises(ValueError, match="MemTotal"):
        parse_meminfo("Cached: 1 kB\n")
    assert human_size(512) == "512 b" and human_size(1536) == "1.50K" and human_size(3 * 1024**3) == "3.00G"
    # in_cpu: both parts 0 or less mean 1 s; in_mem: each part on its own (0 s -> 1 s).
    assert build(CpuSource, COMMON_INPUT_OPTIONS, tag="t", interval_sec=0, interval_nsec=500_000_000).period == 0.5
    assert build(CpuSource, COMMON_INPUT_OPTIONS, tag="t", interval_sec=-1, interval_nsec=0).period == 1.0
    assert build(MemSource, COMMON_INPUT_OPTIONS, tag="t", interval_sec=0, interval_nsec=500_000_000).period == 1.5
    assert build(MemSource, COMMON_INPUT_OPTIONS, tag="t", interval_sec=2).period == 2.0
