"""Delivery policy: retries and backoff, workers, Retryable vs Permanent, dead letters, and the
filesystem buffer inside a real pipeline (tail -> buffer -> sink), with a sink that fails in
scripted ways. Records are counted by identity: nothing lost, nothing repeated."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import generate_latest

from kubetrail.core.acks import AckToken
from kubetrail.core.config import load_config
from kubetrail.core.dead_letter import DeadLetters
from kubetrail.core.errors import ConfigError, PermanentError, RetryableError
from kubetrail.core.metrics import MetricsRegistry
from kubetrail.core.record import Batch, Record
from kubetrail.runtime.pipeline import EXIT_UNDELIVERED, Pipeline
from kubetrail.runtime.router import RoutedSink, Router
from kubetrail.runtime.routing import TagMatcher
from kubetrail.runtime.sink_runner import SinkRunner
from kubetrail.sinks import file as file_module
from kubetrail.sinks.file import FileSink
from tests.files import written_json_lines
from tests.unit.helpers import build, tail_file_config, write

LOG = logging.getLogger("kubetrail.test.delivery")


class ScriptedSink:
    """``script``: what each successive write does: None (deliver), an exception to raise, or
    ``"hang"`` (wait for ``release``). Delivered record numbers are kept in order."""

    def __init__(self, script: list[Any] | None = None, default: Any = None) -> None:
        self.script = list(script or [])
        self.default = default
        self.delivered: list[int] = []
        self.attempts = 0
        self.concurrent = 0
        self.max_concurrent = 0
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()

    async def start(self) -> None:
        return None

    async def write(self, batch: Batch) -> None:
        self.attempts += 1
        self.arrived.set()
        action = self.script.pop(0) if self.script else self.default
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if action == "hang":
                await self.release.wait()
            elif callable(action) and not isinstance(action, type):
                action = action(batch)
            if isinstance(action, BaseException):
                raise action
            await asyncio.sleep(0)
            self.delivered.extend(r.body["n"] for r in batch.records)
        finally:
            self.concurrent -= 1

    async def close(self) -> None:
        return None


def batch(start: int, count: int, done: list[bool] | None = None) -> Batch:
    records = [Record("app", n, {"n": n}, identity=("n", n)) for n in range(start, start + count)]
    token = AckToken((lambda ok: done.append(ok)) if done is not None else None)
    return Batch("app", records, token, size_bytes=8 * count)


def runner_for(sink: ScriptedSink, tmp_path: Path | None = None, **kwargs: Any) -> tuple[SinkRunner, MetricsRegistry]:
    registry = MetricsRegistry()
    metrics = registry.component("out.0", "sink", "test")
    dead = DeadLetters(tmp_path / "rejected", "out.0", metrics, LOG) if tmp_path is not None else None
    kwargs.setdefault("retry_limit", None)
    kwargs.setdefault("backoff_base", 0.01)
    retry_limit = kwargs.pop("retry_limit")
    runner = SinkRunner(sink, "out.0", metrics, LOG, retry_limit, dead_letters=dead, **kwargs)  # type: ignore[arg-type]
    return runner, registry


def metric(registry: MetricsRegistry, name: str, **labels: str) -> float:
    total = 0.0
    for line in generate_latest(registry.registry).decode().splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def dead_letters(tmp_path: Path) -> list[dict[str, Any]]:
    return written_json_lines(tmp_path / "rejected" / "out.0.jsonl")


# -- backoff ----------------------------------------------------------------------------------------


def test_backoff_is_exponential_with_equal_jitter_and_capped() -> None:
    runner, _ = runner_for(ScriptedSink(), backoff_base=1.0, backoff_cap=20.0)
    random.seed(7)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 16), (6, 20), (40, 20)]:
        samples = [runner._backoff(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= s <= ceiling for s in samples), (attempt, min(samples), max(samples))
        assert max(samples) - min(samples) > ceiling / 4  # jittered, not a fixed delay
    # A destination's Retry-After raises the wait, never past the cap.
    assert runner._backoff(1, retry_after=7) == 7
    assert runner._backoff(1, retry_after=500) == 20


async def test_retry_after_hint_is_honoured(tmp_path: Path) -> None:
    sink = ScriptedSink([RetryableError("429", retry_after=0.4)])
    runner, _ = runner_for(sink, backoff_base=0.01, backoff_cap=5)
    runner.start()
    started = asyncio.get_running_loop().time()
    await runner.enqueue(batch(0, 1))
    await asyncio.wait_for(runner.drain(), 5)
    assert asyncio.get_running_loop().time() - started >= 0.39
    assert sink.delivered == [0]


# -- retryable vs permanent -------------------------------------------------------------------------


async def test_retryable_errors_and_unexpected_exceptions_are_retried_until_delivered(tmp_path: Path) -> None:
    sink = ScriptedSink([RetryableError("503"), TimeoutError("slow"), ConnectionResetError("reset"), KeyError("bug")])
    runner, registry = runner_for(sink, tmp_path)
    done: list[bool] = []
    runner.start()
    await runner.enqueue(batch(0, 5, done))
    await asyncio.wait_for(runner.drain(), 5)
    assert sink.delivered == [0, 1, 2, 3, 4] and sink.attempts == 5 and done == [True]
    assert metric(registry, "kubetrail_retries_total") == 4
    assert dead_letters(tmp_path) == []


async def test_permanent_error_is_not_retried_and_goes_to_the_dead_letter_file(tmp_path: Path) -> None:
    sink = ScriptedSink([None, PermanentError("400: mapper_parsing_exception"), None])
    runner, registry = runner_for(sink, tmp_path)
    done: list[bool] = []
    runner.start()
    for start in (0, 10, 20):
        await runner.enqueue(batch(start, 3, done))
    await asyncio.wait_for(runner.drain(), 5)
    assert sink.attempts == 3  # the rejected batch was tried once
    assert sink.delivered == [0, 1, 2, 20, 21, 22]  # and did not block the next one
    letters = dead_letters(tmp_path)
    assert [d["record"]["n"] for d in letters] == [10, 11, 12]
    assert {d["reason"] for d in letters} == {"400: mapper_parsing_exception"}
    assert letters[0]["output"] == "out.0" and letters[0]["tag"] == "app" and letters[0]["identity"] == ["n", 10]
    assert done == [True, True, True]  # dead-lettered is handled for good: checkpoints may move
    assert metric(registry, "kubetrail_records_dead_lettered_total", reason="rejected") == 3
    assert metric(registry, "kubetrail_records_dropped_total") == 0


async def test_partial_rejection_dead_letters_only_the_refused_records(tmp_path: Path) -> None:
    def reject_odd(b: Batch) -> PermanentError:
        return PermanentError(
            "2 of 4 items failed", rejected=[(r, f"item {r.body['n']}: bad") for r in b.records if r.body["n"] % 2]
        )

    sink = ScriptedSink([reject_odd])
    runner, registry = runner_for(sink, tmp_path)
    done: list[bool] = []
    runner.start()
    await runner.enqueue(batch(0, 4, done))
    await asyncio.wait_for(runner.drain(), 5)
    assert [(d["record"]["n"], d["reason"]) for d in dead_letters(tmp_path)] == [(1, "item 1: bad"), (3, "item 3: bad")]
    assert metric(registry, "kubetrail_records_out_total") == 2 and done == [True]


async def test_without_keep_rejected_a_permanent_failure_is_dropped_and_counted() -> None:
    sink = ScriptedSink([PermanentError("400")])
    runner, registry = runner_for(sink)
    done: list[bool] = []
    runner.start()
    await runner.enqueue(batch(0, 2, done))
    await asyncio.wait_for(runner.drain(), 5)
    assert done == [False]  # lost records are reported as not delivered
    assert metric(registry, "kubetrail_records_dropped_total", reason="rejected") == 2


@pytest.mark.parametrize(("limit", "attempts"), [(0, 1), (1, 2), (3, 4)])
async def test_retry_limit_counts_retries_then_dead_letters(tmp_path: Path, limit: int, attempts: int) -> None:
    sink = ScriptedSink(default=RetryableError("503 unavailable"))
    runner, registry = runner_for(sink, tmp_path, retry_limit=limit)
    done: list[bool] = []
    runner.start()
    await runner.enqueue(batch(0, 2, done))
    await asyncio.wait_for(runner.drain(), 5)
    assert sink.attempts == attempts and sink.delivered == []
    letters = dead_letters(tmp_path)
    assert [d["record"]["n"] for d in letters] == [0, 1]
    assert letters[0]["reason"].startswith(f"retry_limit ({limit}) used up; last error: 503 unavailable")
    assert metric(registry, "kubetrail_records_dead_lettered_total", reason="retry_limit") == 2


async def test_unwritable_dead_letter_directory_drops_counts_and_keeps_going(tmp_path: Path) -> None:
    (tmp_path / "rejected").write_text("a file where the directory should be")
    sink = ScriptedSink([PermanentError("400"), None])
    runner, registry = runner_for(sink, tmp_path)
    done: list[bool] = []
    runner.start()
    await runner.enqueue(batch(0, 1, done))
    await runner.enqueue(batch(1, 1, done))
    await asyncio.wait_for(runner.drain(), 5)
    assert sink.delivered == [1] and done == [False, True]
    assert metric(registry, "kubetrail_records_dropped_total", reason="rejected") == 1


# -- workers ----------------------------------------------------------------------------------------


async def test_workers_deliver_concurrently_and_a_stuck_batch_holds_only_its_worker() -> None:
    sink = ScriptedSink(["hang"])
    runner, _ = runner_for(sink, workers=3)
    runner.start()
    for start in range(0, 50, 5):
        await runner.enqueue(batch(start, 5))
    for _ in range(200):
        if len(sink.delivered) == 45:
            break
        await asyncio.sleep(0.01)
    assert sorted(sink.delivered) == list(range(5, 50))  # the others went past the stuck one
    sink.release.set()
    await asyncio.wait_for(runner.drain(), 5)
    assert Counter(sink.delivered) == Counter(range(50))
    assert sink.max_concurrent >= 2


async def test_one_worker_delivers_in_order() -> None:
    sink = ScriptedSink([RetryableError("x"), None, RetryableError("y")])
    runner, _ = runner_for(sink, workers=1)
    runner.start()
    for start in range(0, 30, 3):
        await runner.enqueue(batch(start, 3))
    await asyncio.wait_for(runner.drain(), 5)
    assert sink.delivered == list(range(30)) and sink.max_concurrent == 1


# -- the filesystem buffer in a pipeline ------------------------------------------------------------


def lines(n: int, start: int = 0) -> str:
    return "".join(orjson.dumps({"n": i}).decode() + "\n" for i in range(start, start + n))


def fs_config(tmp_path: Path, log: Path, *, exit_on_eof: bool = True, service: str = "", output: str = "") -> Path:
    return tail_file_config(
        tmp_path,
        log,
        input_extra="    parser json\n    storage.type filesystem\n    batch_size 256\n    buffer_chunk_size 256",
        output_extra=output,
        service_extra=f"    storage.path {tmp_path / 'storage'}\n{service}",
        exit_on_eof=exit_on_eof,
        grace=3,
    )


def out_numbers(tmp_path: Path) -> Counter[int]:
    return Counter(record["n"] for record in written_json_lines(tmp_path / "out" / "out.jsonl"))


async def test_tail_to_filesystem_buffer_to_file_delivers_everything_once(tmp_path: Path) -> None:
    log = write(tmp_path / "app.log", lines(2000))
    pipeline = Pipeline(load_config(fs_config(tmp_path, log)))
    assert await asyncio.wait_for(pipeline.run(), 30) == 0
    assert out_numbers(tmp_path) == Counter(range(2000))
    assert sorted(p.name for p in (tmp_path / "storage" / "out.file.0").glob("*.seg")) == []  # all delivered


async def test_sink_down_accumulates_on_disk_checkpoint_moves_and_restart_delivers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The output is down: the input keeps reading (its checkpoint moves: the data is on disk),
    the buffer grows, and a restart with the output back delivers all of it once."""
    log = write(tmp_path / "app.log", lines(500))
    pipeline = Pipeline(load_config(fs_config(tmp_path, log, exit_on_eof=False)))
    pipeline.service["grace"] = 0.3
    sink = ScriptedSink(default="hang")
    pipeline.runners[0].sink = sink  # type: ignore[assignment]
    task = asyncio.create_task(pipeline.run())
    tail = pipeline.sources[0].instance
    for _ in range(300):
        await asyncio.sleep(0.02)
        if any(t.committed == log.stat().st_size for t in tail.files.values()):
            break
    assert any(t.committed == log.stat().st_size for t in tail.files.values()), "checkpoint did not reach the end"
    spool = pipeline.runners[0].spool
    assert spool is not None and spool.disk_bytes > 500 * 8
    with caplog.at_level(logging.WARNING, logger="kubetrail"):
        pipeline.request_stop()
        assert await asyncio.wait_for(task, 10) == EXIT_UNDELIVERED
    assert sink.delivered == []
    (left,) = [r for r in caplog.records if r.getMessage().startswith("undelivered at shutdown")]
    assert left.component == "file.0" and 0 < left.records <= 500  # type: ignore[attr-defined]
    assert left.filesystem_buffer_bytes == spool.disk_bytes > 0  # type: ignore[attr-defined]
    (summary,) = [r for r in caplog.records if r.levelno == logging.ERROR and "grace period" in r.getMessage()]
    assert summary.outputs.startswith(f"file.0 ({left.records} records in ")  # type: ignore[attr-defined]
    assert f"; {spool.disk_bytes} bytes kept in its filesystem buffer)" in summary.outputs  # type: ignore[attr-defined]
    # Restart: the tail has nothing new; the backlog comes from the buffer.
    second = Pipeline(load_config(fs_config(tmp_path, log)))
    assert await asyncio.wait_for(second.run(), 30) == 0
    assert out_numbers(tmp_path) == Counter(range(500))


async def test_unwritable_output_then_recovery_delivers_the_buffered_data(tmp_path: Path) -> None:
    """The file output's directory cannot be created (a file is in the way; chmod does not stop
    root) while the input keeps producing: data accumulates on disk, then all of it arrives."""
    log = write(tmp_path / "app.log", lines(300))
    blocker = write(tmp_path / "out", "not a directory")
    service = "    scheduler.base 0.05\n    scheduler.cap 0.2"
    pipeline = Pipeline(load_config(fs_config(tmp_path, log, exit_on_eof=False, service=service)))
    task = asyncio.create_task(pipeline.run())
    tail = pipeline.sources[0].instance
    for _ in range(300):
        await asyncio.sleep(0.02)
        if any(t.committed == log.stat().st_size for t in tail.files.values()):
            break
    with log.open("a") as handle:  # the input keeps producing while the output is down
        handle.write(lines(200, 300))
    for _ in range(300):
        await asyncio.sleep(0.02)
        if any(t.committed == log.stat().st_size for t in tail.files.values()):
            break
    spool = pipeline.runners[0].spool
    assert spool is not None and spool.disk_bytes > 500 * 8  # all 500 on disk, none delivered
    assert metric(pipeline.metrics, "kubetrail_errors_total", type="start") >= 1  # kept trying
    blocker.unlink()
    for _ in range(300):
        await asyncio.sleep(0.05)
        if sum(out_numbers(tmp_path).values()) >= 500:
            break
    pipeline.request_stop()
    assert await asyncio.wait_for(task, 10) == 0
    assert out_numbers(tmp_path) == Counter(range(500))


async def test_total_limit_size_pauses_tail_instead_of_dropping(tmp_path: Path) -> None:
    log = write(tmp_path / "app.log", lines(3000))
    pipeline = Pipeline(load_config(fs_config(tmp_path, log, output="    storage.total_limit_size 4k")))
    sink = ScriptedSink(default="hang")
    pipeline.runners[0].sink = sink  # type: ignore[assignment]
    task = asyncio.create_task(pipeline.run())
    await asyncio.wait_for(sink.arrived.wait(), 5)
    await asyncio.sleep(0.5)
    tail = pipeline.sources[0].instance
    committed = max((t.committed for t in tail.files.values()), default=0)
    assert 0 < committed < log.stat().st_size // 4  # stopped reading near the limit
    spool = pipeline.runners[0].spool
    assert spool is not None and spool.disk_bytes < 4096 + 2048
    sink.default = None
    sink.release.set()
    assert await asyncio.wait_for(task, 30) == 0
    assert Counter(sink.delivered) == Counter(range(3000))


async def test_dead_letters_land_under_storage_path_by_default(tmp_path: Path) -> None:
    log = write(tmp_path / "app.log", lines(6))
    pipeline = Pipeline(load_config(fs_config(tmp_path, log)))
    pipeline.runners[0].sink = ScriptedSink([PermanentError("400 no")])  # type: ignore[assignment]
    assert await asyncio.wait_for(pipeline.run(), 10) == 0
    letters = [orjson.loads(x) for x in (tmp_path / "storage" / "rejected" / "file.0.jsonl").read_bytes().splitlines()]
    assert letters and {d["reason"] for d in letters} == {"400 no"}


@pytest.mark.parametrize(
    ("service", "where"),
    [
        ("", "storage/rejected"),
        ("    storage.rejected.path dead", "storage/dead"),
        ("    storage.keep.rejected off", None),
    ],
)
def test_inputs_and_outputs_get_the_dead_letter_writer_in_their_context(
    tmp_path: Path, service: str, where: str | None
) -> None:
    """The runtime's policy (storage.path, storage.keep.rejected, storage.rejected.path) reaches
    plugins through their context (the kafka input writes its bad messages there); filters get none."""
    config = fs_config(
        tmp_path,
        tmp_path / "app.log",
        service=service,
        output="[FILTER]\n    name grep\n    match *\n    exclude n ^x$",
    )
    pipeline = Pipeline(load_config(config))
    (source,), (sink,) = pipeline.sources, pipeline.sinks
    assert all(c.instance.ctx.dead_letters is None for c in pipeline.transforms) and pipeline.transforms
    for built in (source, sink):
        letters = built.instance.ctx.dead_letters
        if where is None:
            assert letters is None
        else:
            assert letters is not None and letters.path == tmp_path / where / f"{built.component_id}.jsonl"
    assert pipeline.runners[0].dead_letters is sink.instance.ctx.dead_letters


@pytest.mark.parametrize(
    ("service", "input_extra", "message"),
    [
        ("", "    storage.type filesystem", "storage.type filesystem needs storage.path"),
        ("", "    storage.type disk", "expected one of memory, filesystem"),
        ("    storage.keep.rejected on", "", "needs storage.path"),
        ("    storage.sync sometimes", "", "storage.sync"),
    ],
)
def test_storage_config_errors_name_the_key(tmp_path: Path, service: str, input_extra: str, message: str) -> None:
    config = write(
        tmp_path / "bad.conf",
        f"[SERVICE]\n{service}\n[INPUT]\n    name tail\n    path /x\n{input_extra}\n"
        "[OUTPUT]\n    name stdout\n    match *\n",
    )
    with pytest.raises(ConfigError, match=message):
        Pipeline(load_config(config))


async def test_a_locked_buffer_directory_fails_the_start_clearly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = write(tmp_path / "app.log", lines(1))
    first = Pipeline(load_config(fs_config(tmp_path, log)))
    first.runners[0].open()
    try:
        second = Pipeline(load_config(fs_config(tmp_path, log)))
        with caplog.at_level(logging.ERROR):
            assert await second.run() == 1
        assert "in use by another kubetrail process" in caplog.text
    finally:
        first.runners[0].cancel()


# --- group writes (the file output's group commit) -------------------------------------------


def file_numbers(path: Path) -> list[int]:
    return [orjson.loads(line)["n"] for line in path.read_bytes().splitlines()]


def counting_fsync(monkeypatch: pytest.MonkeyPatch, fail_first: int = 0) -> list[int]:
    """Counts the file output's fsyncs; the first ``fail_first`` raise EIO."""

    calls: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) <= fail_first:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(file_module.os, "fsync", fsync)
    return calls


async def test_batches_queued_for_one_file_are_written_together_with_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    sink = build(FileSink, path=str(tmp_path), file="out.log", format="plain")
    runner, registry = runner_for(sink)  # type: ignore[arg-type]
    fsyncs = counting_fsync(monkeypatch)
    done: list[bool] = []
    for start in range(0, 50, 10):  # queued before the worker runs: one group
        await runner.enqueue(batch(start, 10, done))
    runner.start()
    await runner.drain()  # its end marker, queued behind them, stops the worker after the group
    await sink.close()
    assert file_numbers(tmp_path / "out.log") == list(range(50))
    assert len(fsyncs) == 1
    assert done == [True] * 5
    assert metric(registry, "kubetrail_records_out_total", component="out.0") == 50


async def test_a_failed_group_write_leaves_nothing_and_each_batch_is_then_written_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group's data reached the file but its fsync failed: the group is cut back, and each
    batch is delivered on its own (with the usual retries): one copy of each, in order."""

    sink = build(FileSink, path=str(tmp_path), file="out.log", format="plain")
    await sink.start()
    await sink.write(batch(100, 2))  # written before: must survive the cut
    runner, registry = runner_for(sink)  # type: ignore[arg-type]
    fsyncs = counting_fsync(monkeypatch, fail_first=2)  # the group's, then the first batch's
    done: list[bool] = []
    for start in range(0, 30, 10):
        await runner.enqueue(batch(start, 10, done))
    runner.start()
    await runner.drain()
    await sink.close()
    assert file_numbers(tmp_path / "out.log") == [100, 101, *range(30)]
    assert len(fsyncs) == 2 + 3  # the failed group, the failed first try, three batches
    assert done == [True] * 3
    assert metric(registry, "kubetrail_errors_total", component="out.0") == 2
    assert metric(registry, "kubetrail_retries_total") == 1


async def test_a_line_torn_by_a_crash_does_not_spoil_the_next_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """kill -9 in the middle of a write leaves a fragment at the end of the file. The restarted
    output ends it with a newline before appending, so the batch written again is whole."""
    target = tmp_path / "out.log"
    target.write_bytes(b'{"n":7}\n{"n":8,"pad')  # the fragment of a batch never acknowledged
    sink = build(FileSink, path=str(tmp_path), file="out.log", format="plain")
    await sink.start()
    await sink.write(batch(8, 2))
    await sink.close()
    assert target.read_bytes().split(b"\n")[:3] == [b'{"n":7}', b'{"n":8,"pad', b'{"n":8}']
    assert "ended mid-line" in caplog.text
    caplog.clear()
    sink = build(FileSink, path=str(tmp_path), file="out.log", format="plain")  # a clean end: nothing added
    await sink.start()
    await sink.write(batch(10, 1))
    await sink.close()
    assert target.read_bytes().endswith(b'{"n":9}\n{"n":10}\n')
    assert "ended mid-line" not in caplog.text


async def test_a_pipe_is_written_without_looking_for_a_torn_line(tmp_path: Path) -> None:
    """The torn-line check reads back only regular files, and fsync is skipped where the file
    cannot be synced (EINVAL): a pipe, as /dev/stdout often is, is written and acknowledged
    instead of retried forever."""
    read_end, write_end = os.pipe()
    try:
        sink = build(FileSink, path="/proc/self/fd", file=str(write_end), format="plain")
        await sink.start()
        await sink.write(batch(0, 2))
        await sink.close()
        assert os.read(read_end, 1000) == b'{"n":0}\n{"n":1}\n'
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_only_batches_for_the_same_file_are_grouped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    sink = build(FileSink, path=str(tmp_path), format="plain")  # one file per tag
    runner, _ = runner_for(sink)  # type: ignore[arg-type]
    fsyncs = counting_fsync(monkeypatch)
    for tag, start in [("a", 0), ("a", 10), ("b", 20), ("a", 30), ("a", 40)]:
        queued = batch(start, 10)
        queued.tag = tag
        await runner.enqueue(queued)
    runner.start()
    await runner.drain()
    await sink.close()
    assert file_numbers(tmp_path / "a") == [*range(0, 20), *range(30, 50)]
    assert file_numbers(tmp_path / "b") == list(range(20, 30))
    assert len(fsyncs) == 3  # a+a, b, a+a


async def test_a_send_reaches_the_sinks_only_after_the_send_it_follows() -> None:
    """Router.send(after=...): the tail hands the next batch over before the last one is routed;
    the next one's filters run at once, but it is queued for the sinks only after the last."""
    sink = ScriptedSink()
    runner, registry = runner_for(sink)
    router = Router([], [RoutedSink(runner, TagMatcher("*"))], LOG)
    source_metrics = registry.component("in.0", "source", "test")
    first_routed = asyncio.get_running_loop().create_future()
    second = asyncio.create_task(router.send(batch(10, 2), source_metrics, after=first_routed))
    await asyncio.sleep(0.05)
    assert runner._queue.empty(), "queued before the send it follows"
    await router.send(batch(0, 2), source_metrics)
    first_routed.set_result(None)
    await second
    runner.start()
    await runner.drain()
    assert sink.delivered == [0, 1, 10, 11]


async def test_an_interrupted_send_keeps_its_batch_in_flight() -> None:
    """A send cancelled while it waits for a full sink buffer (shutdown), or whose previous send
    failed, must not count its batch as delivered: its token stays pending, so the source's
    checkpoint cannot move past it and the batch is read again after a restart."""
    sink = ScriptedSink()
    runner, registry = runner_for(sink, max_batches=1)
    router = Router([], [RoutedSink(runner, TagMatcher("*"))], LOG)
    source_metrics = registry.component("in.0", "source", "test")
    done: list[bool] = []
    await router.send(batch(0, 1, done), source_metrics)  # fills the buffer (no worker yet)
    blocked = asyncio.create_task(router.send(batch(1, 1, done), source_metrics))
    await asyncio.sleep(0.05)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    failed = asyncio.get_running_loop().create_future()
    failed.set_exception(RuntimeError("the send before failed"))
    with pytest.raises(RuntimeError, match="the send before failed"):
        await router.send(batch(2, 1, done), source_metrics, after=failed)
    runner.start()
    await runner.drain()
    assert sink.delivered == [0]
    assert done == [True]  # only the first batch's token completed


class GroupingSink(ScriptedSink):
    """Writes groups (one key for every batch); each group write waits for ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[int] = []

    def group_key(self, batch: Batch) -> object | None:
        return "one"

    async def write_group(self, batches: list[Batch]) -> None:
        self.groups.append(len(batches))
        await self.release.wait()
        for queued in batches:
            self.delivered.extend(r.body["n"] for r in queued.records)


async def test_a_group_in_hand_counts_against_the_buffer() -> None:
    """max_batches bounds the batches queued *and* being delivered: while a group of half the
    buffer is written, only the other half can be filled (the memory a full buffer holds stays
    what it was before groups)."""
    sink = GroupingSink()
    runner, _ = runner_for(sink, max_batches=4)  # type: ignore[arg-type]
    for start in (0, 10, 20):
        await runner.enqueue(batch(start, 1))
    runner.start()
    await asyncio.sleep(0.05)  # the worker took a group of 2 and waits in write_group
    assert sink.groups == [2]
    await runner.enqueue(batch(30, 1))  # the 4th slot
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(runner.enqueue(batch(40, 1)), 0.1)
    sink.release.set()
    await runner.enqueue(batch(40, 1))
    await runner.drain()
    assert sink.delivered == [0, 10, 20, 30, 40]
    assert max(sink.groups) == 2  # half the buffer (a lone batch goes through write)
