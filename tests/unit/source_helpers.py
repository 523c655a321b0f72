"""Running an input inside a real pipeline and looking at what reached the output.

The pipeline is built from a real config (classic format) with one ``stdout`` output whose sink
is swapped for :class:`CollectSink`, which keeps every delivered batch: the tests of the
``systemd``, ``tcp``, ``http``, ``dummy`` and ``fluentbit_metrics`` inputs read records, tags
and times from it instead of parsing printed text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetrail.core.config import load_config
from kubetrail.core.record import Batch, Record
from kubetrail.runtime.pipeline import Pipeline
from tests.timing import scaled
from tests.unit.helpers import write


class CollectSink:
    """A sink that delivers at once and keeps the batches."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.changed = asyncio.Event()

    async def start(self) -> None:
        return None

    async def write(self, batch: Batch) -> None:
        self.batches.append(batch)
        self.changed.set()

    async def close(self) -> None:
        return None

    @property
    def records(self) -> list[Record]:
        return [r for b in self.batches for r in b.records]

    def bodies(self) -> list[dict[str, Any]]:
        return [r.body for r in self.records]


@dataclass
class Running:
    pipeline: Pipeline
    sink: CollectSink
    source: Any
    task: asyncio.Task[int]

    async def wait_records(self, count: int, timeout: float = 10.0) -> list[Record]:
        """The delivered records once there are at least ``count`` (fails after ``timeout``)."""
        await wait_until(lambda: len(self.sink.records) >= count, timeout, f"{count} records")
        return self.sink.records

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        total = 0.0
        for family in self.pipeline.metrics.registry.collect():
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total


async def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Until ``check()``; ``timeout`` as on an idle machine, stretched on a loaded one
    (:func:`tests.timing.scaled`): only the point of giving up moves, never the condition."""
    limit = scaled(timeout)
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """Everything the server sends before it closes the connection.

    A server that closes while bytes the client sent are still unread makes the kernel send a
    reset instead of a FIN (RFC 1122 4.2.2.13), so a reset counts as the close here: which of
    the two a client sees depends only on how much of its message had arrived.
    """
    received = bytearray()
    async with asyncio.timeout(scaled(timeout)):
        try:
            while data := await reader.read(65536):
                received += data
        except ConnectionResetError:
            pass
    return bytes(received)


def input_config(tmp_path: Path, input_lines: str, service: str = "", filters: str = "") -> Path:
    return write(
        tmp_path / "input.conf",
        f"""
[SERVICE]
    grace 2
{service}
[INPUT]
{input_lines}
{filters}
[OUTPUT]
    name  stdout
    match *
""",
    )


@asynccontextmanager
async def running(
    tmp_path: Path, input_lines: str, service: str = "", filters: str = "", ready: str | None = None
) -> AsyncIterator[Running]:
    """The pipeline of ``input_lines`` running; ``ready``: an attribute of the source (an
    ``asyncio.Event``) to wait for before yielding (a server's ``started``)."""
    pipeline = Pipeline(load_config(input_config(tmp_path, input_lines, service, filters)))
    sink = CollectSink()
    pipeline.runners[0].sink = sink  # type: ignore[assignment]
    source = pipeline.sources[0].instance
    task = asyncio.create_task(pipeline.run())
    run = Running(pipeline, sink, source, task)
    try:
        if ready is not None:
            event: asyncio.Event = getattr(source, ready)
            await wait_until(lambda: event.is_set() or task.done(), 10, f"the source's {ready}")
            if task.done():
                task.result()
                raise AssertionError("the pipeline stopped before the source was ready")
        yield run
    finally:
        pipeline.request_stop()
        assert await asyncio.wait_for(task, 30) == 0
