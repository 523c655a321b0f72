"""Read-ahead of a tail whose output is slower than its input stays bounded.

Without ``mem_buf_limit`` the bound is structural: an output's buffer holds at most
``max_batches`` (16) batches and ``max_bytes`` input bytes (or one batch bigger than that, alone),
queued or being written, ``Router``'s sends wait while it is full,
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
from tests.unit.test_delivery import ScriptedSink, batch, runner_for

READ = 8 * 1024  # batch_size: the bytes one read takes
LINES = 12_000
SLOTS = 16  # SinkRunner's default max_batches


def big_log(path: Path) -> int:
    """~2.4 MB of JSON lines (300x one read); returns the longest line's length."""
    lines = [orjson.dumps({"n": i, "pad": "x" * (150 + i % 100)}) + b"\n" for i in range(LINES)]
    path.write_bytes(b"".join(lines))
    return max(len(line) for line in lines)


@pytest.mark.parametrize(
    ("mem_buf_limit", "max_bytes"),
    [(None, None), (64 * 1024, None), (None, 40_000), (None, 4_000)],
    ids=["default", "mem_buf_limit", "max_bytes", "max_bytes_below_one_batch"],
)
async def test_a_slow_output_holds_the_tail_back_by_bytes_and_loses_nothing(
    tmp_path: Path, mem_buf_limit: int | None, max_bytes: int | None
) -> None:
    log = tmp_path / "big.log"
    longest = big_log(log)
    extra = f"    parser json\n    batch_size {READ}\n    buffer_chunk_size {READ}\n"
    if mem_buf_limit is not None:
        extra += f"    mem_buf_limit {mem_buf_limit}\n"
    pipeline = Pipeline(load_config(tail_file_config(tmp_path, log, input_extra=extra)))
    runner = pipeline.runners[0]
    if max_bytes is not None:
        runner.max_bytes = max_bytes
    tail: Any = pipeline.sources[0].instance
    sink: Any = runner.sink
    write_group = sink.write_group  # the file output's write is a group of one: every write passes here
    batch_max = READ + longest  # one read plus the partial line carried into it
    if mem_buf_limit is None:
        buffer_bound = SLOTS * batch_max if max_bytes is None else max(max_bytes, batch_max)
        ahead_bound = buffer_bound + (ROUTING_AHEAD + 1) * batch_max  # + unfinished sends + the read
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

    async def slow_group(batches: list[Batch]) -> None:
        check()
        await asyncio.sleep(0.005)  # the output is the slow side; the tail fills meanwhile
        check()
        await write_group(batches)
        seen["delivered"] += sum(b.size_bytes for b in batches)

    sink.write_group = slow_group
    assert await asyncio.wait_for(pipeline.run(), 60) == 0
    assert log.stat().st_size > 10 * ahead_bound  # the input is far bigger than what was held
    # The output really was the slow side: the tail filled what it was allowed to.
    if max_bytes is not None:
        assert seen["buffered"] > max_bytes - batch_max if max_bytes > batch_max else seen["batches"] == 1
    elif mem_buf_limit is None:
        assert seen["batches"] == SLOTS
        assert seen["buffered"] > (SLOTS - 2) * READ
    else:
        assert seen["ahead"] >= mem_buf_limit
    assert seen["delivered"] == log.stat().st_size  # each line once, none counted twice
    assert [r["n"] for r in written_json_lines(tmp_path / "out" / "out.jsonl")] == list(range(LINES))


async def test_the_buffer_takes_bytes_up_to_max_bytes_then_waits_first_come_first_served() -> None:
    sink = ScriptedSink(default="hang")
    runner, _ = runner_for(sink, max_bytes=100)
    runner.start()
    await runner.enqueue(batch(0, 5))  # 40 bytes
    await runner.enqueue(batch(5, 5))  # 80
    third = asyncio.create_task(runner.enqueue(batch(10, 5)))  # 120 would not fit
    await asyncio.sleep(0.05)
    fourth = asyncio.create_task(runner.enqueue(batch(15, 1)))  # 88 would, but comes after
    await asyncio.sleep(0.05)
    assert not third.done() and not fourth.done()
    assert runner.undelivered_batches == 2
    assert runner.metrics.buffer_bytes._value.get() == 80  # type: ignore[attr-defined]
    sink.release.set()
    await asyncio.wait_for(asyncio.gather(third, fourth), 5)
    await asyncio.wait_for(runner.drain(), 5)
    assert sink.delivered == list(range(16))


async def test_a_batch_bigger_than_max_bytes_passes_alone() -> None:
    sink = ScriptedSink(default="hang")
    runner, _ = runner_for(sink, max_bytes=100)
    runner.start()
    await asyncio.wait_for(runner.enqueue(batch(0, 50)), 1)  # 400 bytes: an empty buffer takes it
    after = asyncio.create_task(runner.enqueue(batch(50, 1)))
    await asyncio.sleep(0.05)
    assert not after.done()
    sink.release.set()
    await asyncio.wait_for(after, 5)
    await asyncio.wait_for(runner.drain(), 5)
    assert sink.delivered == list(range(51))


async def test_a_cancelled_wait_for_room_leaves_counts_and_slots_as_they_were() -> None:
    sink = ScriptedSink(default="hang")
    runner, _ = runner_for(sink, max_batches=2, max_bytes=100)
    runner.start()
    await runner.enqueue(batch(0, 10))  # 80 bytes, one of two slots
    waiting = asyncio.create_task(runner.enqueue(batch(10, 5)))
    await asyncio.sleep(0.05)
    waiting.cancel()  # shutdown while it waits for room
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert runner.undelivered_batches == 1 and runner.undelivered == 10
    assert runner.metrics.buffer_bytes._value.get() == 80  # type: ignore[attr-defined]
    # Its slot is free again: a batch that fits goes in while the first still hangs; the next
    # one (bytes fit too) waits for a slot, since both are taken.
    await asyncio.wait_for(runner.enqueue(batch(10, 1)), 1)
    third = asyncio.create_task(runner.enqueue(batch(11, 1)))
    await asyncio.sleep(0.05)
    assert not third.done()
    sink.release.set()
    await asyncio.wait_for(third, 5)
    await asyncio.wait_for(runner.drain(), 5)
    assert sink.delivered == [*range(10), 10, 11]
