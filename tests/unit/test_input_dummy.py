"""The ``dummy`` and ``fluentbit_metrics`` inputs in a running pipeline.

``dummy``: Fluent Bit's timing (rate, interval_sec/nsec, samples, copies, flush_on_startup) and
timestamps (start_time_sec/nsec, fixed_timestamp), metadata, and config errors for records that
are not JSON objects. ``fluentbit_metrics``: the pipeline's own counters come out as records,
one per sample, and move as the pipeline works.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from kubetrail.core.config import load_config
from kubetrail.core.errors import ConfigError
from kubetrail.runtime.pipeline import Pipeline
from tests.unit.source_helpers import input_config, running, wait_until


def dummy_input(extra: str = "") -> str:
    return f"    name dummy\n    tag dummy.in\n{extra}"


async def test_rate_samples_and_copies(tmp_path: Path) -> None:
    extra = '    dummy {"msg": "hi", "n": {"deep": 1}}\n    rate 20\n    samples 5\n    copies 3'
    started = time.monotonic()
    async with running(tmp_path, dummy_input(extra)) as run:
        records = await run.wait_records(15)
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.5)
        assert len(run.sink.records) == 15, "samples counts ticks; nothing after the last"
        assert not run.task.done(), "dummy stays idle after its samples, as Fluent Bit's"
    assert [len(b) for b in run.sink.batches] == [3] * 5
    assert all(r.body == {"msg": "hi", "n": {"deep": 1}} and r.tag == "dummy.in" for r in records)
    records[0].mutable_body()["n"]["deep"] = 2
    assert records[1].body["n"]["deep"] == 1  # every record has a body of its own
    assert 0.2 <= elapsed < 5, elapsed  # 5 ticks of 50 ms


async def test_interval_overrides_rate_and_flush_on_startup(tmp_path: Path) -> None:
    extra = "    rate 1\n    interval_sec 0\n    interval_nsec 100000000\n    samples 4"
    started = time.monotonic()
    async with running(tmp_path, dummy_input(extra)) as run:
        records = await run.wait_records(4)
        elapsed = time.monotonic() - started
    assert records[0].body == {"message": "dummy"}  # Fluent Bit's default record
    assert 0.35 <= elapsed < 3.5, elapsed  # 100 ms ticks, not 1 s
    async with running(tmp_path, dummy_input("    interval_sec 30\n    flush_on_startup on")) as run:
        started = time.monotonic()
        await run.wait_records(1, timeout=5)
        # at once, not after 30 s: timed here, since the wait's deadline grows on a loaded machine
        assert time.monotonic() - started < 15


async def test_start_time_moves_with_the_clock_and_fixed_timestamp_does_not(tmp_path: Path) -> None:
    start_ns = 1_000 * 1_000_000_000 + 5
    extra = "    rate 10\n    samples 3\n    start_time_sec 1000\n    start_time_nsec 5"
    async with running(tmp_path, dummy_input(extra)) as run:
        records = await run.wait_records(3)
    times = [r.time_ns for r in records]
    assert start_ns < times[0] < times[1] < times[2] < start_ns + 10 * 1_000_000_000
    async with running(tmp_path, dummy_input(extra + "\n    fixed_timestamp on")) as run:
        records = await run.wait_records(3)
    assert [r.time_ns for r in records] == [start_ns] * 3
    before = time.time_ns()
    async with running(tmp_path, dummy_input("    rate 10\n    samples 2")) as run:
        records = await run.wait_records(2)
    assert all(before <= r.time_ns <= time.time_ns() for r in records)


async def test_metadata_goes_into_the_record_metadata(tmp_path: Path) -> None:
    extra = '    metadata {"source": "gen", "k": [1]}\n    samples 1\n    flush_on_startup on'
    async with running(tmp_path, dummy_input(extra)) as run:
        (record,) = await run.wait_records(1)
    assert record.meta == {"metadata": {"source": "gen", "k": [1]}}
    assert record.body == {"message": "dummy"}


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("    dummy {not json", "dummy"),
        ("    dummy [1, 2]", "dummy"),
        ('    metadata "text"', "metadata"),
        ("    copies 0", "copies"),
    ],
)
def test_bad_dummy_config_is_an_error(tmp_path: Path, extra: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        Pipeline(load_config(input_config(tmp_path, dummy_input(extra))))


# --- fluentbit_metrics ----------------------------------------------------------------------------


async def test_fluentbit_metrics_emits_the_pipelines_own_counters(tmp_path: Path) -> None:
    inputs = (
        "    name fluentbit_metrics\n    tag internal.metrics\n    scrape_interval 0.2\n    scrape_on_start on\n"
        "[INPUT]\n    name dummy\n    tag dummy.in\n    rate 50"
    )
    async with running(tmp_path, inputs) as run:
        source = run.source

        def dummy_counts() -> list[float | None]:
            """Per scrape: the dummy input's kubetrail_records_in_total, as the records say."""
            counts: list[float | None] = []
            for batch in run.sink.batches:
                if batch.tag == "internal.metrics":
                    counts.append(
                        next(
                            (
                                float(r.body["value"])
                                for r in batch.records
                                if r.body["name"] == "kubetrail_records_in_total"
                                and r.body["labels"]["component"] == "dummy.0"
                            ),
                            None,
                        )
                    )
            return counts

        await wait_until(lambda: source.scrapes >= 4, 10, "4 scrapes")
        await wait_until(lambda: (dummy_counts()[-1] or 0) > 0, 10, "the dummy input's count in a scrape")
        metrics = [b for b in run.sink.batches if b.tag == "internal.metrics"]
        first = metrics[0].records
        sample = next(r.body for r in first if r.body["name"] == "kubetrail_records_in_total")
        assert sample["type"] == "counter" and set(sample["labels"]) == {"component", "kind", "plugin"}
        assert any(r.body["type"] == "histogram" and "le" in r.body["labels"] for r in first)
        assert all(r.tag == "internal.metrics" for r in first)
        known = [c for c in dummy_counts() if c is not None]
        assert known == sorted(known), "a counter never goes down"
        assert known[-1] > 0


def test_fluentbit_metrics_bad_interval(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scrape_interval"):
        Pipeline(load_config(input_config(tmp_path, "    name fluentbit_metrics\n    scrape_interval 0")))
