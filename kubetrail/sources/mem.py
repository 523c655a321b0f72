"""The ``mem`` input: the host's memory and swap, and optionally one process's memory, Fluent
Bit's ``in_mem`` records.

Every ``interval_sec`` + ``interval_nsec`` one record, in kilobytes, as Fluent Bit computes them:

* ``Mem.total`` (``MemTotal``), ``Mem.used`` (total - ``MemFree``), ``Mem.free``
  (``MemAvailable``: memory that can be had without swapping, so ``used + free`` is not
  ``total``: page cache counts in both, exactly as in Fluent Bit);
* ``Swap.total``, ``Swap.used`` (total - free), ``Swap.free``;
* with ``pid``: ``proc_bytes`` (the process's resident set, bytes) and ``proc_hr`` (the same,
  human readable as Fluent Bit writes it, e.g. ``12.50M``).

Read from ``/proc/meminfo`` (Fluent Bit calls sysinfo(2), whose totalram/freeram/totalswap/
freeswap are the same kernel counters, and then reads ``MemAvailable`` from that file anyway).

Fluent Bit's interval parsing is kept: an ``interval_sec`` of 0 or less means 1 even when
``interval_nsec`` is set (unlike ``cpu``). A process that cannot be measured (gone) is logged
once, counted (``kubetrail_errors_total{type="proc_read"}``) and from then on left out, as Fluent
Bit does; the host's values go on.
"""

from __future__ import annotations

import os
from typing import Any

from kubetrail.core.component import ComponentContext
from kubetrail.sources.periodic import INTERVAL_OPTIONS, PeriodicSource

MEMINFO_KEYS = ("MemTotal", "MemFree", "MemAvailable", "SwapTotal", "SwapFree")


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo``'s ``Name:  N kB`` lines, in kB."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[name] = int(fields[0])
    missing = [key for key in ("MemTotal", "MemFree", "SwapTotal", "SwapFree") if key not in values]
    if missing:
        raise ValueError(f"no {', '.join(missing)} in meminfo")
    return values


def human_size(size: int) -> str:
    """Bytes as Fluent Bit's ``proc_hr`` shows them (its ``human_readable_size``): ``"512 b"``
    below 1 KiB, else two decimals and a unit letter (``"12.50M"``)."""
    units = ("b", "K", "M", "G", "T", "P", "E")
    index, unit = 0, 1024
    while index < len(units) - 1 and size // unit:
        index += 1
        unit *= 1024
    if index == 0:
        return f"{size} b"
    return f"{size / (unit // 1024):.2f}{units[index]}"


class MemSource(PeriodicSource):
    plugin_name = "mem"
    description = "Memory and swap of the host (and the memory of one process), from /proc"
    options = INTERVAL_OPTIONS

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        sec, nsec = config["interval_sec"], config["interval_nsec"]
        # Fluent Bit's in_mem: each part replaced by its default on its own.
        super().__init__(ctx, config, (sec if sec > 0 else 1) + (nsec if nsec > 0 else 0) / 1e9)
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self._failing = False

    def sample(self) -> dict[str, Any] | None:
        try:
            info = parse_meminfo(self.read("meminfo"))
        except (OSError, ValueError) as exc:
            self.metrics.error("proc_read")
            if not self._failing:
                self.log.warning("cannot read meminfo: %s", exc, extra={"component": self.ctx.component_id})
            self._failing = True
            return None
        self._failing = False
        total, swap_total, swap_free = info["MemTotal"], info["SwapTotal"], info["SwapFree"]
        body: dict[str, Any] = {
            "Mem.total": total,
            "Mem.used": total - info["MemFree"],
            "Mem.free": info.get("MemAvailable", info["MemFree"]),  # MemAvailable: Linux 3.14+
            "Swap.total": swap_total,
            "Swap.used": swap_total - swap_free,
            "Swap.free": swap_free,
        }
        if self.pid:
            try:
                rss = self._rss_bytes()
            except (OSError, ValueError, IndexError) as exc:
                self.metrics.error("proc_read")
                self.log.warning(
                    "cannot measure process %d (%s); only the host's memory from now on, as Fluent Bit does",
                    self.pid,
                    exc,
                    extra={"component": self.ctx.component_id},
                )
                self.pid = 0
            else:
                body["proc_bytes"] = rss
                body["proc_hr"] = human_size(rss)
        return body

    def _rss_bytes(self) -> int:
        # Field 24 of /proc/PID/stat, in pages (Fluent Bit's proc.c); counted from the last ")"
        # since the command name may hold spaces.
        text = self.read(f"{self.pid}/stat")
        rest = text[text.rindex(")") + 2 :].split()
        return int(rest[21]) * self.page_size
