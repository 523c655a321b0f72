"""Pipeline behaviour: acknowledgements gate checkpoints, retries, draining, restarts."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import orjson
import pytest

from kubetrail.core.config import load_config
from kubetrail.core.errors import PermanentError, RetryableError
from kubetrail.core.record import Batch
from kubetrail.runtime.pipeline import EXIT_UNDELIVERED, Pipeline
from tests.files import written_json_lines
from tests.unit.helpers import tail_file_config, write


class ControlledSink:
    """Stands in for a sink's ``write`` so a test decides when (and whether) delivery succeeds."""

    def __init__(self, failures: list[Exception] | None = None, gate: asyncio.Event | None = None) -> None:
        self.failures = list(failures or [])
        self.gate = gate
        self.delivered: list[dict] = []  # type: ignore[type-arg]
        self.attempts = 0
        self.arrived = asyncio.Event()

    async def start(self) -> None:
        return None

    async def write(self, batch: Batch) -> None:
        self.attempts += 1
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
        self.delivered.extend(r.body for r in batch.records)

    async def close(self) -> None:
        return None


def tail_config(tmp_path: Path, log: Path, extra_output: str = "", exit_on_eof: bool = True) -> Path:
    return tail_file_config(
        tmp_path, log, input_extra="    parser json", output_extra=extra_output, exit_on_eof=exit_on_eof
    )


def stored_offset(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "tail.db") as conn:
        rows = conn.execute("SELECT offset FROM in_tail_files").fetchall()
    return rows[0][0] if rows else -1


def lines(n: int, start: int = 0) -> str:
    return "".join(orjson.dumps({"n": i}).decode() + "\n" for i in range(start, start + n))


def output_numbers(tmp_path: Path) -> list[int]:
    return [record["n"] for record in written_json_lines(tmp_path / "out" / "out.jsonl")]


async def test_checkpoint_moves_only_after_the_sink_acknowledges(tmp_path: Path) -> None:
    log = write(tmp_path / "app.log", lines(3))
    pipeline = Pipeline(load_config(tail_config(tmp_path, log)))
    gate = asyncio.Event()
    sink = ControlledSink(gate=gate)
    pipeline.runners[0].sink = sink  # type: ignore[assignment]
    task = asyncio.create_task(pipeline.run())
    await asyncio.wait_for(sink.arrived.wait(), 5)
    await asyncio.sleep(0.1)
    assert stored_offset(tmp_path) == 0, "offset advanced before delivery"
    gate.set()
    assert await asyncio.wait_for(task, 10) == 0
    assert [b["n"] for b in sink.delivered] == [0, 1, 2]
    assert stored_offset(tmp_path) == log.stat().st_size


async def test_retryable_failures_are_retried_then_delivered_once(tmp_path: Path) -> None:
    log = write(tmp_path / "app.log", lines(5))
    pipeline = Pipeline(load_config(tail_config(tmp_path, log)))
    sink = ControlledSink(failures=[RetryableError("503"), ConnectionError("refused")])
    pipeline.runners[0].sink = sink  # type: ignore[assignment]
    pipeline.runners[0].backoff_base = 0.01
    assert await asyncio.wait_for(pipeline.run(), 10) == 0
    assert [b["n"] for b in sink.delivered] == [0, 1, 2, 3, 4]
    assert sink.attempts == 3
    text = _metrics_text(pipeline)
    assert 'kubetrail_retries_total{component="file.0",kind="sink",plugin="file"} 2.0' in text
    assert stored_offset(tmp_path) == log.stat().st_size


async def test_permanent_failure_drops_counts_and_moves_on(tmp_path: Path) -> None:
    log = write(tmp_path / "app.log", lines(2))
    pipeline = Pipeline(load_config(tail_config(tmp_path, log)))
    sink = ControlledSink(failures=[PermanentError("400 bad payload")])
    pipeline.runners[0].sink = sink  # type: ignore[assignment]
    assert await asyncio.wait_for(pipeline.run(), 10) == 0
    assert sink.delivered == []
    assert 'reason="rejected"} 2.0' in _metrics_text(pipeline)


async def test_retry_limit_drops_after_the_configured_attempts(tmp_path: Path) -> None:
    log = write(tmp_path / "app.log", lines(1))
    config = tail_config(tmp_path, log, "    retry_limit 1")
    pipeline = Pipeline(load_config(config))
    sink = ControlledSink(failures=[RetryableError("a"), RetryableError("b"), RetryableError("c")])
    pipeline.runners[0].sink = sink  # type: ignore[assignment]
    pipeline.runners[0].backoff_base = 0.01
    assert await asyncio.wait_for(pipeline.run(), 10) == 0
    assert sink.attempts == 2 and sink.delivered == []
    assert 'reason="retry_limit"} 1.0' in _metrics_text(pipeline)


async def test_stop_drains_buffered_batches_before_exit(tmp_path: Path) -> None:
    log = write(tmp_path / "app.log", lines(2000))
    pipeline = Pipeline(load_config(tail_config(tmp_path, log, exit_on_eof=False)))
    for runner in pipeline.runners:
        runner.start()
    task = asyncio.create_task(pipeline.run())
    # Wait until everything was read, then stop: all of it must be delivered before exit.
    for _ in range(100):
        await asyncio.sleep(0.05)
        if stored_offset(tmp_path) == log.stat().st_size:
            break
    pipeline.request_stop()
    assert await asyncio.wait_for(task, 10) == 0
    assert output_numbers(tmp_path) == list(range(2000))


async def test_grace_expiry_leaves_undelivered_data_for_the_next_run(tmp_path: Path) -> None:
    log = write(tmp_path / "app.log", lines(10))
    pipeline = Pipeline(load_config(tail_config(tmp_path, log, exit_on_eof=False)))
    pipeline.service["grace"] = 0.3
    sink = ControlledSink(gate=asyncio.Event())  # never opens: a hung backend
    pipeline.runners[0].sink = sink  # type: ignore[assignment]
    task = asyncio.create_task(pipeline.run())
    await asyncio.wait_for(sink.arrived.wait(), 5)
    pipeline.request_stop()
    assert await asyncio.wait_for(task, 5) == EXIT_UNDELIVERED  # the run did not finish its work
    assert stored_offset(tmp_path) == 0
    # Next run delivers all of it, exactly once.
    second = Pipeline(load_config(tail_config(tmp_path, log)))
    assert await asyncio.wait_for(second.run(), 10) == 0
    assert output_numbers(tmp_path) == list(range(10))


async def test_restart_resumes_without_loss_or_duplicates(tmp_path: Path) -> None:
    log = write(tmp_path / "app.log", lines(100))
    config = load_config(tail_config(tmp_path, log))
    assert await Pipeline(config).run() == 0
    with log.open("a") as handle:
        handle.write(lines(50, start=100))
        handle.write('{"n": 150}')  # no newline: a line still being written
    assert await Pipeline(config).run() == 0
    assert output_numbers(tmp_path)[-1] == 150  # exit_on_eof flushes the unterminated last line
    # Restarting again delivers nothing new.
    assert await Pipeline(config).run() == 0
    assert output_numbers(tmp_path) == list(range(151))


async def test_bad_json_lines_pass_under_log_key_and_are_counted(tmp_path: Path) -> None:
    log = write(tmp_path / "app.log", '{"n": 0}\nthis is not json\n{"n": 2}\n')
    pipeline = Pipeline(load_config(tail_config(tmp_path, log)))
    assert await pipeline.run() == 0
    out = [orjson.loads(x) for x in (tmp_path / "out" / "out.jsonl").read_bytes().splitlines()]
    assert out == [{"n": 0}, {"log": "this is not json"}, {"n": 2}]
    assert 'kubetrail_errors_total{component="tail.0",kind="source",plugin="tail",type="parse"} 1.0' in _metrics_text(
        pipeline
    )


async def test_unwritable_output_waits_and_loses_nothing(tmp_path: Path) -> None:
    log = write(tmp_path / "app.log", lines(3))
    config = write(
        tmp_path / "p.conf",
        f"""
[INPUT]
    name tail
    path {log}
    read_from_head on
    exit_on_eof on
    parser json
[OUTPUT]
    name file
    match *
    path {tmp_path / "later"}
    file out.jsonl
    format plain
""",
    )
    pipeline = Pipeline(load_config(config))
    pipeline.runners[0].backoff_base = 0.05
    task = asyncio.create_task(pipeline.run())
    await asyncio.sleep(0.5)
    assert not task.done()
    assert 'type="start"' in _metrics_text(pipeline)
    (tmp_path / "later").mkdir()
    assert await asyncio.wait_for(task, 10) == 0
    assert len((tmp_path / "later" / "out.jsonl").read_bytes().splitlines()) == 3


async def test_unrouted_records_are_counted_as_dropped(tmp_path: Path) -> None:
    log = write(tmp_path / "app.log", lines(4))
    config = tail_config(tmp_path, log).read_text().replace("match *", "match other")
    pipeline = Pipeline(load_config(write(tmp_path / "q.conf", config)))
    assert await pipeline.run() == 0
    assert 'reason="unrouted"} 4.0' in _metrics_text(pipeline)


async def test_monitoring_endpoints(tmp_path: Path) -> None:
    import aiohttp

    log = write(tmp_path / "app.log", lines(7))
    text = (
        tail_config(tmp_path, log, exit_on_eof=False)
        .read_text()
        .replace("[SERVICE]", "[SERVICE]\n    http_server on\n    http_listen 127.0.0.1\n    http_port 0")
    )
    pipeline = Pipeline(load_config(write(tmp_path / "h.conf", text)))
    task = asyncio.create_task(pipeline.run())
    for _ in range(100):
        await asyncio.sleep(0.05)
        if output_numbers(tmp_path) == list(range(7)):
            break
    assert pipeline.http is not None
    base = f"http://127.0.0.1:{pipeline.http.bound_port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/api/v1/health") as resp:
            assert resp.status == 200
        async with session.get(f"{base}/api/v1/uptime") as resp:
            assert "uptime_sec" in await resp.json()
        for path in ("/metrics", "/api/v2/metrics/prometheus"):
            async with session.get(base + path) as resp:
                body = await resp.text()
                assert 'kubetrail_records_out_total{component="file.0",kind="sink",plugin="file"} 7.0' in body
                assert "kubetrail_batch_latency_seconds_bucket" in body
                assert "kubetrail_buffer_records" in body
    pipeline.request_stop()
    assert await asyncio.wait_for(task, 10) == 0


def _metrics_text(pipeline: Pipeline) -> str:
    from prometheus_client import generate_latest

    return generate_latest(pipeline.metrics.registry).decode()


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ("[INPUT]\n    name tial\n    path /x\n", "unknown input plugin 'tial'; available: "),
        ("[INPUT]\n    name tail\n    path /x\n    colour red\n", "'colour': unknown property"),
        ("[INPUT]\n    name tail\n    path /x\n    read_from_head maybe\n", "expected on/off"),
        ("[INPUT]\n    name tail\n    path /x\n    parser nope\n", "unknown parser 'nope'"),
    ],
)
def test_config_errors_from_build(tmp_path: Path, snippet: str, message: str) -> None:
    from kubetrail.core.errors import ConfigError

    config = write(tmp_path / "c.conf", snippet + "[OUTPUT]\n    name stdout\n    match *\n")
    with pytest.raises(ConfigError) as info:
        Pipeline(load_config(config))
    assert message in str(info.value) and str(config) in str(info.value)


async def test_path_matching_nothing_warns_and_keeps_serving(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tail_config(tmp_path, tmp_path / "nothing-here-*.log", exit_on_eof=False)
    pipeline = Pipeline(load_config(config))
    task = asyncio.create_task(pipeline.run())
    await asyncio.sleep(0.5)
    assert not task.done()
    assert any("path matches no file" in r.getMessage() for r in caplog.records)
    # A file that appears later is picked up at the next scan and read from its start.
    pipeline.sources[0].instance.refresh_interval = 0.1
    write(tmp_path / "nothing-here-1.log", lines(3))
    for _ in range(100):
        await asyncio.sleep(0.05)
        if output_numbers(tmp_path) == [0, 1, 2]:
            break
    pipeline.request_stop()
    assert await asyncio.wait_for(task, 10) == 0
    assert output_numbers(tmp_path) == [0, 1, 2]


async def test_parse_warnings_are_rate_limited_per_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = "".join(f"garbage {i}\n" for i in range(5000))  # several batches of bad lines
    log = write(tmp_path / "app.log", bad)
    config = tail_config(tmp_path, log).read_text().replace("    db ", "    batch_size 32k\n    db ")
    pipeline = Pipeline(load_config(write(tmp_path / "r.conf", config)))
    assert await pipeline.run() == 0
    warnings = [r for r in caplog.records if "did not parse" in r.getMessage()]
    assert len(warnings) == 1
    assert 'type="parse"} 5000.0' in _metrics_text(pipeline)


def _rotate(log: Path, backup_name: str, compress: bool) -> Path:
    """What lumberjack (the API server's audit log) does: rename, optionally gzip, new file."""
    import gzip
    import shutil

    backup = log.with_name(backup_name)
    log.rename(backup)
    if compress:
        with backup.open("rb") as src, gzip.open(str(backup) + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        backup.unlink()
        backup = Path(str(backup) + ".gz")
    return backup


@pytest.mark.parametrize("compress", [False, True])
async def test_a_file_rotated_away_while_stopped_is_finished_from_its_backup(tmp_path: Path, compress: bool) -> None:
    log = write(tmp_path / "audit.log", lines(10))
    config = load_config(tail_config(tmp_path, log))
    assert await Pipeline(config).run() == 0
    with log.open("a") as handle:
        handle.write(lines(5, start=10))  # written after the stop, before the rotation
    _rotate(log, "audit-2026-11-28T12-00-00.000.log", compress)
    write(log, lines(5, start=15))
    assert await Pipeline(config).run() == 0
    assert output_numbers(tmp_path) == list(range(20))
    assert await Pipeline(config).run() == 0  # and nothing again on the next start
    assert output_numbers(tmp_path) == list(range(20))


async def test_read_from_head_reads_existing_backups_oldest_first(tmp_path: Path) -> None:
    import os

    log = tmp_path / "audit.log"
    write(log, lines(3))
    old = _rotate(log, "audit-2026-11-28T11-00-00.000.log", compress=True)
    os.utime(old, (1, 1))
    write(log, lines(3, start=3))
    _rotate(log, "kube-apiserver-unrelated.log", compress=False)  # not a backup of audit.log
    write(log, lines(3, start=6))
    newer = _rotate(log, "audit-2026-11-28T12-00-00.000.log", compress=False)
    os.utime(newer, (2, 2))
    write(log, lines(3, start=9))
    assert await Pipeline(load_config(tail_config(tmp_path, log))).run() == 0
    assert output_numbers(tmp_path) == [0, 1, 2, 6, 7, 8, 9, 10, 11]
