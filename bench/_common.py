"""Helpers shared by the benchmarks: cached inputs and child-process measurement.

Benchmarks print figures and a ratio against a baseline measured in the same run, because
the machine is shared and noisy: absolute numbers drift, ratios much less.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("KUBETRAIL_CACHE_DIR", Path.home() / ".cache" / "kubetrail")) / "bench"


def warm_free_memory(directory: Path, megabytes: int = 2048) -> None:
    """Write and delete ``megabytes`` in ``directory`` right before a measured run.

    Why: this machine is a VM whose balloon device takes free-page reports (virtio free page
    reporting), so guest memory left free for a few seconds is handed back to the host, and
    the next touch of each such page costs a host page fault. A run writing 1.7 GB into the
    page cache then spent up to 3 s more in the kernel (in ``copy_folio_from_iter_atomic``)
    depending on what the run before it had freed, which favoured whichever variant came
    after a bigger one. Freshly freed page-cache pages are taken first and not yet reported,
    so every variant starts the same way: as on a host whose page cache is recycled, not grown.
    """
    chunk = b"\0" * (1 << 20)
    warm = directory / ".warm"
    with warm.open("wb") as out:
        for _ in range(megabytes):
            out.write(chunk)
    warm.unlink()


def audit_lines_file(count: int) -> Path:
    """``count`` lines from bench/gen_audit.py, generated once and cached outside the repo."""
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / f"audit-{count}.jsonl"
    if not target.exists():
        partial = target.with_suffix(".tmp")
        with partial.open("wb") as out:
            subprocess.run([sys.executable, str(REPO / "bench" / "gen_audit.py"), str(count)], stdout=out, check=True)
        partial.rename(target)
    return target


_AUDIT_TAIL_CONFIG = """
[SERVICE]
    log_level warn
    grace     60
{service}
[PARSER]
    name        audit_json
    format      json
    time_key    stageTimestamp
    time_format %Y-%m-%dT%H:%M:%S.%LZ
    time_keep   on
[INPUT]
    name           tail
    path           {src}
    tag            audit
    read_from_head on
    exit_on_eof    {exit_on_eof}
    parser         {parser}
{input}
{filters}
[OUTPUT]
    name   file
    alias  out
    match  *
    path   {out}
    file   audit.jsonl
    format plain
"""


def audit_tail_config(
    src: Path,
    out: Path,
    *,
    parser: str = "audit_json",
    service: str = "",
    input_extra: str = "",
    filters: str = "",
    exit_on_eof: bool = True,
) -> str:
    """The pipeline the tail benchmarks share: audit JSON lines -> tail (time from
    ``stageTimestamp``; ``audit_json`` is declared here, ``k8s_audit`` is built in) -> [filters]
    -> a file output (alias ``out``) writing plain JSON lines to ``out/audit.jsonl``."""
    return _AUDIT_TAIL_CONFIG.format(
        src=src,
        out=out,
        parser=parser,
        service=service,
        input=input_extra,
        filters=filters,
        exit_on_eof="on" if exit_on_eof else "off",
    )


@dataclass
class Measured:
    wall: float
    cpu: float
    max_rss_mb: float
    returncode: int


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


_COMPILED: set[Path] = set()


def ensure_bytecode(tree: Path | str | None = None) -> None:
    """Compile ``tree``'s ``kubetrail`` package to ``.pyc`` once (default: this checkout).

    Why: a deployed kubetrail runs from compiled bytecode (the image runs ``compileall``; pip
    compiles what it installs), but this machine's environment sets ``PYTHONDONTWRITEBYTECODE``,
    so every module changed since its last ``.pyc`` was compiled from source at every start:
    45-80 ms of a 0.9 s run, charged to whichever rows import the changed modules."""
    root = Path(tree or REPO).resolve() / "kubetrail"
    if root in _COMPILED or not root.is_dir():
        return
    import compileall

    compileall.compile_dir(str(root), quiet=1)
    _COMPILED.add(root)


def measure(command: list[str], **kwargs: object) -> Measured:
    """Run a child process; wall time, CPU seconds (user+sys) and peak RSS of that child alone.

    Peak RSS is the child's own ``VmHWM``, read every 20 ms while it runs; the last read counts
    (it only grows within one program, and a read between fork and exec would show the
    parent's). ``wait4``'s ``ru_maxrss`` is used only where no read worked: Linux carries the
    parent's peak into a child across ``exec``, so a benchmark process that once held 500 MB
    made every later child report at least 500 MB."""
    cwd = kwargs.get("cwd")
    ensure_bytecode(cwd if isinstance(cwd, (str, Path)) else None)
    start = time.perf_counter()
    proc = subprocess.Popen(command, **kwargs)  # type: ignore[call-overload]
    last: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            hwm = _vm_hwm_mb(proc.pid)
            if hwm is not None:
                last[:] = [hwm]
            done.wait(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    poller.join()
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = last[0] if last else usage.ru_maxrss / 1024
    return Measured(wall, usage.ru_utime + usage.ru_stime, rss, proc.returncode)


def medians_against(
    results: dict[str, list[tuple[float, float]]], baseline: str
) -> list[tuple[str, float, float, float, float]]:
    """Per variant of ``results`` (its rounds' ``(wall, cpu)`` seconds): the median wall and CPU
    and their ratios to the ``baseline`` variant's medians, measured in the same run."""
    base_wall = statistics.median(wall for wall, _ in results[baseline])
    base_cpu = statistics.median(cpu for _, cpu in results[baseline])
    out = []
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        out.append((name, wall, cpu, wall / base_wall, cpu / base_cpu))
    return out


def cpu_count_hint() -> str:
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores, load average {load:.2f}"


__all__ = [
    "CACHE",
    "REPO",
    "Measured",
    "audit_lines_file",
    "audit_tail_config",
    "cpu_count_hint",
    "measure",
    "resource",
]
