"""Read-ahead of a tail whose output is slower than its input stays bounded.

Without ``mem_buf_limit`` the bound is structural: an output's buffer holds at most
``max_batches`` (16) batches, queued or being written, ``Router``'s sends wait while it is full,
and the tail has at most ``ROUTING_AHEAD`` sends unfinished before it stops reading; a batch is
at most one read (``batch_size``) plus the partial line carried over from the read before. With
``mem_buf_limit`` the tail pauses at that many undelivered bytes. Here a real ``file`` output is
made slow (each write sleeps first) and a file many times the bound is read through it: the
buffered-bytes gauge and the tail's read-ahead are checked at every write, and every line must
arrive exactly once, in order.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubetrail.core.config import load_config
from kubetrail.core.record import Batch
from kubetrail.runtime.pipeline import Pipeline
from kubetrail.sources.tail import ROUTING_AHEAD
from tests.files import written_json_lines
from tests.unit.helpers import tail_file_config

READ = 8 * 1024  # batch_size: the bytes one read takes
LINES = 12_000
SLOTS = 16  # SinkRunner's default max_batches


def big_log(path: Path) -> int:
    """~2.4 MB of JSON lines (300x one read); returns the longest line's length."""
    lines = [orjson.dumps({"n": i, "pad": "x" * (150 + i % 100)}) + b"\n" for i in range(LINES)]
    path.write_bytes(b"".join(lines))
    return max(len(line) for line in lines)


@pytest.mark.parametrize("mem_buf_limit", [None, 64 * 1024])
async def test_a_slow_output_holds_the_tail_back_by_bytes_and_loses_nothing(
    tmp_path: Path, mem_buf_limit: int | None
) -> None:
    log = tmp_path / "big.log"
    longest = big_log(log)
    extra = f"    parser json\n    batch_size {READ}\n    buffer_chunk_size {READ}\n"
    if mem_buf_limit is not None:
        extra += f"    mem_buf_limit {mem_buf_limit}\n"
    pipeline = Pipeline(load_config(tail_file_config(tmp_path, log, input_extra=extra)))
    runner = pipeline.runners[0]
    tail: Any = pipeline.sources[0].instance
    sink: Any = runner.sink
    write, write_group = sink.write, sink.write_group
    batch_max = READ + longest  # one read plus the partial line carried into it
    if mem_buf_limit is None:
        buffer_bound = SLOTS * batch_max
        ahead_bound = (SLOTS + ROUTING_AHEAD + 1) * batch_max  # buffer + unfinished sends + the read
    else:
        buffer_bound = ahead_bound = mem_buf_limit + batch_max  # paused once past the limit
    seen = {"buffered": 0, "batches": 0, "ahead": 0, "delivered": 0, "writes": 0}

    def check() -> None:
        # The gauge is what an operator sees; the read-ahead is file bytes read minus delivered.
        buffered = int(runner.metrics.buffer_bytes._value.get())
        ahead = sum(t.offset for t in tail.files.values()) - seen["delivered"]
        seen["buffered"] = max(seen["buffered"], buffered)
        seen["batches"] = max(seen["batches"], runner.undelivered_batches)
        seen["ahead"] = max(seen["ahead"], ahead)
        seen["writes"] += 1
        assert buffered <= buffer_bound, (buffered, buffer_bound)
        assert ahead <= ahead_bound, (ahead, ahead_bound)

    async def slow_write(batch: Batch) -> None:
        check()
        await asyncio.sleep(0.005)  # the output is the slow side
        await write(batch)
        seen["delivered"] += batch.size_bytes

    async def slow_group(batches: list[Batch]) -> None:
        check()
        await asyncio.sleep(0.005)
        await write_group(batches)
        seen["delivered"] += sum(b.size_bytes for b in batches)

    sink.write, sink.write_group = slow_write, slow_group
    assert await asyncio.wait_for(pipeline.run(), 60) == 0
    assert log.stat().st_size > 10 * ahead_bound  # the input is far bigger than what was held
    # The output really was the slow side: the tail filled what it was allowed to.
    if mem_buf_limit is None:
        assert seen["batches"] == SLOTS
        assert seen["buffered"] > (SLOTS - 2) * READ
    else:
        assert seen["ahead"] >= mem_buf_limit
    assert [r["n"] for r in written_json_lines(tmp_path / "out" / "out.jsonl")] == list(range(LINES))
