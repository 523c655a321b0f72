"""The ``http`` output sends batches queued together in one request (``group_key`` /
``write_group``, bodies joined by ``kubetrail_native.FramedBody.join`` without copying a line),
up to ``group_max_bytes`` of input per request. What a real aiohttp server receives must be the
bytes of one batch holding all the group's records (``encode_batch`` of records: the Python
formatter); a failed group delivers nothing and each batch is then sent once on its own."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import orjson
import pytest

from kubetrail.core.metrics import MetricsRegistry
from kubetrail.core.record import Batch
from kubetrail.runtime.sink_runner import SinkRunner
from kubetrail.sinks import http as http_sink
from kubetrail.sinks.http import HttpOutputSink
from kubetrail.sinks.json_format import block_frame_args, block_framing, encode_batch
from tests.fakes.http_server import Answer, ScriptedServer
from tests.unit import test_http_sink
from tests.unit.test_http_body import T0, block_batch, lines_of, records_batch, sink, times_for

server = test_http_sink.server  # the fixture: a real aiohttp server answering 204

FramedBody = http_sink.FramedBody
pytestmark = pytest.mark.skipif(FramedBody is None, reason="kubetrail_native is not built")

# (lines, times) of batches of different shapes: a few, many with 20 KB lines, one, one empty object.
PARTS = [
    (lines_of(30, 11), times_for(30, 11)),
    (lines_of(400, 12, 40), times_for(400, 12)),
    ([b'{"only":1}'], [T0 + 5]),
    ([b"{}"], [T0 - 1]),
]


def all_records(parts: list[tuple[list[bytes], list[int]]]) -> Batch:
    lines = [line for part_lines, _ in parts for line in part_lines]
    times = [t for _, part_times in parts for t in part_times]
    return records_batch(lines, times)


def framed(batch: Batch, fmt: str, date_key: str | None, date_format: str) -> Any:
    """The batch's body as the sink builds it."""
    args = block_frame_args(batch, fmt, date_key, date_format)
    assert args is not None
    return FramedBody.build(*args)


@pytest.mark.parametrize(
    ("fmt", "date_key", "date_format"),
    [
        ("json", "date", "double"),
        ("json", "@timestamp", "epoch"),
        ("json", None, "double"),
        ("json_lines", "date", "double"),
        ("json_lines", "date", "epoch"),
        ("json_stream", "date", "double"),
        ("json_stream", None, "double"),
    ],
)
@pytest.mark.parametrize("take", [[0, 1], [0, 1, 2, 3], [2, 3], [1, 0, 3, 2]])
def test_joined_bodies_are_the_bytes_of_one_batch_of_all_records(
    fmt: str, date_key: str | None, date_format: str, take: list[int]
) -> None:
    parts = [PARTS[i] for i in take]
    join = block_framing(fmt, None, date_format)[2]  # type: ignore[index]
    bodies = [framed(block_batch(lines, times), fmt, date_key, date_format) for lines, times in parts]
    joined = FramedBody.join(bodies, join)
    expected = encode_batch(all_records(parts), fmt, date_key, date_format)
    assert joined.tobytes() == expected
    assert len(joined) == len(expected)
    for offset in (0, 1, len(expected) // 2, len(expected) - 1):  # what the socket did not take
        assert joined.tobytes(offset) == expected[offset:]


def test_a_body_without_lines_adds_nothing_to_a_join() -> None:
    empty = Batch("t", None, raw_block=b"", materialize=list, count=0)
    for fmt, join in (("json", 1), ("json_lines", 0)):
        body = framed(empty, fmt, "date", "double")
        lines, times = PARTS[0]
        full = framed(block_batch(lines, times), fmt, "date", "double")
        expected = encode_batch(records_batch(lines, times), fmt, "date", "double")
        assert FramedBody.join([body, full, body], join).tobytes() == expected
        assert FramedBody.join([body, body], join).tobytes() == encode_batch(empty, fmt, "date", "double")


def test_the_python_join_of_bytes_bodies_equals_the_native_one() -> None:
    """A batch of records (a filter built them) has a bytes body: the group joins bytes then."""
    for fmt in ("json", "json_lines", "json_stream"):
        out = HttpOutputSink.__new__(HttpOutputSink)  # joined_body needs only format and join
        out.format, out.join = fmt, block_framing(fmt, None, "double")[2]  # type: ignore[index]
        parts = [(lines, times) for lines, times in PARTS]
        bodies = [encode_batch(records_batch(lines, times), fmt, "date", "double") for lines, times in parts]
        mixed = [framed(block_batch(*parts[0]), fmt, "date", "double"), *bodies[1:]]
        expected = encode_batch(all_records(parts), fmt, "date", "double")
        assert out.joined_body(bodies) == expected
        assert out.joined_body(mixed) == expected
        if fmt == "json":  # an empty batch's "[]" adds nothing to the array
            assert out.joined_body([b"[]\n", bodies[0], b"[]\n"]) == bodies[0]


def runner_for(out: HttpOutputSink) -> SinkRunner:
    metrics = MetricsRegistry().component("http.0", "output", "http")
    return SinkRunner(out, "http.0", metrics, logging.getLogger("test"), None, backoff_base=0.05)


def sized(lines: list[bytes], times: list[int], tag: str = "app.log") -> Batch:
    """A block batch whose input size is its bytes, as the tail sets it."""
    batch = block_batch(lines, times, tag)
    batch.size_bytes = sum(len(line) + 1 for line in lines)
    return batch


def numbers(server: ScriptedServer, fmt: str) -> list[list[int]]:
    """The ``i`` of each record, per request."""
    out = []
    for request in server.requests:
        records = orjson.loads(request.body) if fmt == "json" else [orjson.loads(x) for x in request.body.splitlines()]
        out.append([r.get("n", -1) for r in records])
    return out


def numbered(start: int, count: int, pad: int) -> tuple[list[bytes], list[int]]:
    return [orjson.dumps({"n": n, "pad": "x" * pad}) for n in range(start, start + count)], [
        T0 + n for n in range(start, start + count)
    ]


@pytest.mark.parametrize("fmt", ["json", "json_lines"])
async def test_queued_batches_share_requests_up_to_the_cap(server: ScriptedServer, fmt: str) -> None:
    """Six batches of ~0.7 MiB queued before the worker runs: requests of two (a third would
    pass 2 MiB), every record once, in order, as one batch of them would be encoded."""
    out = sink(server, format=fmt)
    runner = runner_for(out)
    parts = [numbered(start, 100, 7000) for start in range(0, 600, 100)]
    for lines, times in parts:
        await runner.enqueue(sized(lines, times))
    runner.start()
    await runner.drain()
    await out.close()
    assert [len(r) for r in numbers(server, fmt)] == [200, 200, 200]
    assert [n for r in numbers(server, fmt) for n in r] == list(range(600))
    for k, request in enumerate(server.requests):
        assert request.body == encode_batch(all_records(parts[2 * k : 2 * k + 2]), fmt, "date", "double")
        assert len(request.body) < 2 * 1024 * 1024 * 1.05  # the cap is input bytes; dates add a little


async def test_json_lines_without_a_date_and_other_tags_with_header_tag_are_not_joined(
    server: ScriptedServer,
) -> None:
    out = sink(server, format="json_lines", json_date_key="false")
    assert out.group_key(sized(*numbered(0, 1, 1))) is None  # its body is the block itself
    tagged = sink(server, format="json", header_tag="X-Tag")
    runner = runner_for(tagged)
    for start, tag in ((0, "a"), (10, "a"), (20, "b"), (30, "a")):
        await runner.enqueue(sized(*numbered(start, 10, 10), tag=tag))
    runner.start()
    await runner.drain()
    await tagged.close()
    assert [(r.headers["X-Tag"], len(n)) for r, n in zip(server.requests, numbers(server, "json"), strict=True)] == [
        ("a", 20),
        ("b", 10),
        ("a", 10),
    ]


async def test_a_failed_group_request_then_sends_each_batch_once(server: ScriptedServer) -> None:
    """503 for the group's request: nothing of it was taken; each batch goes again alone."""
    server.answers = [Answer(503, b"busy", "text/plain")]
    out = sink(server, format="json")
    runner = runner_for(out)
    for start in (0, 10, 20):
        await runner.enqueue(sized(*numbered(start, 10, 10)))
    runner.start()
    await runner.drain()
    await out.close()
    sent = numbers(server, "json")
    assert [len(n) for n in sent] == [30, 10, 10, 10]
    assert Counter(n for request in sent[1:] for n in request) == Counter(range(30))
