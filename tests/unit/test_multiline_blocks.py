"""Text lines as one block: the tail with no parser hands a ``TextBlock``, the multiline filter
walks it natively (``kubetrail_native.LineRules``) and hands on a block of joined messages.

Every test compares the block path with the record path on the same input, byte for byte:
the JSON lines a ``plain`` output writes, each record's time and identity, the copies held
across batches and when each input batch is acknowledged (the tail's checkpoint)."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubetrail.core.acks import AckToken
from kubetrail.core.block import TextBlock
from kubetrail.core.record import Batch, Record
from kubetrail.parsers.multiline_rules import NativeRules, _rust_reads_as_python
from kubetrail.parsers.registry import ParserRegistry
from kubetrail.sources.tail import TailSource
from kubetrail.transforms.multiline import MultilineTransform
from tests import required
from tests.files import written_lines
from tests.unit.helpers import build, run_pipeline, section, tail_file_config, write
from tests.unit.test_multiline_filter import hold_from_first, tail_offset

native = pytest.importorskip("kubetrail_native", reason="kubetrail_native is not built")
if not hasattr(native, "LineRules"):  # an older build of the module
    required.unavailable("kubetrail_native has no LineRules", kind="native", allow_module_level=True)

TRACE_RULES = [
    '"start_state" "/^\\d{4}-\\d{2}-\\d{2} /" "cont"',
    '"cont"        "/^\\s+at /"               "cont"',
]

# Lines of every kind: starts of each parser, continuations, lines that match nothing, text
# that is not ASCII (decided by Python's re: U+2003 and U+001C are \s there), invalid UTF-8,
# quotes, backslashes and control characters to escape.
POOL: list[bytes] = [
    b"2026-12-01 12:00:00,001 ERROR request 1 failed: boom",
    b"    at com.example.Handler.step0(Handler.java:1)",
    b"\tat com.example.App.run(App.java:42)",
    b'Exception in thread "main" java.lang.IllegalStateException: boom',
    b"Caused by: java.lang.NullPointerException: null",
    b"\t... 2 more",
    b"Traceback (most recent call last):",
    b'  File "/app/main.py", line 3, in <module>',
    b"    main()",
    b"ValueError: bad",
    b"panic: runtime error: index out of range",
    b"goroutine 1 [running]:",
    b"main.main()",
    b"a line that matches nothing",
    "    at caf\u00e9.\u00fc(\u00fc.java:1) \u2014 \u65e5\u672c".encode(),
    "\u2003at com.example.Wide(W.java:1)".encode(),
    b"\x1cat com.example.Sep(S.java:1)",
    b"    at \xff\xfe broken utf-8 \xc3(",
    b'2026-12-01 12:00:00,002 quote " backslash \\ tab \t bell \x07 del \x7f',
    b"   ",
    b"x",
]


def parsers() -> ParserRegistry:
    registry = ParserRegistry()
    registry.multiline_sections = [  # type: ignore[attr-defined]
        section("multiline_parser", name="app_trace", type="regex", rule=TRACE_RULES)
    ]
    return registry


def transform(native_path: bool, **props: Any) -> MultilineTransform:
    props = {k.replace(".", "__"): v for k, v in props.items()}
    filt: MultilineTransform = build(MultilineTransform, parsers=parsers(), **props)
    if native_path:
        assert filt.native is not None, "these rules should run natively"
    else:
        filt.native = None  # the record path: what the filter does without the native module
    return filt


def text_batch(tag: str, block: bytes, start: int, ack: AckToken, as_block: bool, now: int) -> Batch:
    """What the tail hands on for ``block`` (whole lines from file offset ``start``): a
    TextBlock, or the records its line-by-line path makes."""
    first_end = block.find(b"\n")
    crlf = first_end > 0 and block[first_end - 1] == 13
    text = TextBlock(block, block.count(b"\n"), tag, "log", now, crlf)
    text.identity = ("uid", start)
    if as_block:
        return Batch(tag, None, ack, len(block), block=text)
    records = text.records()
    assert records is not None
    return Batch(tag, records, ack, len(block))


def plain(batch: Batch) -> bytes:
    """What the file output's ``plain`` format writes for the batch."""
    data = batch.raw_block
    if data is not None:
        return data
    return b"".join(record.json_bytes() + b"\n" for record in batch.records)


def seen(batch: Batch) -> tuple[Any, ...]:
    """A batch as outputs see it: plain bytes, every time, identity and body."""
    times = list(batch.block_times())
    return (
        plain(batch),
        times,
        [(r.time_ns, r.identity, r.body) for r in batch.records],
    )


async def run_filter(
    lines: list[bytes], cuts: list[int], native_path: bool, eol: bytes = b"\n", **props: Any
) -> list[Any]:
    """The lines cut into batches at ``cuts`` through one filter; everything it hands on (the
    batches, the copies, what flush_held sends at the end) and, after each step, which input
    batches are acknowledged."""
    filt = transform(native_path, **{"multiline.parser": "app_trace, java, python, go", **props})
    events: list[Any] = []
    done: list[list[bool]] = []

    async def emit(batch: Batch, durable: bool = False) -> None:
        events.append(("flushed", seen(batch)))
        assert batch.ack is not None
        batch.ack.seal()

    filt.emit = emit
    offset = 0
    bounds = [0, *cuts, len(lines)]
    for n, (begin, end) in enumerate(itertools.pairwise(bounds)):
        block = b"".join(line + eol for line in lines[begin:end])
        if not block:
            continue
        done.append([])
        ack = AckToken(done[-1].append)
        batch = text_batch("app", block, offset, ack, native_path, 1000 + n)
        offset += len(block)
        out, copies = filt.process_emitting(batch)
        assert out.ack is ack or not len(out)
        events.append(("out", seen(out) if len(out) else None))
        for copy in copies:
            events.append(("copy", seen(copy)))
            assert copy.ack is not None
            copy.ack.seal()
        ack.seal()
        events.append(("acked", [list(d) for d in done]))
    await filt.flush_held()
    events.append(("acked at the end", [list(d) for d in done]))
    events.append(("joined", filt.m_joined._value.get()))
    return events


def random_lines(rnd: random.Random, count: int) -> list[bytes]:
    lines: list[bytes] = []
    while len(lines) < count:
        if rnd.random() < 0.4:  # a trace: a start and its continuations
            lines.append(POOL[0])
            lines.extend(rnd.choice(POOL[1:3] + POOL[14:18]) for _ in range(rnd.randrange(0, 5)))
        else:
            lines.append(rnd.choice(POOL))
    return lines


@pytest.mark.parametrize("buffer", ["on", "off"])
@pytest.mark.parametrize("seed", range(12))
async def test_block_and_record_paths_agree_on_random_input(seed: int, buffer: str) -> None:
    rnd = random.Random(seed)
    lines = random_lines(rnd, rnd.randrange(1, 120))
    cuts = sorted(rnd.sample(range(1, len(lines)), min(len(lines) - 1, rnd.randrange(0, 8)))) if len(lines) > 1 else []
    eol = b"\r\n" if seed % 3 == 0 else b"\n"
    block_path = await run_filter(lines, cuts, True, eol, buffer=buffer)
    record_path = await run_filter(lines, cuts, False, eol, buffer=buffer)
    assert block_path == record_path


@pytest.mark.parametrize("buffer", ["on", "off"])
async def test_a_group_split_across_batches_and_one_pending_at_the_end(buffer: str) -> None:
    lines = [
        b"before",
        POOL[0],
        POOL[1],  # batch 1 ends inside the trace
        POOL[1],
        POOL[1],  # batch 2: all of it continues the trace
        POOL[1],
        b"after",
        POOL[0],  # batch 3 ends with a trace open: pending at EOF, flushed at the end
        POOL[1],
    ]
    block_path = await run_filter(lines, [3, 5], True, buffer=buffer)
    assert block_path == await run_filter(lines, [3, 5], False, buffer=buffer)
    written = b"".join(
        value[0] for kind, value in block_path if kind in ("out", "copy", "flushed") and value is not None
    )

    def joined(first: int, end: int) -> str:
        return "\n".join(line.decode() for line in lines[first:end])

    # buffer off: each batch on its own, a trace open at a batch's end goes out as it is, and
    # the next batch's continuations, with no trace open, pass alone.
    pieces = [joined(1, 6)] if buffer == "on" else [joined(1, 3), joined(3, 4), joined(4, 5), joined(5, 6)]
    assert [orjson.loads(line)["log"] for line in written.splitlines()] == ["before", *pieces, "after", joined(7, 9)]
    if buffer == "on":
        # Batch 1 stays unacknowledged until the copy with the joined trace is delivered.
        assert ("acked", [[], []]) in block_path
        assert block_path[-2] == ("acked at the end", [[True], [True], [True]])


def test_the_filter_hands_on_a_block_and_joined_identities_are_the_first_lines() -> None:
    filt = transform(True, **{"multiline.parser": "app_trace"})
    lines = [b"one", POOL[0], POOL[1], POOL[1], b"two"]
    block = b"".join(line + b"\n" for line in lines)
    out, copies = filt.process_emitting(text_batch("app", block, 100, AckToken(lambda _: None), True, 7))
    assert copies == [] and not out.is_materialized  # one block, no record made
    assert list(out.block_times()) == [7, 7, 7]
    assert [r.identity for r in out.records] == [("uid", 100), ("uid", 104), ("uid", 100 + len(block) - 4)]
    assert [r.body["log"] for r in out.records] == ["one", "\n".join(x.decode() for x in lines[1:4]), "two"]


def test_records_and_other_keys_take_the_record_path() -> None:
    filt = transform(True, **{"multiline.parser": "app_trace", "multiline.key_content": "message"})
    block = b"".join(line + b"\n" for line in [POOL[0], POOL[1]])
    out, _ = filt.process_emitting(text_batch("app", block, 0, AckToken(lambda _: None), True, 1))
    # The tail's key is log: nothing here has a message key, every line passes alone.
    assert [r.body for r in out.records] == [{"log": POOL[0].decode()}, {"log": POOL[1].decode()}]
    start, cont = POOL[0].decode(), POOL[1].decode()
    parsed = [Record("app", 1, {"log": start, "level": "error"}), Record("app", 2, {"log": cont})]
    filt = transform(True, buffer="off", **{"multiline.parser": "app_trace"})
    out, _ = filt.process_emitting(Batch("app", parsed))
    assert [r.body for r in out.records] == [{"log": f"{start}\n{cont}", "level": "error"}]


@pytest.mark.parametrize(
    ("pattern", "native_reads_it"),
    [
        (r"^\d{4}-\d{2}-\d{2} ", True),
        (r"^[\t ]+(?:eval )?at ", True),
        (r"^[]a]x", True),
        (r"[[:alpha:]]", False),
        (r"[a&&b]", False),
        (r"[a-z--b]", False),
        (r"\<word\>", False),
        (r"(?x) a [ ] b", False),
        ("caf\u00e9", False),
    ],
)
def test_patterns_rust_would_read_otherwise_stay_with_python(pattern: str, native_reads_it: bool) -> None:
    assert _rust_reads_as_python(pattern) is native_reads_it


def test_rules_rust_does_not_compile_stay_on_the_record_path() -> None:
    registry = ParserRegistry()
    registry.multiline_sections = [  # type: ignore[attr-defined]
        section("multiline_parser", name="look", type="regex", rule=['"start_state" "/^(?=x)x/" "cont"']),
        section("multiline_parser", name="ends", type="endswith", match_string="\\"),
    ]
    for name in ("look", "ends"):
        filt = build(MultilineTransform, parsers=registry, **{"multiline__parser": name})
        assert filt.native is None
    assert NativeRules.of([]) is None


@pytest.mark.parametrize("seed", range(4))
def test_text_block_json_lines_are_orjson_bytes(seed: int) -> None:
    """The tail's TextBlock written natively as orjson writes ``{key: line}`` of each line
    decoded with ``replace``, on random bytes (invalid UTF-8, controls, quotes, CRLF)."""
    rnd = random.Random(seed)
    alphabet = [*range(1, 10), *range(11, 128), 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xFF, 0xF0, 0x9F, 0x98, 0x80]
    lines = [bytes(rnd.choice(alphabet) for _ in range(rnd.randrange(1, 60))) for _ in range(300)]
    lines = [line for line in lines if line.strip(b"\r")]
    for crlf in (False, True):
        block = b"".join(line + (b"\r\n" if crlf else b"\n") for line in lines)
        text = TextBlock(block, len(lines), "t", "k\u00e9y\t", 5, crlf)
        data = text.data()
        expected = b"".join(orjson.dumps({"k\u00e9y\t": line.decode("utf-8", "replace")}) + b"\n" for line in lines)
        assert data == expected
        records = text.build(expected)
        assert [r.body for r in records] == [orjson.loads(line) for line in expected.splitlines()]


# -- the whole pipeline: tail (no parser) -> multiline -> file --------------------------------------


def counting_feed_block(walked: list[int]) -> Callable[[MultilineTransform, str, Batch, TextBlock], Batch]:
    """The filter's ``_feed_block`` noting in ``walked`` the line count of each block it walks."""
    feed_block = MultilineTransform._feed_block

    def counted(self: MultilineTransform, tag: str, batch: Batch, block: TextBlock) -> Batch:
        walked.append(block.count)
        return feed_block(self, tag, batch, block)

    return counted


def trace_parsers_file(directory: Path) -> str:
    """``directory/ml.conf`` with the app_trace multiline parser (TRACE_RULES); returns the
    ``[SERVICE]`` line that loads it."""
    write(
        directory / "ml.conf",
        "[MULTILINE_PARSER]\n    name app_trace\n    type regex\n"
        + "".join(f"    rule {rule}\n" for rule in TRACE_RULES),
    )
    return "    parsers_file ml.conf"


async def pipeline_output(tmp_path: Path, log: Path, block_path: bool, monkeypatch: pytest.MonkeyPatch) -> bytes:
    walked: list[int] = []
    with monkeypatch.context() as patch:
        patch.setattr(MultilineTransform, "_feed_block", counting_feed_block(walked))
        if not block_path:
            patch.setattr(TailSource, "_text_block", lambda self, tailed, block: None)
            patch.setattr(NativeRules, "of", classmethod(lambda cls, rulesets: None))
        work = tmp_path / ("block" if block_path else "records")
        config = tail_file_config(
            work,
            log,
            input_extra="    batch_size 200\n    buffer_chunk_size 100",
            filters="[FILTER]\n    name multiline\n    match app\n    multiline.parser app_trace, java",
            service_extra=trace_parsers_file(work),
        )
        await run_pipeline(config)
    # The block path walked blocks of several lines; the record path none.
    assert (len(walked) > 3 and max(walked) > 3) if block_path else not walked
    return b"".join(line + b"\n" for line in written_lines(work / "out" / "out.jsonl"))


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
async def test_tail_to_file_through_the_filter_is_the_same_either_way(
    tmp_path: Path, eol: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    rnd = random.Random(18)
    lines = random_lines(rnd, 400)
    lines.append(POOL[0])  # a trace open when the file ends
    lines.append(POOL[1])
    log = tmp_path / "app.log"
    log.write_bytes(b"".join(line + eol for line in lines))
    via_blocks = await pipeline_output(tmp_path, log, True, monkeypatch)
    via_records = await pipeline_output(tmp_path, log, False, monkeypatch)
    assert via_blocks == via_records
    assert via_blocks.count(b"\n") < len(lines)  # traces were joined
    assert orjson.loads(via_blocks.splitlines()[-1])["log"] == f"{POOL[0].decode()}\n{POOL[1].decode()}"


async def test_a_crlf_file_with_an_empty_line_takes_the_line_path(tmp_path: Path) -> None:
    log = tmp_path / "crlf.log"
    log.write_bytes(b"one\r\n\r\ntwo\r\n")
    config = tail_file_config(tmp_path, log)
    await run_pipeline(config)
    assert written_lines(tmp_path / "out" / "out.jsonl") == [b'{"log":"one"}', b'{"log":"two"}']


async def test_a_trace_held_across_blocks_keeps_the_checkpoint_until_delivered(tmp_path: Path) -> None:
    """The block path's held message keeps the tail's checkpoint before its first line until the
    joined message is delivered (tail with no parser, one line per block), as the record path
    does (``test_multiline_filter.py``'s test of the same with a json parser)."""
    from kubetrail.core.config import load_config
    from kubetrail.runtime.pipeline import Pipeline

    trace = [POOL[0], POOL[1], POOL[1], POOL[1]]
    log = tmp_path / "app.log"
    log.write_bytes(b"".join(line + b"\n" for line in [b"before", *trace, b"after"]))
    config = tail_file_config(
        tmp_path,
        log,
        input_extra="    batch_size 1\n    buffer_chunk_size 1",
        filters="[FILTER]\n    name multiline\n    match app\n    multiline.parser app_trace\n    flush_ms 60000",
        service_extra=trace_parsers_file(tmp_path),
        grace=3,
    )
    pipeline = Pipeline(load_config(config))
    runner = pipeline.runners[0]
    gate = asyncio.Event()
    walked: list[int] = []
    feed_block = MultilineTransform._feed_block

    def has_trace(batch: Batch) -> bool:
        data = batch.raw_block
        return data is not None and b"ERROR request" in data

    runner.sink.write_group = hold_from_first(runner.sink.write_group, gate, has_trace)  # type: ignore[method-assign]
    MultilineTransform._feed_block = counting_feed_block(walked)  # type: ignore[method-assign]
    try:
        task = asyncio.create_task(pipeline.run())

        def offset() -> int:
            return tail_offset(tmp_path / "tail.db")

        await asyncio.sleep(1.0)  # every line read (one per block), the joined message at the gate
        assert written_lines(tmp_path / "out" / "out.jsonl") == [b'{"log":"before"}']
        assert offset() == len(b"before\n")  # not past the trace's first line
        gate.set()
        assert await asyncio.wait_for(task, 20) == 0
    finally:
        MultilineTransform._feed_block = feed_block  # type: ignore[method-assign]
    assert len(walked) == 6  # every line came as a block of one
    joined = "\n".join(line.decode() for line in trace)
    assert [orjson.loads(line)["log"] for line in written_lines(tmp_path / "out" / "out.jsonl")] == [
        "before",
        joined,
        "after",
    ]
    assert offset() == log.stat().st_size


PATTERNS = [
    r"^a{2,}$",
    r"^\x41",
    r"^\u0041",
    r"[a-]",
    r"^\-",
    r"^\s+at ",
    r"\bfoo\b",
    r"(?i)^exception",
    r"[^\s.():]+:",
    r"^[\t ]*... \d+ (?:more|common)",
    r"\W",
    r"[\]]",
    r"[\[]",
    r"\$",
    r"(?m)^x$",
    r"(?s).x",
    r"\Bb",
    r"(|a)",
    r"[\s\S]",
    r"\v|\f|\a",
    r"^\s",
]
SUBJECTS = ["aa", "a", "A", "x", "-", " ", "5", ".", "  at foo", "foo bar", "Exception", "EXCEPTION: x", "j.l.X: y"]
SUBJECTS += [
    "\t... 2 more",
    "]",
    "[",
    "$",
    "\x0b",
    "\x0c",
    "\x07",
    "\x08",
    "\t",
    "ab",
    "\x1c x",
    "\x7f",
    "\u2003x",
    "\u00e9:",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_rule_starts_the_same_lines_natively_as_with_python_re(pattern: str) -> None:
    import re

    assert _rust_reads_as_python(pattern)
    regex = re.compile(pattern)
    rules = native.LineRules([pattern], [(0, 0)], [[]])
    asked: list[str] = []

    def search(rule: int, text: str) -> bool:
        asked.append(text)
        return regex.search(text) is not None

    for subject in SUBJECTS:
        # One line, the message it starts left open: tail_start 0 when it started one.
        out = rules.join(subject.encode() + b"\n", False, b'{"log":"', -1, False, search)
        assert (out[4] == 0) is (regex.search(subject) is not None), subject
    # Only the lines that are not plain ASCII (or hold U+001C..U+001F) were asked of Python.
    assert asked == ["\x1c x", "\u2003x", "\u00e9:"]
