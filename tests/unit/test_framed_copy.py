"""``kubetrail_native.write_framed_buffered`` (native/src/framedcopy.rs): ``out_file`` and
``msgpack`` text written through a reused buffer must be byte for byte what ``frame_lines`` (the
framing ``write_framed`` and the Python formatter share) makes of the same block and times, into
a real file: lines shorter and longer than the 256 KiB buffer, empty lines, times before 1970,
numbers past 32 bits; refused input writes nothing. And the ``stdout`` output that uses it."""

from __future__ import annotations

import io
import os
import random
from array import array
from pathlib import Path

import orjson
import pytest

from kubetrail.sinks import json_format
from kubetrail.sinks.json_format import framed_lines
from tests.unit.test_output_formats_native import COMPACT, block_batch, records_batch, stdout_sink

native = pytest.importorskip("kubetrail_native")
write_framed_buffered = getattr(native, "write_framed_buffered", None)
pytestmark = pytest.mark.skipif(write_framed_buffered is None, reason="kubetrail_native without write_framed_buffered")

BUFFER = 256 * 1024


def block_of(seed: int, count: int) -> tuple[bytes, list[int]]:
    rnd = random.Random(seed)
    lines = []
    for i in range(count):
        size = rnd.choice([0, 1, 30, 200, 5000, BUFFER - 40, BUFFER + 7, 3 * BUFFER]) if i % 9 == 4 else 120
        lines.append(bytes(rnd.choice(b'abc{}":,\\ \xc3\xa9') for _ in range(min(size, 64))) * (size // 64 + 1))
    times = [rnd.choice([0, -1, -1_500_000_001, 1_795_867_200_000_000_001, 999_999_999, 2**62]) for _ in lines]
    return b"".join(line + b"\n" for line in lines), times


def written(tmp_path: Path, *args: object) -> bytes:
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        count = write_framed_buffered(fd, *args)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert count == len(data)
    return data


@pytest.mark.parametrize("reference", ["native", "python"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("first", [None, 0, 4_294_967_290])
def test_the_text_is_frame_lines_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, first: int | None, reference: str
) -> None:
    if reference == "python":
        monkeypatch.setattr(json_format, "frame_lines", None)  # the Python formatter
    block, times = block_of(seed, 60 + seed * 20)
    expected = framed_lines(block, times, "kube.var.log", first)
    assert written(tmp_path, block, array("q", times).tobytes(), b"kube.var.log", first) == expected


def test_an_empty_block_writes_nothing(tmp_path: Path) -> None:
    assert written(tmp_path, b"", b"", b"t", 3) == b""


def test_a_line_longer_than_the_buffer_after_short_ones(tmp_path: Path) -> None:
    lines = [b"{}", b"x" * (BUFFER - 10), b"y" * (2 * BUFFER), b"", b"z"]
    block, times = b"".join(line + b"\n" for line in lines), list(range(len(lines)))
    expected = framed_lines(block, times, "t", 7)
    assert written(tmp_path, block, array("q", times).tobytes(), b"t", 7) == expected


@pytest.mark.parametrize(
    ("block", "count"),
    [(b'{"a":1}\n{"b":2}\n', 1), (b'{"a":1}\n{"b":2}\n', 3), (b'{"a":1}\n{"b":2}', 2), (b"", 1)],
)
def test_refused_input_writes_nothing(tmp_path: Path, block: bytes, count: int) -> None:
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(ValueError, match="one time per line"):
            write_framed_buffered(fd, block, array("q", [0] * count).tobytes(), b"t", 0)
    finally:
        os.close(fd)
    assert path.read_bytes() == b""


def test_a_failing_write_is_an_os_error(tmp_path: Path) -> None:
    path = tmp_path / "out"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)  # not open for writing: EBADF
    try:
        with pytest.raises(OSError):
            write_framed_buffered(fd, b"{}\n", array("q", [0]).tobytes(), b"t", 0)
    finally:
        os.close(fd)


async def test_stdout_msgpack_numbers_run_on_across_block_and_record_batches(tmp_path: Path) -> None:
    """stdout writes a block's msgpack text with this writer in a worker thread, a batch of
    records in the event loop: the numbers run on from batch to batch, in order, and the text
    is what the record path writes into an in-memory stream."""
    times = [1_795_867_200_123_456_789 + i * 1_000_003 for i in range(len(COMPACT))]
    kinds = ["block", "records", "block", "block", "records"]
    in_memory = io.BytesIO()
    reference = stdout_sink(in_memory, format="msgpack")
    for _ in kinds:
        await reference.write(records_batch(COMPACT, times))
    with (tmp_path / "out").open("wb") as stream:
        out = stdout_sink(stream, format="msgpack")
        stream.write(b"before\n")  # buffered by the stream: goes out before the first block
        for kind in kinds:
            batch = block_batch(COMPACT, times) if kind == "block" else records_batch(COMPACT, times)
            await out.write(batch)
            assert kind == "records" or not batch.is_materialized  # from the block
    text = (tmp_path / "out").read_bytes()
    assert text == b"before\n" + in_memory.getvalue()
    numbers = [int(line[1 : line.index(b"]")]) for line in text.splitlines()[1:]]
    assert numbers == list(range(len(kinds) * len(COMPACT)))


def test_double_dates_are_orjsons_text() -> None:
    """The ``json`` family's ``double`` date (native/src/jsonlines.rs ``double_text``, zmij's
    shortest digits): orjson's text of ``time_ns / 1e9`` for every time the native framer
    takes (0 and 1e-4 s up to 1e16 s, either sign): whole seconds (``.0``), the ends of that
    range, nanoseconds that need 19 significant digits and ties in the last digit."""
    rnd = random.Random(19)
    edges = [0, 1, -1, 100_000, 99_999, 10**9, -(10**9), 10**24 // 10**9 - 1, 9_999_999_999_999_999_999 // 1000]
    times = edges + [
        rnd.choice(
            [
                rnd.randrange(-(2**63), 2**63),
                rnd.randrange(10**18),
                rnd.randrange(10**9) * 10**9,
                1_795_867_200_000_000_000 + rnd.randrange(10**9),
                rnd.randrange(10**5, 10**9),
            ]
        )
        for _ in range(100_000)
    ]
    times = [t for t in times if -(2**63) <= t < 2**63 and (t == 0 or 1e-4 <= abs(t / 1e9) < 1e16)]
    block = b'{"a":1}\n' * len(times)
    framed = native.frame_lines(block, array("q", times).tobytes(), 2, b"date", 0, 0)
    assert framed == b"".join(orjson.dumps({"date": t / 1e9, "a": 1}) + b"\n" for t in times)


write_dated_lines_buffered = getattr(native, "write_dated_lines_buffered", None)
needs_dated = pytest.mark.skipif(write_dated_lines_buffered is None, reason="kubetrail_native without it")


def object_lines(seed: int, count: int) -> tuple[bytes, list[int]]:
    """JSON objects of every size around the buffer's, padded with blanks, empty ones."""
    rnd = random.Random(seed)
    lines = []
    for i in range(count):
        size = rnd.choice([0, 10, 300, BUFFER - 60, BUFFER + 5, 2 * BUFFER]) if i % 7 == 3 else 150
        lines.append(rnd.choice([b'{"m":"%s"}', b' { "m" : "%s" }\t', b'{"n":1,"m":"%s"}']) % (b"x" * size))
        if i % 11 == 5:
            lines.append(rnd.choice([b"{}", b"{ }", b" {}"]))
    times = [1_795_867_200_000_000_000 + rnd.choice([0, 1, 999_999_999, rnd.randrange(10**9)]) for _ in lines]
    return b"".join(line + b"\n" for line in lines), times


@needs_dated
@pytest.mark.parametrize("style", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_dated_lines_are_frame_lines_text(tmp_path: Path, seed: int, style: int) -> None:
    """``json_lines`` with a date through the buffer: ``Frames``' text for the style (each line
    is written as ``frame_lines`` writes it, and that is orjson's, see test_output_formats_native)."""
    block, times = object_lines(seed, 40 + seed * 30)
    raw = array("q", times).tobytes()
    expected = native.frame_lines(block, raw, style, b'we"ird', 0, 0)
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        count = write_dated_lines_buffered(fd, block, raw, b'we"ird', style)
    finally:
        os.close(fd)
    assert path.read_bytes() == expected and count == len(expected)


@needs_dated
@pytest.mark.parametrize(
    ("block", "times", "style"),
    [
        (b'{"a":1}\n[1]\n', [0, 0], 2),  # not an object: no date can go in
        (b'{"a":1}\n{"b":2}\n', [0, 5], 2),  # 5 ns: a double orjson writes with an exponent
        (b'{"a":1}\n{"b":2}\n', [0], 3),
        (b'{"a":1}\n{"b":2}', [0, 0], 3),
        (b'{"a":1}\n', [0], 1),  # not a dated style
    ],
)
def test_dated_lines_refused_write_nothing(tmp_path: Path, block: bytes, times: list[int], style: int) -> None:
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(ValueError, match="one time per object line"):
            write_dated_lines_buffered(fd, block, array("q", times).tobytes(), b"date", style)
    finally:
        os.close(fd)
    assert path.read_bytes() == b""
