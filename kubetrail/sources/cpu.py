"""The ``cpu`` input: the host's (or one process's) CPU use, Fluent Bit's ``in_cpu`` records.

Every ``interval_sec`` + ``interval_nsec`` (1 s by default; both 0 or less mean the default, as
in Fluent Bit) one record, from the difference between two readings of ``/proc/stat``:

* ``cpu_p``: busy time (user + nice + system) of all CPUs as a share of their capacity, 0-100;
* ``user_p`` (user + nice) and ``system_p``, the same two parts;
* ``cpuN.p_cpu``, ``cpuN.p_user``, ``cpuN.p_system`` for each CPU, each 0-100 of that CPU.

With ``pid`` only that process is measured, from ``utime``/``stime`` in ``/proc/PID/stat``:
``cpu_p``, ``user_p``, ``system_p`` as a share of all CPUs' capacity (Fluent Bit's
``CPU_METRIC_SYS_AVERAGE``: divided by the number of CPUs).

Design decisions:

* The host's percentages divide by the jiffies that passed on each CPU (all of ``/proc/stat``'s
  columns), not by the configured interval times the clock rate as Fluent Bit does. Both measure
  the same thing, but this one cannot exceed 100 when the collector runs late (a busy event
  loop), and needs no guess of the tick rate. A process's percentages divide by the measured
  time between readings and ``SC_CLK_TCK``, for the same reason.
* The first record comes after one interval, since a percentage needs two readings (as in
  Fluent Bit).
* A process that is gone (or a ``/proc`` that cannot be read) is logged once and counted
  (``kubetrail_errors_total{type="proc_read"}``); no record is made until it can be read again.
"""

from __future__ import annotations

import os
import time
from typing import Any

from kubetrail.core.component import ComponentContext
from kubetrail.sources.periodic import INTERVAL_OPTIONS, PeriodicSource

# /proc/stat columns after the name: user nice system idle iowait irq softirq steal (guest and
# guest_nice are already inside user and nice, so they are not added again).
USER, NICE, SYSTEM = 0, 1, 2
COUNTED_COLUMNS = 8


def parse_stat(text: str) -> dict[str, tuple[int, int, int]]:
    """``/proc/stat``'s cpu lines: name -> (user + nice, system, all jiffies)."""
    cpus: dict[str, tuple[int, int, int]] = {}
    for line in text.splitlines():
        if not line.startswith("cpu"):
            continue
        name, *fields = line.split()
        values = [int(v) for v in fields[:COUNTED_COLUMNS]]
        cpus[name] = (values[USER] + values[NICE], values[SYSTEM], sum(values))
    if "cpu" not in cpus:
        raise ValueError("no 'cpu' line")
    return cpus


def parse_pid_stat(text: str) -> tuple[int, int]:
    """``/proc/PID/stat``'s utime and stime (fields 14 and 15; the command in parentheses may
    itself hold spaces and parentheses, so fields are counted from the last ``)``)."""
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[11]), int(rest[12])  # rest[0] is field 3 (state)


def percent(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole > 0 else 0.0


class CpuSource(PeriodicSource):
    plugin_name = "cpu"
    description = "CPU use of the host (and each CPU) or of one process, from /proc"
    options = INTERVAL_OPTIONS

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        sec, nsec = config["interval_sec"], config["interval_nsec"]
        if sec <= 0 and nsec <= 0:
            sec, nsec = 1, 0  # Fluent Bit's default for an unset or illegal interval
        super().__init__(ctx, config, max(sec, 0) + max(nsec, 0) / 1e9)
        self.clock_ticks = os.sysconf("SC_CLK_TCK")
        self.n_cpus = os.cpu_count() or 1
        self._last: Any = None  # previous reading: host cpus dict, or (utime, stime, monotonic)
        self._failing = False

    def _reading(self) -> Any:
        if self.pid:
            utime, stime = parse_pid_stat(self.read(f"{self.pid}/stat"))
            return utime, stime, time.monotonic()
        return parse_stat(self.read("stat"))

    def sample(self) -> dict[str, Any] | None:
        try:
            now = self._reading()
        except (OSError, ValueError, IndexError) as exc:
            self.metrics.error("proc_read")
            if not self._failing:
                what = f"process {self.pid}" if self.pid else "/proc/stat"
                self.log.warning(
                    "cannot read the CPU use of %s: %s", what, exc, extra={"component": self.ctx.component_id}
                )
            self._failing = True
            self._last = None
            return None
        self._failing = False
        before, self._last = self._last, now
        if before is None:
            return None  # a percentage needs two readings
        if self.pid:
            return self._process(before, now)
        return self._host(before, now)

    def _process(self, before: tuple[int, int, float], now: tuple[int, int, float]) -> dict[str, Any]:
        # Ticks of CPU time over ticks of wall time on all CPUs.
        capacity = (now[2] - before[2]) * self.clock_ticks * self.n_cpus
        user = percent(now[0] - before[0], capacity)
        system = percent(now[1] - before[1], capacity)
        return {"cpu_p": user + system, "user_p": user, "system_p": system}

    def _host(self, before: dict[str, tuple[int, int, int]], now: dict[str, tuple[int, int, int]]) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for name, (user, system, total) in now.items():
            old = before.get(name)
            if old is None:
                continue  # a CPU that came online: from its next reading on
            spent = total - old[2]
            user_p = percent(user - old[0], spent)
            system_p = percent(system - old[1], spent)
            if name == "cpu":
                body.update({"cpu_p": user_p + system_p, "user_p": user_p, "system_p": system_p})
            else:
                body.update(
                    {f"{name}.p_cpu": user_p + system_p, f"{name}.p_user": user_p, f"{name}.p_system": system_p}
                )
        return body
