"""Driving one sink directly, as the sink runner does with one worker, for the sink benchmarks.

Input batches look like the tail source's: the original JSON lines (``raw_block``) plus records
built only when a sink asks for them, so a sink that can pass bytes through is measured doing so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from kubetrail.core.component import ComponentContext
from kubetrail.core.errors import Location
from kubetrail.core.metrics import MetricsRegistry
from kubetrail.core.options import Property, Section, resolve_options
from kubetrail.core.record import Batch, Record
from kubetrail.parsers.registry import ParserRegistry

BATCH = 1000


def build(cls: type, **props: Any) -> Any:
    """A sink instance from options as a config file would give them (``tls__verify`` -> ``tls.verify``)."""
    section = Section("output", Location("<bench>", 1))
    for key, value in props.items():
        section.properties.append(Property(key.replace("__", "."), str(value), Location("<bench>", 1)))
    values = resolve_options(section, cls.options, cls.plugin_name)
    ctx = ComponentContext(
        component_id=f"{cls.plugin_name}.0",
        metrics=MetricsRegistry().component(f"{cls.plugin_name}.0", "output", cls.plugin_name),
        logger=logging.getLogger("bench"),
        parsers=ParserRegistry(),
    )
    return cls(ctx, values)


def batches(lines: list[bytes], tag: str = "audit", size: int = BATCH) -> list[Batch]:
    out = []
    for start in range(0, len(lines), size):
        chunk = lines[start : start + size]
        block = b"".join(chunk)

        def materialize(chunk: list[bytes] = chunk) -> list[Record]:
            now = time.time_ns()
            return [Record(tag, now, raw=line.rstrip(b"\n")) for line in chunk]

        out.append(Batch(tag, None, raw_block=block, materialize=materialize, count=len(chunk), size_bytes=len(block)))
    return out


async def timed_writes(sink: Any, work: list[Batch], clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds (by ``clock``) of ``sink.write`` over ``work``; start and close not timed."""
    await sink.start()
    started = clock()
    for batch in work:
        await sink.write(batch)
    used = clock() - started
    await sink.close()
    return used


async def run_sink(sink: Any, lines: list[bytes]) -> float:
    """Records/s of ``sink.write`` over fresh batches of ``lines`` (start and close not timed)."""
    work = batches(lines)  # fresh batches: materialised records must not carry over between runs
    return len(lines) / await timed_writes(sink, work)
