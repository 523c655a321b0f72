"""A tailed audit log is parsed once: the ``kubernetes_audit`` filter validates the block.

The tail hands over lazy blocks (``kubetrail.core.block``) that nobody has validated; the filter
takes the block before validation (``Batch.pending_block``) and has it validated only when a
line was not an audit event. The output must be exactly what the check-first way gives: the
same records, bytes, times, identities and parse failures, for any input, broken lines included.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubetrail.core.config import load_config
from kubetrail.core.record import Batch
from kubetrail.parsers import json_parser
from kubetrail.runtime.pipeline import Pipeline
from kubetrail.transforms import kubernetes_audit
from tests import required
from tests.unit.helpers import tail_file_config, write
from tests.unit.test_audit_scan import base_event, edge_lines, mutated_lines

Delivered = tuple[int, tuple[Any, ...] | None, bytes]


class KeepingSink:
    """Every delivered record's time, identity and bytes, and whether its batch had a block."""

    def __init__(self) -> None:
        self.delivered: list[Delivered] = []
        self.blocks = 0

    async def start(self) -> None:
        return None

    def group_key(self, batch: Batch) -> None:
        return None

    async def write(self, batch: Batch) -> None:
        self.blocks += batch.raw_block is not None  # validated on the way, if nobody did before
        self.delivered.extend((r.time_ns, r.identity, r.json_bytes()) for r in batch.records)

    async def close(self) -> None:
        return None


async def run(tmp_path: Path, log: Path, filters: str, input_extra: str = "") -> tuple[KeepingSink, float]:
    conf = tail_file_config(
        tmp_path, log, tag="audit", input_extra="    parser k8s_audit\n" + input_extra, filters=filters
    )
    pipeline = Pipeline(load_config(conf))
    sink = KeepingSink()
    pipeline.runners[0].sink = sink  # type: ignore[assignment]
    assert await pipeline.run() == 0
    failures = sum(
        sample.value
        for metric in pipeline.metrics.registry.collect()
        if metric.name == "kubetrail_errors"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get("type") == "parse"
    )
    return sink, failures


def audit_filter(native: str) -> str:
    return f"[FILTER]\n    name kubernetes_audit\n    match *\n    native {native}\n    dedupe off\n"


# JSON that one decoder takes and the other refuses: sonic-rs (the native scan) takes a lone
# surrogate and any depth, msgspec (the reference: the tail's check and the Python scan) does not.
BORDER_LINES = [
    b'{"auditID":"e","stage":"Panic","x":"\\ud800"}',  # a lone surrogate where nobody decodes
    b'{"auditID":"f","stage":"Panic","userAgent":"\\udc00x"}',
    b'{"auditID":"g","stage":"Panic","userAgent":"\\ud83d\\ude00"}',  # a valid pair
    b'{"auditID":"h","stage":"Panic","x":' + b"[" * 3000 + b"]" * 3000 + b"}",  # deeper than msgspec goes
    b'{"auditID":"i","stage":"Panic","x":' + b"[" * 600 + b"]" * 600 + b"}",  # deeper than the scan takes
    b'{"auditID":"j","stage":"Panic","x":"\xed\xa0\x80"}',  # invalid UTF-8 where msgspec does not look
]


def mixed_lines(seed: int) -> list[bytes]:
    """Events, broken events, blank lines, non-JSON, JSON that is not an event, bad times."""
    rng = random.Random(seed)
    good = [orjson.dumps(base_event(i, level="Metadata")) for i in range(200)]
    odd = [
        *mutated_lines(300, seed=seed),
        *[line for line in edge_lines() if b"\n" not in line],
        orjson.dumps(base_event(900, stageTimestamp="yesterday")),  # not RFC 3339: time of reading
        orjson.dumps(base_event(901, stageTimestamp=12)),
        orjson.dumps(base_event(902, stageTimestamp=None)),
        orjson.dumps(base_event(903, stageTimestamp="2026-11-28T12:00:00")),  # no zone
        b'{"auditID":"a","stage":"Panic","x":[1,2,}',  # broken inside a member nobody decodes
        b'{"auditID":"b","stage":"Panic","x":"\xff"}',  # invalid UTF-8 there
        b'{"auditID":"c","stage":"Panic"} trailing',
        b'{"auditID":"d","stage":"Panic","x":NaN}',
        *BORDER_LINES,
        b"",
        b"\t",
    ]
    lines = good + odd
    rng.shuffle(lines)
    return lines


async def delivered_both_ways(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lines: list[bytes], native: str
) -> tuple[KeepingSink, float, KeepingSink, float]:
    log = write(tmp_path / "logs" / "audit.log", "")
    log.write_bytes(b"".join(line + b"\n" for line in lines))
    once, once_failures = await run(tmp_path / "once", log, audit_filter(native))
    # The check-first way: the filter is offered no block before its validation.
    monkeypatch.setattr(Batch, "pending_block", lambda self: None)
    checked, checked_failures = await run(tmp_path / "checked", log, audit_filter(native))
    return once, once_failures, checked, checked_failures


def comparable(delivered: list[Delivered], since_ns: int) -> list[Delivered]:
    """Without what differs from run to run by design: a line without a usable time is stamped
    with when it was read, and a file's identity is kept per state db (each run has its own)."""
    return [
        (0 if t >= since_ns else t, ("file", i[1]) if i and isinstance(i[1], int) else i, b) for t, i, b in delivered
    ]


@pytest.mark.parametrize("native", ["on", "off"])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_parsed_once_gives_what_checking_first_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: str, seed: int
) -> None:
    if native == "on" and kubernetes_audit.NativeScanner is None:
        required.unavailable("kubetrail_native is not built", kind="native")
    lines = mixed_lines(seed)
    since_ns = time.time_ns()
    once, once_failures, checked, checked_failures = await delivered_both_ways(tmp_path, monkeypatch, lines, native)
    assert comparable(once.delivered, since_ns) == comparable(checked.delivered, since_ns)
    assert once_failures == checked_failures > 0  # the broken lines are reported either way
    assert len(once.delivered) == sum(1 for line in lines if line)  # the tail skips empty lines


@pytest.mark.parametrize("native", ["on", "off"])
@pytest.mark.parametrize("odd", BORDER_LINES, ids=lambda line: line[:40].decode(errors="replace"))
async def test_one_border_line_among_events_is_judged_as_the_check_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: str, odd: bytes
) -> None:
    """No other line makes the filter check the block: only its own scan can send it the check."""
    if native == "on" and kubernetes_audit.NativeScanner is None:
        required.unavailable("kubetrail_native is not built", kind="native")
    lines = [orjson.dumps(base_event(i, level="Metadata")) for i in range(20)]
    lines.insert(7, odd)
    since_ns = time.time_ns()
    once, once_failures, checked, checked_failures = await delivered_both_ways(tmp_path, monkeypatch, lines, native)
    assert comparable(once.delivered, since_ns) == comparable(checked.delivered, since_ns)
    assert once_failures == checked_failures
    assert len(once.delivered) == 21


@pytest.mark.parametrize("native", ["on", "off"])
async def test_a_valid_audit_log_is_not_parsed_by_the_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: str
) -> None:
    if native == "on" and kubernetes_audit.NativeScanner is None:
        required.unavailable("kubetrail_native is not built", kind="native")
    checks = 0
    real_check = json_parser._JsonBlock.validate

    def counting_check(self: json_parser._JsonBlock) -> bytes | None:
        nonlocal checks
        checks += 1
        return real_check(self)

    monkeypatch.setattr(json_parser._JsonBlock, "validate", counting_check)
    lines = [orjson.dumps(base_event(i, level="Metadata")) for i in range(500)]
    log = write(tmp_path / "logs" / "audit.log", "")
    log.write_bytes(b"".join(line + b"\n" for line in lines))
    parsed = []
    for name, filters in (("filtered", audit_filter(native)), ("alone", "")):
        conf = tail_file_config(
            tmp_path / name, log, tag="audit", input_extra="    parser k8s_audit\n", filters=filters
        )
        assert await Pipeline(load_config(conf)).run() == 0
        parsed.append(checks)
    filtered = (tmp_path / "filtered" / "out" / "out.jsonl").read_bytes().splitlines()
    assert parsed[0] == 0  # the file output writes the filter's block: the filter's scan was the only parse
    assert [orjson.loads(line)["k8s.audit.id"] for line in filtered] == [
        f"00000000-0000-0000-0000-{i:012d}" for i in range(500)
    ]
    assert (tmp_path / "alone" / "out" / "out.jsonl").read_bytes().splitlines() == lines
    assert parsed[1] > 0  # without the filter, the block is validated when the sink asks for it


async def test_records_of_a_filtered_block_get_their_times_from_the_deferred_parse(tmp_path: Path) -> None:
    lines = [orjson.dumps(base_event(i, level="Metadata")) for i in range(50)]
    log = write(tmp_path / "logs" / "audit.log", "")
    log.write_bytes(b"".join(line + b"\n" for line in lines))
    sink, failures = await run(tmp_path, log, audit_filter("on" if kubernetes_audit.NativeScanner else "off"))
    assert failures == 0 and sink.blocks > 0
    assert all(t == 1_795_867_200_000_002_000 for t, _, _ in sink.delivered)  # the event's stageTimestamp
    assert [i for _, i, _ in sink.delivered] == [
        (f"00000000-0000-0000-0000-{i:012d}", "ResponseComplete") for i in range(50)
    ]


@pytest.mark.parametrize("filters", ["", "audit"])
async def test_a_block_of_blank_lines_delivers_nothing_and_moves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, filters: str
) -> None:
    """Whole blocks of empty lines between events: the tail reads 32 KiB at a time here, so the
    first three blocks hold nothing else. A block with a blank line is parsed line by line (a
    lazy block's count must be exact), so none of them is ever a lazy block."""
    blank_blocks = 0
    real_init = json_parser._JsonBlock.__init__

    def counting_init(self: json_parser._JsonBlock, *args: Any) -> None:
        nonlocal blank_blocks
        real_init(self, *args)
        blank_blocks += self.source.startswith(b"\n") or b"\n\n" in self.source

    monkeypatch.setattr(json_parser._JsonBlock, "__init__", counting_init)
    events = [orjson.dumps(base_event(i, level="Metadata")) for i in range(3)]
    log = write(tmp_path / "logs" / "audit.log", "")
    log.write_bytes(b"\n" * 100_000 + events[0] + b"\n" + b"\n" * 3 + b"".join(e + b"\n" for e in events[1:]))
    flt = audit_filter("on" if kubernetes_audit.NativeScanner else "off") if filters else ""
    sink, failures = await run(tmp_path, log, flt, input_extra="    batch_size 4k\n")
    assert blank_blocks == 0
    assert [orjson.loads(b)["auditID"] for _, _, b in sink.delivered] == [
        f"00000000-0000-0000-0000-{i:012d}" for i in range(3)
    ]
    assert failures == 0
