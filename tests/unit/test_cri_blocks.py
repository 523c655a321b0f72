"""CRI and docker lines as one block: ``ContainerLogJoiner.process_block``
(``kubetrail_native.cri_join`` / ``docker_join``) against the record path
(``ContainerLogJoiner.process``) on the same input.

Every comparison is byte for byte: the JSON lines a ``plain`` output writes, each record's time,
identity and body (built from the block on demand), the counters of bad input, and the pending
messages left after each batch (the state checkpoints and the flush timeout are made of), then
what a flush at the end sends. The input mixes every kind of line (pieces of stdout and stderr
interleaved, bad lines, bad and odd times, invalid UTF-8, characters cut between pieces, long
messages) and is cut into batches at random line boundaries, so pieces cross batches.
"""

from __future__ import annotations

import itertools
import random
import re
import time
from array import array
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubetrail.parsers import multiline
from kubetrail.parsers.multiline import ContainerLogJoiner, JoinStats
from tests import required
from tests.unit.helpers import run_pipeline, tail_file_config

native = pytest.importorskip("kubetrail_native", reason="kubetrail_native is not built")
if not hasattr(native, "cri_join"):  # an older build of the module
    required.unavailable("kubetrail_native has no cri_join", kind="native", allow_module_level=True)

NOW = 1_700_000_000_123_456_789  # time.time_ns() during a comparison: bad lines and bad times get it

STAMPS: list[bytes] = [
    b"2026-12-01T12:00:00.000000001Z",
    b"2026-12-01T12:00:00.5Z",
    b"2026-12-01T12:00:00.123456789123Z",  # more than 9 digits: cut to ns
    b"2026-12-01T12:00:00Z",
    b"2024-02-29T23:59:59.999Z",  # leap day
    b"2026-12-31T23:59:60.1Z",  # a leap second, as strptime takes it
    b"1969-07-20T20:17:40Z",  # before the epoch
    b"2026-12-01T12:00:00.5+02:00",  # an offset: Python decides
    b"2026-12-01T12:00:00-05:30",
    b"2026-1-1T1:0:0",  # one-digit fields: Python decides
    b"2026-12-01T12:00:00.Z",  # no digits: a bad time
    b"2026-12-01T12:00:00.12aZ",
    b"2026-02-30T12:00:00Z",  # no such day
    b"2026-13-01T12:00:00Z",
    b"2026-12-01T24:00:00Z",
    b"0000-01-01T00:00:00Z",
    b"2026-12-01T12:00:00z",
    "2026-12-01T12:00:00\u00e9Z".encode(),  # not ASCII: the time text gets U+FFFD per byte
    b"yesterday",
    b"",
]

MESSAGES: list[bytes] = [
    b'level=info msg="request handled" path=/api/v1/items/1 took=0.6614',
    b'quote " backslash \\ tab \t bell \x07 esc \x1b del \x7f',
    b"ends with CR\r",
    "caf\u00e9 \u65e5\u672c \U0001f600".encode(),
    b"broken \xff\xfe utf-8 \xc3(",
    b"",
    b" leading space",
    b"x" * 70,  # over the small max_size
    "\u00e9".encode() * 30,  # 60 bytes of two-byte characters: a cut must not split one
]


def cri_lines(rnd: random.Random, count: int, bad: bool = True) -> list[bytes]:
    """``count`` lines of every kind, pieces of stdout and stderr interleaved (``bad`` off:
    only good times and CRI lines, so that every record's time comes from its line)."""
    lines: list[bytes] = []
    for _ in range(count):
        kind = rnd.random() if bad else rnd.random() * 0.75
        stream = rnd.choice([b"stdout", b"stderr"])
        stamp = rnd.choice(STAMPS if bad else STAMPS[:9]) if rnd.random() < 0.3 else STAMPS[0]
        message = rnd.choice(MESSAGES)
        if kind < 0.45:
            lines.append(b" ".join([stamp, stream, b"F", message]))
        elif kind < 0.75:  # a message in pieces, the last maybe never written
            cut = rnd.randint(0, len(message))
            lines.append(b" ".join([stamp, stream, b"P", message[:cut]]))
            if rnd.random() < 0.8:
                lines.append(b" ".join([stamp, stream, b"F", message[cut:]]))
        else:
            lines.append(
                rnd.choice(
                    [
                        b"",  # skipped
                        stamp + b" " + stream + b" F",  # three parts: an empty message
                        stamp + b" stdin F wrong stream",
                        stamp + b" " + stream + b" X wrong flag",
                        stamp + b"  " + stream + b" F two spaces",
                        b"not a container log line",
                        b"two words",
                        b"\xff\xfe not utf-8 and not cri",
                        b'{"log":"a docker line under cri","stream":"stdout"}',
                    ]
                )
            )
    return lines


def state(joiner: ContainerLogJoiner) -> dict[str, tuple[Any, ...]]:
    """The pending messages as checkpoints and flushes see them."""
    return {
        stream: (p.start, p.time_text, p.time_ns, b"".join(p.parts), p.size, p.over)
        for stream, p in joiner.pending.items()
    }


def compare(
    lines: list[bytes],
    cuts: list[int],
    max_size: int,
    truncate: bool,
    formats: tuple[str, ...] = ("cri",),
    key: str = "log",
) -> tuple[int, int]:
    """Both paths over ``lines`` cut into batches at ``cuts``; returns the records compared and
    the batches the block path took (with ``docker`` among ``formats``, a batch the block path
    declines goes the record way on that joiner, as the tail does)."""
    records_path = ContainerLogJoiner(formats, max_size, truncate, key, "uid")
    block_path = ContainerLogJoiner(formats, max_size, truncate, key, "uid")
    assert block_path.blocks
    compared, blocks, offset = 0, 0, 1000
    bounds = [0, *cuts, len(lines)]
    for begin, end in itertools.pairwise(bounds):
        block = b"".join(line + b"\n" for line in lines[begin:end])
        expected_stats, got_stats = JoinStats(), JoinStats()
        expected = records_path.process(lines[begin:end], offset, "kube.x", expected_stats)
        ready = block_path.process_block(block, offset, "kube.x", got_stats)
        if ready is None and "docker" in formats:
            taken = block_path.process(lines[begin:end], offset, "kube.x", got_stats)
            assert [(r.time_ns, r.identity, r.body) for r in taken] == [
                (r.time_ns, r.identity, r.body) for r in expected
            ]
            assert got_stats == expected_stats
            assert state(block_path) == state(records_path)
            compared += len(expected)
            offset += len(block)
            continue
        assert ready is not None
        blocks += 1
        assert ready.data() == b"".join(orjson.dumps(r.body) + b"\n" for r in expected)
        assert ready.count == len(expected)
        assert list(ready.line_times() or []) == [r.time_ns for r in expected]
        built = ready.records()
        assert built is not None
        assert [(r.tag, r.time_ns, r.identity, r.body) for r in built] == [
            (r.tag, r.time_ns, r.identity, r.body) for r in expected
        ]
        assert got_stats == expected_stats
        assert state(block_path) == state(records_path)
        compared += len(expected)
        offset += len(block)
    expected_stats, got_stats = JoinStats(), JoinStats()
    flushed = records_path.flush(float("inf"), "kube.x", expected_stats)
    assert [(r.time_ns, r.identity, r.body) for r in block_path.flush(float("inf"), "kube.x", got_stats)] == [
        (r.time_ns, r.identity, r.body) for r in flushed
    ]
    assert got_stats == expected_stats
    return compared + len(flushed), blocks


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(("max_size", "truncate"), [(4 * 1024 * 1024, False), (40, False), (40, True)])
def test_random_batches_give_what_the_record_path_gives(
    seed: int, max_size: int, truncate: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: NOW)
    rnd = random.Random(seed * 7 + max_size)
    lines = cri_lines(rnd, 400)
    cuts = sorted(rnd.sample(range(1, len(lines)), 25))
    assert compare(lines, cuts, max_size, truncate)[0] > 200  # fewer where long messages are skipped


# Lines the docker block path declines (the record path decides them): not docker's shape, not
# JSON, or JSON orjson refuses; each a bad line or a record of another layout there.
ODD_DOCKER_LINES: list[bytes] = [
    b'{"log":"with attrs\\n","stream":"stdout","attrs":{"app":"x"},"time":"2026-12-01T12:00:00Z"}',
    b'{"stream":"stdout","log":"stream first\\n","time":"2026-12-01T12:00:00Z"}',
    b'{"log":"time first\\n","time":"2026-12-01T12:00:00Z","stream":"stdout"}',
    b'{"log": "spaced\\n", "stream": "stdout", "time": "2026-12-01T12:00:00Z"}',
    b'{"log":"stdin\\n","stream":"stdin","time":"2026-12-01T12:00:00Z"}',
    b'{"log":"no stream\\n","time":"2026-12-01T12:00:00Z"}',
    b'{"log":"numeric time\\n","stream":"stdout","time":12}',
    b'{"log":"twice\\n","log":"again\\n","stream":"stdout","time":"2026-12-01T12:00:00Z"}',
    b'{"log":"trailing\\n","stream":"stdout","time":"2026-12-01T12:00:00Z"}x',
    b'{"log":"lone \\ud800 surrogate\\n","stream":"stdout","time":"2026-12-01T12:00:00Z"}',
    b'{"log":"raw \x01 control\\n","stream":"stdout","time":"2026-12-01T12:00:00Z"}',
    b'{"log":"bad \xff utf-8\\n","stream":"stdout","time":"2026-12-01T12:00:00Z"}',
    b'{"log":12,"stream":"stdout","time":"2026-12-01T12:00:00Z"}',
    b'{"log":"cut off',
    b"[1, 2]",
    b"2026-12-01T12:00:00Z stdout F a CRI line",
]


def go_escaped(line: bytes) -> bytes:
    """``line`` as docker (Go's encoding/json) escapes it: ``<``, ``>``, ``&``, U+2028 and, here,
    an emoji as a surrogate pair; the record path's orjson writes them as they are."""
    for raw, escaped in ((b"<", b"\\u003c"), (b">", b"\\u003e"), (b"&", b"\\u0026")):
        line = line.replace(raw, escaped)
    return line.replace("\u2028".encode(), b"\\u2028").replace("\U0001f600".encode(), b"\\ud83d\\ude00")


def docker_lines(rnd: random.Random, count: int, odd: float = 0.0) -> list[bytes]:
    """docker json-file lines: whole messages, and messages cut into pieces (a ``log`` without
    its newline), stdout and stderr interleaved, Go's escapes, a bad or odd time now and then,
    and with probability ``odd`` a line of :data:`ODD_DOCKER_LINES`."""
    messages = [m.decode("utf-8", "replace") for m in MESSAGES] + ['<b>&amp;</b> \u2028 \U0001f600 \\ "q"']
    lines: list[bytes] = []
    for _ in range(count):
        if rnd.random() < odd:
            lines.append(rnd.choice(ODD_DOCKER_LINES))
            continue
        stream = rnd.choice(["stdout", "stderr"])
        stamp = rnd.choice(
            ["2026-12-01T12:00:00.123456789Z", "2026-12-01T12:00:01Z", "2026-12-01T12:00:00.5+02:00", "bad time"]
        )
        message = rnd.choice(messages)
        if rnd.random() < 0.3:  # a first piece, then the rest (or, at the end of a run, nothing yet)
            cut = rnd.randint(0, len(message))
            lines.append(go_escaped(orjson.dumps({"log": message[:cut], "stream": stream, "time": stamp})))
            message = message[cut:]
        lines.append(go_escaped(orjson.dumps({"log": message + "\n", "stream": stream, "time": stamp})))
    return lines


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    ("max_size", "truncate", "key"),
    [(4 * 1024 * 1024, False, "log"), (40, False, "log"), (40, True, "log"), (4 * 1024 * 1024, False, "message")],
)
def test_docker_blocks_give_what_the_record_path_gives(
    seed: int, max_size: int, truncate: bool, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``multiline.parser docker``: batches of docker's lines go the block way (``docker_join``),
    those with an odd line the record way, pieces pending across both; the same records."""
    monkeypatch.setattr(time, "time_ns", lambda: NOW)
    rnd = random.Random(seed * 13 + max_size)
    lines = docker_lines(rnd, 400, odd=0.01)
    cuts = sorted(rnd.sample(range(1, len(lines)), 40))
    compared, blocks = compare(lines, cuts, max_size, truncate, ("docker",), key)
    assert compared > 200  # fewer where long messages are skipped
    assert blocks >= 15  # most batches have no odd line


def test_each_odd_docker_line_sends_its_batch_the_record_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: NOW)
    good = b'{"log":"fine\\n","stream":"stdout","time":"2026-12-01T12:00:00Z"}'
    for odd in ODD_DOCKER_LINES:
        for formats in (("docker",), ("docker", "cri")):
            joiner = ContainerLogJoiner(formats, 1 << 20, False, "log", "u")
            if odd[:1] == b"{":
                assert joiner.process_block(good + b"\n" + odd + b"\n", 0, "t", JoinStats()) is None, odd
            assert compare([good, odd, good], [1, 2], 1 << 20, False, formats)[0] >= 2
    # a docker piece pending from the record path (its document had another member) stays there
    joiner = ContainerLogJoiner(("docker",), 1 << 20, False, "log", "u")
    joiner.process([b'{"log":"open","stream":"stdout","attrs":{},"time":"2026-12-01T12:00:00Z"}'], 0, "t", JoinStats())
    assert joiner.process_block(good + b"\n", 100, "t", JoinStats()) is None
    assert compare([good, good], [1], 1 << 20, False, ("docker",)) == (2, 2)


@pytest.mark.parametrize("seed", range(6))
def test_docker_and_cri_take_the_block_path_where_no_line_is_docker(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``multiline.parser docker, cri`` (Fluent Bit's Helm chart default): runs of CRI lines go
    the block way, runs with docker documents (also pieces of a docker message pending across
    batches) the record way, and every batch gives what the record path gives."""
    monkeypatch.setattr(time, "time_ns", lambda: NOW)
    rnd = random.Random(seed)
    lines: list[bytes] = []
    for _ in range(12):  # runs of each format, as a file whose runtime changed, or a mixed test file
        lines += cri_lines(rnd, 60) if rnd.random() < 0.6 else docker_lines(rnd, 15)
    cuts = sorted(rnd.sample(range(1, len(lines)), 40))
    compared, blocks = compare(lines, cuts, 4 * 1024 * 1024, False, ("docker", "cri"))
    assert compared > 200
    assert blocks >= 5  # the CRI-only batches went the block way
    only_cri = [line for line in cri_lines(rnd, 300) if not line.startswith(b"{")]
    compared, blocks = compare(only_cri, [100, 200], 4 * 1024 * 1024, False, ("docker", "cri"))
    assert blocks == 3


def test_pieces_across_batches_and_a_p_without_f_at_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time_ns", lambda: NOW)
    t = STAMPS[0]
    lines = [
        t + b" stdout P one ",
        t + b" stderr P err ",
        t + b" stdout P two ",
        t + b" stdout F three",  # ends stdout's message in a later batch
        t + b" stderr P \xc3",  # a character cut between pieces comes out whole
        t + b" stderr F \xa9 end",
        t + b" stdout P never ends",
    ]
    assert compare(lines, [1, 3, 5], 4 * 1024 * 1024, False) == (3, 4)  # stdout, stderr, the flushed one


def test_stamps_are_timed_as_python_times_them() -> None:
    """Every stamp of the list, and a spread of valid ones, timed natively where the shape is
    the common one (no call into Python for it) and by Python's own parser otherwise."""
    rnd = random.Random(3)
    stamps = list(STAMPS)
    for _ in range(300):
        year, month = rnd.randint(1678, 2261), rnd.randint(1, 12)  # ns since 1970 fit in 64 bits
        digits = "".join(rnd.choice("0123456789") for _ in range(rnd.randint(1, 12)))
        fraction = rnd.choice(["", "." + digits])
        stamp = f"{year:04d}-{month:02d}-{rnd.randint(1, 31):02d}T{rnd.randint(0, 23):02d}:{rnd.randint(0, 59):02d}"
        stamps.append(f"{stamp}:{rnd.randint(0, 61):02d}{fraction}Z".encode())
    reference = ContainerLogJoiner(("cri",), 1 << 20, False, "log", "u")
    asked: list[bytes] = []

    def time_of(stamp: bytes) -> int | None:
        asked.append(stamp)
        return reference.time_ns(stamp)

    block = b"".join(stamp + b" stdout F m\n" for stamp in stamps)
    _, times, _, count, _, (bad_lines, bad_times, *_) = native.cri_join(
        block, 0, b'"log":"', 1 << 20, False, -1, [], time_of
    )
    expected = [reference.time_ns(stamp) for stamp in stamps]
    got = array("q")
    got.frombytes(times)
    assert (count, bad_lines) == (len(stamps), 0)  # an empty stamp is a bad time, not a bad line
    assert list(got) == [-1 if ns is None else ns for ns in expected]
    assert bad_times == sum(ns is None for ns in expected) > 5
    common = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
    assert not [s for s in asked if common.fullmatch(s) and reference.time_ns(s) is not None]
    assert b"2026-12-01T12:00:00.5+02:00" in asked  # the rest is Python's


def test_a_time_beyond_64_bits_of_ns_leaves_the_block_to_the_record_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python's int takes year 9999 in ns, an int64 array does not: that block goes line by
    line, and the joiner's state is untouched by the try."""
    monkeypatch.setattr(time, "time_ns", lambda: NOW)
    joiner = ContainerLogJoiner(("cri",), 1 << 20, False, "log", "u")
    assert joiner.process_block(STAMPS[0] + b" stdout P open\n", 0, "t", JoinStats()) is not None
    before = state(joiner)
    for stamp in (b"9999-12-31T23:59:59Z", b"1000-01-01T00:00:00Z", b"9999-12-31T23:59:59+01:00"):
        assert joiner.process_block(stamp + b" stderr F far\n", 100, "t", JoinStats()) is None
        assert state(joiner) == before
    assert joiner.process([b"9999-12-31T23:59:59Z stderr F far"], 100, "t", JoinStats())[0].time_ns > 2**63


def test_a_key_among_the_record_s_fields_or_mixed_lines_stay_on_the_record_path() -> None:
    assert ContainerLogJoiner(("cri",), 100, False, "log", "u").blocks
    assert not ContainerLogJoiner(("cri",), 100, False, "time", "u").blocks
    assert not ContainerLogJoiner(("docker",), 100, False, "stream", "u").blocks
    both = ContainerLogJoiner(("docker", "cri"), 100, False, "log", "u")
    assert both.process_block(b'{"log":"x\\n"}\n', 0, "t", JoinStats()) is None  # not docker's whole shape
    assert both.process_block(b'2026-12-01T12:00:00Z stdout F x\n{"log":"y"}\n', 0, "t", JoinStats()) is None
    assert both.process_block(b"2026-12-01T12:00:00Z stdout F x {\n", 0, "t", JoinStats()) is not None
    replaying = ContainerLogJoiner(("cri",), 100, False, "log", "u")
    replaying.replay(500, {"stdout": 300})
    assert replaying.process_block(b"x\n", 400, "t", JoinStats()) is None  # inside the replay window
    assert replaying.process_block(b"x\n", 500, "t", JoinStats()) is not None


@pytest.mark.parametrize(
    ("filters", "parsers"),
    [
        ("", "cri"),
        ("[FILTER]\n    name modify\n    match *\n    add  cluster one\n", "cri"),
        ("", "docker, cri"),  # the docker line among cri_lines' bad lines sends its batch the record way
        ("", "docker"),
    ],
)
async def test_tail_to_file_writes_the_same_bytes_either_way(
    tmp_path: Path, filters: str, parsers: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole pipeline, reads of 1 KiB so lines and pieces cross reads, a P whose F never
    comes (flushed at EOF with ``_p: P``); with a filter that works on records, the block's
    records are built from its lines. The record path is the same code without ``cri_join``."""
    rnd = random.Random(11)
    log = tmp_path / "c.log"
    if parsers == "docker":
        lines = docker_lines(rnd, 600, odd=0.005)
        tail_line = b'{"log":"last words","stream":"stdout","time":"2026-12-01T12:00:00Z"}\n'
    else:
        lines = cri_lines(rnd, 600)
        tail_line = STAMPS[0] + b" stdout P last words\n"
    longest = 256 if parsers == "docker" else 64  # some lines are too long for the buffer: skipped
    extra = f"    multiline.parser {parsers}\n    batch_size 1k\n    buffer_chunk_size 1k\n"
    extra += f"    buffer_max_size {longest}\n"
    log.write_bytes(b"".join(line + b"\n" for line in lines) + tail_line)
    outputs = []
    blocks: list[int] = []
    process_block = ContainerLogJoiner.process_block

    def counted(joiner: ContainerLogJoiner, *args: Any) -> Any:
        ready = process_block(joiner, *args)
        blocks.append(ready is not None)
        return ready

    for native_path in (True, False):
        work = tmp_path / ("block" if native_path else "records")
        work.mkdir()
        with monkeypatch.context() as patch:
            patch.setattr(ContainerLogJoiner, "process_block", counted)
            if not native_path:
                patch.setattr(multiline, "cri_join", None)
                patch.setattr(multiline, "docker_join", None)
            config = tail_file_config(work, log, tag="kube.x", input_extra=extra, filters=filters)
            await run_pipeline(config)
        outputs.append((work / "out" / "out.jsonl").read_bytes())
    block_out, record_out = outputs
    # the first run took the block path (every read; with docker, those without a docker line)
    assert sum(blocks) > (30 if parsers == "cri" else 20)
    assert block_out == record_out
    last = orjson.loads(block_out.splitlines()[-1])
    if parsers == "docker":  # a docker message never finished goes out as it is, without _p
        assert last["log"] == "last words" and "_p" not in last
    else:
        assert last["_p"] == "P" and last["log"].endswith("last words")
    assert len(block_out.splitlines()) > 400
    if filters:
        assert all(orjson.loads(line)["cluster"] == "one" for line in block_out.splitlines())


async def test_timed_formats_and_the_filesystem_buffer_give_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``out_file`` frames each line with its record's time (the block's ``times``), and a
    filesystem buffer stores and reads back the block: both the same as line by line."""
    lines = cri_lines(random.Random(5), 500, bad=False)
    log = tmp_path / "c.log"
    log.write_bytes(b"".join(line + b"\n" for line in lines))
    outputs = []
    for native_path in (True, False):
        work = tmp_path / ("block" if native_path else "records")
        work.mkdir()
        extra = "    multiline.parser cri\n    batch_size 2k\n    buffer_chunk_size 2k\n    storage.type filesystem\n"
        framed = (
            f"[OUTPUT]\n    name file\n    match *\n    path {work / 'out'}\n    file framed.txt\n    format out_file\n"
        )
        with monkeypatch.context() as patch:
            if not native_path:
                patch.setattr(multiline, "cri_join", None)
                patch.setattr(multiline, "docker_join", None)
            config = tail_file_config(
                work,
                log,
                tag="kube.x",
                input_extra=extra,
                filters=framed,
                service_extra=f"    storage.path {work / 'buf'}",
            )
            await run_pipeline(config)
        outputs.append(((work / "out" / "out.jsonl").read_bytes(), (work / "out" / "framed.txt").read_bytes()))
    assert outputs[0] == outputs[1]
    assert outputs[0][1].count(b"\n") == outputs[0][0].count(b"\n") > 300
