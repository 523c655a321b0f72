"""Helpers shared by the benchmarks: cached inputs and child-process measurement.

Benchmarks print figures and a ratio against a baseline measured in the same run, because
the machine is shared and noisy: absolute numbers drift, ratios much less.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CACHE = Path(os.environ.get("KUBETRAIL_CACHE_DIR", Path.home() / ".cache" / "kubetrail")) / "bench"


def audit_lines_file(count: int) -> Path:
    """``count`` lines from shared/bench/gen_audit.py, generated once and cached outside the repo."""
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / f"audit-{count}.jsonl"
    if not target.exists():
        partial = target.with_suffix(".tmp")
        with partial.open("wb") as out:
            subprocess.run([sys.executable, str(SHARED / "bench" / "gen_audit.py"), str(count)], stdout=out, check=True)
        partial.rename(target)
    return target


@dataclass
class Measured:
    wall: float
    cpu: float
    max_rss_mb: float
    returncode: int


def measure(command: list[str], **kwargs: object) -> Measured:
    """Run a child process; wall time, CPU seconds (user+sys) and peak RSS of that child alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, **kwargs)  # type: ignore[call-overload]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, proc.returncode)


def cpu_count_hint() -> str:
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores, load average {load:.2f}"


__all__ = ["CACHE", "REPO", "Measured", "audit_lines_file", "cpu_count_hint", "measure", "resource"]
