"""The filesystem buffer on its own: frame format, delivery, replay, damage, limits, disk errors.

Every test counts records by identity (``n``) and asserts nothing lost and nothing repeated.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from kubetrail.core.acks import AckToken
from kubetrail.core.metrics import ComponentMetrics, MetricsRegistry
from kubetrail.core.record import Batch, Record
from kubetrail.runtime import disk_buffer
from kubetrail.runtime.disk_buffer import (
    FILE_MAGIC,
    FRAME_HEADER,
    FRAME_MAGIC,
    DiskQueue,
    StorageError,
    decode_batch,
    encode_batch,
)
from tests.timing import scaled

LOG = logging.getLogger("kubetrail.test.buffer")


def batch(start: int, count: int = 3, acked: list[bool] | None = None) -> Batch:
    records = [
        Record("app", 1_700_000_000_000_000_000 + n, {"n": n}, identity=("id", n)) for n in range(start, start + count)
    ]
    token = AckToken((lambda ok: acked.append(ok)) if acked is not None else None)
    return Batch("app", records, token, size_bytes=10 * count)


def numbers(batches: list[Batch]) -> Counter[int]:
    return Counter(r.body["n"] for b in batches for r in b.records)


def metric(metrics: MetricsRegistry, name: str, **labels: str) -> float:
    total = 0.0
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def release_all(received: list[Batch]) -> None:
    for b in received:
        if b.ack is not None and not b.ack.done:
            b.ack.release(True)


class Harness:
    """A DiskQueue whose "output" collects batches; the test decides when they are delivered."""

    def __init__(self, directory: Path, **options: Any) -> None:
        self.registry = MetricsRegistry()
        self.metrics: ComponentMetrics = self.registry.component("out.0", "sink", "test")
        self.queue = DiskQueue(directory, self.metrics, LOG, **options)
        self.received: list[Batch] = []
        self.arrived = asyncio.Event()
        self.auto_ack = True

    async def deliver(self, b: Batch) -> None:
        self.received.append(b)
        self.arrived.set()
        if self.auto_ack:
            assert b.ack is not None
            b.ack.release(True)

    def start(self) -> Harness:
        self.queue.open()
        self.queue.start(self.deliver)
        return self

    async def wait_records(self, count: int, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while sum(len(b) for b in self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.registry, name, **labels)


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def frames(path: Path) -> list[tuple[int, int]]:
    """(offset, total length) of each frame in a segment, by walking the headers."""
    data = path.read_bytes()
    assert data[: len(FILE_MAGIC)] == FILE_MAGIC
    out = []
    offset = len(FILE_MAGIC)
    while offset < len(data):
        magic, length, crc = FRAME_HEADER.unpack_from(data, offset)
        assert magic == FRAME_MAGIC
        payload = data[offset + FRAME_HEADER.size : offset + FRAME_HEADER.size + length]
        assert zlib.crc32(payload) == crc
        out.append((offset, FRAME_HEADER.size + length))
        offset += FRAME_HEADER.size + length
    return out


async def wait_until(check: Any, timeout: float = 10) -> None:
    async with asyncio.timeout(scaled(timeout)):  # a loaded machine: see tests/timing.py
        while not check():
            await asyncio.sleep(0.005)


async def fill(directory: Path, batches: int, per: int = 3, **options: Any) -> None:
    """Write ``batches`` batches and stop without delivering any (a crash with a backlog)."""
    h = Harness(directory, **options)
    h.auto_ack = False
    h.start()
    acked: list[bool] = []
    for i in range(batches):
        await h.queue.append(batch(i * per, per, acked))
        await wait_until(lambda i=i: len(acked) == i + 1)  # one frame per write group: segments rotate
    h.queue.close()


# -- format ---------------------------------------------------------------------------------------


def test_payload_round_trip_keeps_records_identity_tags_and_plain_meta() -> None:
    records = [
        Record("app", 1, {"a": 1}, identity=("uid", "7"), meta={"labels": {"x": "y"}, "_ack": object()}),
        Record("other", 2, None, b'{"b":2}'),
    ]
    back = decode_batch(encode_batch(Batch("app", records, None, 42)))
    assert back.tag == "app" and back.size_bytes == 42 and len(back) == 2
    assert [r.tag for r in back.records] == ["app", "other"]
    assert [r.time_ns for r in back.records] == [1, 2]
    assert [r.body for r in back.records] == [{"a": 1}, {"b": 2}]
    assert back.records[0].identity == ("uid", "7")
    assert back.records[0].meta == {"labels": {"x": "y"}}  # in-process hooks stay behind
    assert back.records[1].identity is None and back.records[1].meta is None


@pytest.mark.parametrize(
    ("identities", "compact"),
    [
        ([("f1", 0), ("f1", 120), ("f1", 2**40)], True),  # a tailed file: (uid, line offset)
        ([("f1", 0), ("f2", 120)], False),  # two files
        ([("f1", 0), ("f1", True)], False),  # a bool is not an offset
        ([("f1", 0), None], False),
        ([("f1", 0), ("f1", 2**63)], False),  # beyond int64
        ([("uid", "7"), ("uid", "8")], False),  # Events: (uid, resourceVersion) texts
    ],
)
def test_identities_round_trip_and_shared_file_ids_are_stored_once(
    identities: list[tuple[Any, ...] | None], compact: bool
) -> None:
    records = [Record("app", n, {"n": n}, identity=identity) for n, identity in enumerate(identities)]
    frame = encode_batch(Batch("app", records, None, 1))
    back = decode_batch(frame)
    assert [r.identity for r in back.records] == identities
    assert [type(r.identity[1]) if r.identity else None for r in back.records] == [
        type(i[1]) if i else None for i in identities
    ]
    payload = disk_buffer._DECODER.decode(frame)
    assert (payload.id_offsets is not None, payload.ids is None) == (compact, compact)


def test_raw_block_survives_the_round_trip_unparsed() -> None:
    block = b'{"n":1}\n{"n":2}\n'
    original = Batch(
        "app",
        None,
        None,
        len(block),
        raw_block=block,
        materialize=lambda: [
            Record("app", 5, None, b'{"n":1}', identity=("f1", 0)),
            Record("app", 6, None, b'{"n":2}', identity=("f1", 8)),
        ],
        count=2,
    )
    back = decode_batch(encode_batch(original))
    assert back.raw_block == block and len(back) == 2
    assert [(r.time_ns, r.body, r.identity) for r in back.records] == [
        (5, {"n": 1}, ("f1", 0)),
        (6, {"n": 2}, ("f1", 8)),
    ]


async def test_segment_file_layout_is_magic_then_checksummed_frames(tmp_path: Path) -> None:
    await fill(tmp_path, 4)
    (segment,) = segments(tmp_path)
    found = frames(segment)
    assert len(found) == 4
    data = segment.read_bytes()
    offset, length = found[0]
    payload = data[offset + FRAME_HEADER.size : offset + length]
    assert numbers([decode_batch(payload)]) == Counter({0: 1, 1: 1, 2: 1})
    cursor = (tmp_path / "cursor").read_bytes()
    _seq, position, crc = struct.unpack("<QQI", cursor)
    assert zlib.crc32(cursor[:16]) == crc and position == len(FILE_MAGIC)


# -- delivery, acknowledgement, deletion ------------------------------------------------------------


async def test_source_is_acknowledged_once_written_and_segments_go_once_delivered(tmp_path: Path) -> None:
    h = Harness(tmp_path, segment_size=200)
    h.auto_ack = False
    h.start()
    acked: list[bool] = []
    for i in range(10):
        await h.queue.append(batch(i * 3, 3, acked))
        await wait_until(lambda i=i: len(acked) == i + 1)  # one write group each
    await h.wait_records(30)
    assert acked == [True] * 10  # on disk: acknowledged although nothing was delivered yet
    assert len(segments(tmp_path)) > 3  # rotated at the small segment size
    for b in h.received:
        assert b.ack is not None
        b.ack.release(True)
    await asyncio.wait_for(h.queue.drain(), 10)
    assert numbers(h.received) == Counter(range(30))
    assert len(segments(tmp_path)) == 1  # only the active segment is left
    assert h.queue.disk_bytes < 200 + 120  # at most the active segment
    h.queue.close()


async def test_out_of_order_deliveries_move_the_cursor_only_over_contiguous_frames(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.auto_ack = False
    h.start()
    for i in range(3):
        await h.queue.append(batch(i * 3, 3))
    await h.wait_records(9)
    h.received[2].ack.release(True)  # type: ignore[union-attr]
    h.received[1].ack.release(True)  # type: ignore[union-attr]
    await asyncio.sleep(0.05)
    h.queue.close()  # frame 0 was never delivered: all three come back (at-least-once)
    again = Harness(tmp_path).start()
    await again.wait_records(9)
    await asyncio.wait_for(again.queue.drain(), 10)
    assert numbers(again.received) == Counter(range(9))
    again.queue.close()


# -- replay -------------------------------------------------------------------------------------


async def test_backlog_is_replayed_after_a_restart_exactly_once(tmp_path: Path) -> None:
    await fill(tmp_path, 20, segment_size=300)
    h = Harness(tmp_path).start()
    await h.wait_records(60)
    await asyncio.wait_for(h.queue.drain(), 10)
    assert numbers(h.received) == Counter(range(60))
    h.queue.close()
    # Everything was delivered: a third start has nothing to replay.
    h3 = Harness(tmp_path).start()
    await asyncio.sleep(0.2)
    assert h3.received == []
    h3.queue.close()


async def test_partly_delivered_backlog_replays_only_the_rest(tmp_path: Path) -> None:
    await fill(tmp_path, 10)
    h = Harness(tmp_path)
    h.auto_ack = False
    h.start()
    await h.wait_records(30)
    for b in h.received[:4]:
        b.ack.release(True)  # type: ignore[union-attr]
    await asyncio.sleep(0.05)
    h.queue.close()
    h2 = Harness(tmp_path).start()
    await h2.wait_records(18)
    await asyncio.wait_for(h2.queue.drain(), 10)
    assert numbers(h2.received) == Counter(range(12, 30))
    h2.queue.close()


async def test_backlog_larger_than_the_memory_budget_is_read_in_pieces(tmp_path: Path) -> None:
    await fill(tmp_path, 50, per=20)
    h = Harness(tmp_path, mem_limit=2000)
    h.auto_ack = False
    h.start()
    await asyncio.sleep(0.2)
    handed = len(h.received)
    assert 0 < handed < 50  # held back by storage.backlog.mem_limit
    while sum(len(b) for b in h.received) < 1000:
        release_all(h.received)
        await asyncio.sleep(0.01)
    release_all(h.received)
    await asyncio.wait_for(h.queue.drain(), 10)
    assert numbers(h.received) == Counter(range(1000))
    h.queue.close()


# -- damage ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 5, 13, 40])
async def test_torn_tail_is_cut_off_counted_and_the_rest_delivered(tmp_path: Path, cut: int) -> None:
    await fill(tmp_path, 5)
    (segment,) = segments(tmp_path)
    offset, length = frames(segment)[-1]
    with segment.open("r+b") as handle:
        handle.truncate(offset + min(cut, length - 1))  # the last frame half written (a crash)
    h = Harness(tmp_path).start()
    await h.wait_records(12)
    await asyncio.wait_for(h.queue.drain(), 10)
    assert numbers(h.received) == Counter(range(12))  # frame 5 was never acknowledged to its source
    assert h.metric("kubetrail_buffer_corruption_total", kind="torn_tail") == 1
    assert not segment.exists() or segment.stat().st_size == offset
    h.queue.close()


async def test_garbage_after_the_last_frame_is_cut_off(tmp_path: Path) -> None:
    await fill(tmp_path, 3)
    (segment,) = segments(tmp_path)
    with segment.open("ab") as handle:
        handle.write(b"\x00" * 100 + FRAME_MAGIC + b"\xff\xff")
    h = Harness(tmp_path).start()
    await h.wait_records(9)
    assert numbers(h.received) == Counter(range(9))
    assert h.metric("kubetrail_buffer_corrupt_bytes_total", kind="torn_tail") == 106
    h.queue.close()


@pytest.mark.parametrize("where", ["payload", "length"])
async def test_corrupt_frame_in_the_middle_is_skipped_and_counted(tmp_path: Path, where: str) -> None:
    await fill(tmp_path, 5)
    (segment,) = segments(tmp_path)
    offset, _length = frames(segment)[2]
    data = bytearray(segment.read_bytes())
    position = offset + FRAME_HEADER.size + 5 if where == "payload" else offset + 5
    data[position] ^= 0xFF
    segment.write_bytes(bytes(data))
    h = Harness(tmp_path).start()
    await h.wait_records(12)
    await asyncio.wait_for(h.queue.drain(), 10)
    assert numbers(h.received) == Counter(n for n in range(15) if n not in (6, 7, 8))
    assert h.metric("kubetrail_buffer_corruption_total", kind="corrupt_frame") == 1
    assert h.metric("kubetrail_buffer_corruption_total", kind="torn_tail") == 0
    h.queue.close()
    # The damaged frame is behind the cursor now: the next start is clean.
    h2 = Harness(tmp_path).start()
    await asyncio.sleep(0.1)
    assert h2.received == []
    h2.queue.close()


async def test_corrupt_frame_in_an_older_segment_is_skipped(tmp_path: Path) -> None:
    await fill(tmp_path, 12, segment_size=200)
    first = segments(tmp_path)[0]
    offset, _ = frames(first)[0]
    data = bytearray(first.read_bytes())
    data[offset + FRAME_HEADER.size + 3] ^= 0x55
    first.write_bytes(bytes(data))
    h = Harness(tmp_path).start()
    await h.wait_records(33)
    await asyncio.wait_for(h.queue.drain(), 10)
    assert numbers(h.received) == Counter(range(3, 36))
    assert h.metric("kubetrail_buffer_corruption_total", kind="corrupt_frame") == 1
    h.queue.close()


async def test_segment_with_a_bad_header_is_set_aside(tmp_path: Path) -> None:
    await fill(tmp_path, 12, segment_size=200)
    first = segments(tmp_path)[0]
    lost = sum(1 for _ in frames(first)) * 3
    first.write_bytes(b"NOTASEG!" + first.read_bytes()[8:])
    h = Harness(tmp_path).start()
    await h.wait_records(36 - lost)
    await asyncio.wait_for(h.queue.drain(), 10)
    assert numbers(h.received) == Counter(range(lost, 36))
    assert h.metric("kubetrail_buffer_corruption_total", kind="bad_segment") == 1
    assert first.with_name(first.name + ".corrupt").exists()
    h.queue.close()


async def test_damaged_cursor_replays_everything_rather_than_nothing(tmp_path: Path) -> None:
    await fill(tmp_path, 4)
    (tmp_path / "cursor").write_bytes(b"\x01" * 20)
    h = Harness(tmp_path).start()
    await h.wait_records(12)
    assert numbers(h.received) == Counter(range(12))
    assert h.metric("kubetrail_buffer_corruption_total", kind="bad_cursor") == 1
    h.queue.close()


async def test_empty_and_header_only_segments_do_not_break_a_start(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "000000000001.seg").write_bytes(b"")
    (tmp_path / "000000000002.seg").write_bytes(FILE_MAGIC[:3])
    (tmp_path / "000000000003.seg").write_bytes(FILE_MAGIC)
    h = Harness(tmp_path).start()
    await h.queue.append(batch(0))
    await h.wait_records(3)
    assert numbers(h.received) == Counter(range(3))
    h.queue.close()


# -- limits, locking, disk errors ------------------------------------------------------------------


async def test_total_limit_size_pauses_appends_until_deliveries_free_space(tmp_path: Path) -> None:
    h = Harness(tmp_path, total_limit=2000, segment_size=300)
    h.auto_ack = False
    h.start()
    appended = 0

    async def producer() -> None:
        nonlocal appended
        for i in range(40):
            await h.queue.append(batch(i * 3, 3))
            appended += 1

    task = asyncio.create_task(producer())
    await wait_until(lambda: appended > 0)  # the first appends can take a while on a loaded machine
    await asyncio.sleep(0.3)
    assert 0 < appended < 40  # paused at the limit, not dropping
    assert h.queue.disk_bytes <= 2000 + 400
    while not task.done() or sum(len(b) for b in h.received) < 120:
        release_all(h.received)
        await asyncio.sleep(0.01)
    release_all(h.received)
    await asyncio.wait_for(h.queue.drain(), 10)
    assert numbers(h.received) == Counter(range(120))
    h.queue.close()


async def test_a_second_process_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    first = Harness(tmp_path).start()
    with pytest.raises(StorageError, match="in use by another kubetrail process"):
        Harness(tmp_path).queue.open()
    first.queue.close()
    Harness(tmp_path).start().queue.close()  # free again once the first one closed


async def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError, match="cannot use buffer directory"):
        Harness(blocker / "buf").queue.open()


async def test_disk_full_pauses_inputs_then_resumes_without_loss_or_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_writev = os.writev
    failing = {"on": True, "calls": 0}

    def writev(fd: int, buffers: Any) -> int:
        if failing["on"]:
            failing["calls"] += 1
            written = real_writev(fd, [bytes(buffers[0])[:7]])  # a partial frame, then the disk is full
            assert written == 7
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev(fd, buffers)

    monkeypatch.setattr(disk_buffer.os, "writev", writev)
    h = Harness(tmp_path)
    h.start()
    acked: list[bool] = []
    for i in range(3):
        await h.queue.append(batch(i * 3, 3, acked))
    await wait_until(lambda: h.metric("kubetrail_buffer_write_errors_total", errno="ENOSPC") >= 1)
    done = asyncio.ensure_future(h.queue.append(batch(9, 3, acked)))
    await asyncio.sleep(0.5)
    assert failing["calls"] >= 1 and acked == [] and h.received == []
    assert not done.done()  # the input is paused, not dropping
    failing["on"] = False
    await asyncio.wait_for(done, 10)
    await h.wait_records(12)
    await asyncio.wait_for(h.queue.drain(), 10)
    assert numbers(h.received) == Counter(range(12)) and acked == [True] * 4
    for segment in segments(tmp_path):
        frames(segment)  # every frame intact: the partial write was cut off
    h.queue.close()


async def test_sync_full_fsyncs_before_acknowledging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    acked: list[bool] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(len(acked))  # how many sources were acknowledged when the sync ran
        real(fd)

    monkeypatch.setattr(disk_buffer.os, "fdatasync", fdatasync)
    h = Harness(tmp_path, sync="full").start()
    base = len(synced)
    await h.queue.append(batch(0, 3, acked))
    await h.wait_records(3)
    assert len(synced) > base and synced[-1] == 0 and acked == [True]
    h.queue.close()
