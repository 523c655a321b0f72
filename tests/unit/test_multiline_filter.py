"""The multiline filter: Fluent Bit's built-in go/python/java/ruby rules, [MULTILINE_PARSER]
rules, partial_message mode, cri/docker through the tail's joiner, buffering across batches with
the acknowledgement chain, flush_ms, and a whole pipeline run."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubetrail.core.acks import AckToken
from kubetrail.core.config import load_config
from kubetrail.core.errors import ConfigError
from kubetrail.core.record import Batch, Record
from kubetrail.parsers.registry import ParserRegistry
from kubetrail.runtime.pipeline import Pipeline
from kubetrail.transforms.multiline import MultilineTransform
from tests.files import written_json_lines
from tests.unit.helpers import build, run_pipeline, section, tail_file_config, write

JAVA = [
    'Exception in thread "main" java.lang.IllegalStateException: boom',
    "\tat com.example.App.run(App.java:42)",
    "\tat com.example.App.main(App.java:10)",
    "Caused by: java.lang.NullPointerException: null",
    "\tat com.example.Repo.find(Repo.java:7)",
    "\t... 2 more",
]
PYTHON = [
    "Traceback (most recent call last):",
    '  File "/app/main.py", line 3, in <module>',
    "    main()",
    '  File "/app/main.py", line 2, in main',
    "    raise ValueError('bad')",
    "ValueError: bad",
]
GO = [
    "panic: runtime error: index out of range [3] with length 3",
    "",
    "goroutine 1 [running]:",
    "main.main()",
    "\t/app/main.go:8 +0x1d",
    "exit status 2",
]


def records(lines: list[str], tag: str = "app", key: str = "log", **extra: Any) -> list[Record]:
    return [Record(tag, n, {key: line, **extra}, identity=("f", n)) for n, line in enumerate(lines)]


def logs(out: list[Record], key: str = "log") -> list[str]:
    return [r.body[key] for r in out]


def multiline(parsers: ParserRegistry | None = None, **props: Any) -> MultilineTransform:
    props.setdefault("buffer", "off")
    return build(MultilineTransform, parsers=parsers, **{k.replace(".", "__"): v for k, v in props.items()})


@pytest.mark.parametrize(
    ("parser", "trace"),
    [("java", JAVA), ("python", PYTHON), ("go", GO[:5])],
)
def test_builtin_parsers_join_a_trace_between_other_lines(parser: str, trace: list[str]) -> None:
    transform = multiline(**{"multiline.parser": parser})
    out = transform.process(records(["starting", *trace, "next line"]))
    assert logs(out) == ["starting", "\n".join(trace), "next line"]
    assert out[1].identity == ("f", 1) and out[1].time_ns == 1  # the first piece's record


def test_several_parsers_each_own_its_message() -> None:
    transform = multiline(**{"multiline.parser": "go, python, java"})
    out = transform.process(records(["a", *PYTHON, *JAVA, "b"]))
    assert logs(out) == ["a", "\n".join(PYTHON), "\n".join(JAVA), "b"]


def test_go_trace_ends_where_its_rules_end() -> None:
    out = multiline(**{"multiline.parser": "go"}).process(records(GO))
    assert logs(out) == ["\n".join(GO[:5]), "exit status 2"]


def test_other_keys_of_the_first_record_are_kept_and_non_text_passes() -> None:
    transform = multiline(**{"multiline.parser": "python", "multiline.key_content": "message"})
    batch = [*records(PYTHON[:2], key="message", stream="stderr"), Record("app", 9, {"message": 5})]
    out = transform.process(batch)
    assert [r.body for r in out] == [{"message": "\n".join(PYTHON[:2]), "stream": "stderr"}, {"message": 5}]


def test_docker_style_trailing_newlines_are_not_doubled() -> None:
    out = multiline(**{"multiline.parser": "python"}).process(records([line + "\n" for line in PYTHON]))
    assert logs(out) == ["\n".join(PYTHON)]


def test_custom_multiline_parser_rules() -> None:
    parsers = ParserRegistry()
    custom = section(
        "multiline_parser",
        name="multiline-regex-test",
        type="regex",
        flush_timeout="1000",
        rule=[
            '"start_state"   "/([a-zA-Z]+ \\d+ \\d+\\:\\d+\\:\\d+)(.*)/"  "cont"',
            '"cont"          "/^\\s+at.*/"                               "cont"',
        ],
    )
    parsers.multiline_sections = [custom]  # type: ignore[attr-defined]
    transform = multiline(parsers, **{"multiline.parser": "multiline-regex-test"})
    lines = ["Dec 14 06:41:08 Exception in thread", "    at com.a(A.java:1)", "    at com.b(B.java:2)", "single"]
    assert logs(transform.process(records(lines))) == ["\n".join(lines[:3]), "single"]


def test_endswith_parser_continues_lines() -> None:
    parsers = ParserRegistry()
    parsers.multiline_sections = [  # type: ignore[attr-defined]
        section("multiline_parser", name="backslash", type="endswith", match_string="\\")
    ]
    transform = multiline(parsers, **{"multiline.parser": "backslash"})
    assert logs(transform.process(records(["a \\", "b \\", "c", "d"]))) == ["a \\\nb \\\nc", "d"]


def test_partial_message_mode() -> None:
    transform = multiline(mode="partial_message", **{"multiline.key_content": "log"})
    pieces = [
        {
            "log": "first ",
            "partial_message": "true",
            "partial_id": "p1",
            "partial_ordinal": "1",
            "partial_last": "false",
        },
        {
            "log": "second ",
            "partial_message": "true",
            "partial_id": "p1",
            "partial_ordinal": "2",
            "partial_last": "false",
        },
        {"log": "third", "partial_message": "true", "partial_id": "p1", "partial_ordinal": "3", "partial_last": "true"},
        {"log": "whole", "container_id": "c"},
    ]
    out = transform.process([Record("app", n, body) for n, body in enumerate(pieces)])
    assert [r.body for r in out] == [{"log": "first second third"}, {"log": "whole", "container_id": "c"}]


def test_cri_pieces_are_joined_by_the_tail_joiner() -> None:
    transform = multiline(**{"multiline.parser": "cri"})
    lines = [
        "2024-05-01T10:00:00.000000001Z stdout P part one ",
        "2024-05-01T10:00:00.000000002Z stderr F an error",
        "2024-05-01T10:00:00.000000003Z stdout F part two",
    ]
    out = transform.process(records(lines))
    assert [r.body for r in out] == [
        {"time": "2024-05-01T10:00:00.000000002Z", "stream": "stderr", "_p": "F", "log": "an error"},
        {"time": "2024-05-01T10:00:00.000000001Z", "stream": "stdout", "_p": "F", "log": "part one part two"},
    ]


@pytest.mark.parametrize(
    ("props", "message"),
    [
        ({"multiline.parser": "cobol"}, "unknown multiline parser 'cobol'; known: cri, docker, go, java"),
        ({"multiline.parser": "cri, java"}, "cannot be mixed"),
        ({}, "needs multiline.parser"),
    ],
)
def test_config_errors(props: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        multiline(**props)


def test_a_message_open_at_the_end_of_a_batch_without_buffer_goes_out_as_it_is() -> None:
    transform = multiline(**{"multiline.parser": "java"})
    out = transform.process(records(JAVA[:2]))
    assert logs(out) == ["\n".join(JAVA[:2])]


def token(done: list[bool]) -> AckToken:
    return AckToken(done.append)


def test_buffered_message_across_batches_keeps_the_acknowledgement_chain() -> None:
    transform = multiline(buffer="on", **{"multiline.parser": "java"})
    first_done: list[bool] = []
    second_done: list[bool] = []
    first = Batch("app", records(["before", *JAVA[:3]]), token(first_done))
    out1, copies1 = transform.process_emitting(first)
    assert logs(out1.records) == ["before"] and copies1 == []
    assert first.ack is not None
    first.ack.seal()  # the source finished routing batch 1; "before" is delivered
    assert first_done == [], "batch 1 is held open by the pending trace"
    second_records = [Record("app", 10 + n, {"log": line}) for n, line in enumerate([*JAVA[3:], "after"])]
    second = Batch("app", second_records, token(second_done))
    out2, [copy] = transform.process_emitting(second)
    assert len(out2) == 0  # everything from the held message on goes out in order, in the copy
    assert logs(copy.records) == ["\n".join(JAVA), "after"]
    assert second.ack is not None
    second.ack.seal()
    assert first_done == [] and second_done == []
    assert copy.ack is not None
    copy.ack.seal()  # the copy is delivered
    assert first_done == [True] and second_done == [True]


async def test_flush_ms_sends_a_held_message_whose_end_never_comes() -> None:
    transform = multiline(buffer="on", flush_ms="100", **{"multiline.parser": "python"})
    emitted: list[Batch] = []

    async def emit(batch: Batch, durable: bool = False) -> None:
        emitted.append(batch)
        assert batch.ack is not None
        batch.ack.seal()

    transform.emit = emit
    done: list[bool] = []
    batch = Batch("app", records(PYTHON[:3]), token(done))
    out, copies = transform.process_emitting(batch)
    assert len(out) == 0 and copies == []
    assert batch.ack is not None
    batch.ack.seal()
    await transform.start()
    try:
        for _ in range(50):
            if emitted:
                break
            await asyncio.sleep(0.02)
    finally:
        await transform.close()
    assert [logs(b.records) for b in emitted] == [["\n".join(PYTHON[:3])]]
    assert done == [True]


async def test_pipeline_with_a_classic_multiline_parser_section(tmp_path: Path) -> None:
    lines = ["start", *JAVA, "2024-05-01 one line", *PYTHON]
    log = write(tmp_path / "app.log", "".join(orjson.dumps({"log": line}).decode() + "\n" for line in lines))
    write(
        tmp_path / "parsers_multiline.conf",
        """[MULTILINE_PARSER]
    name          dated
    type          regex
    flush_timeout 1000
    rule          "start_state" "/^\\d{4}-\\d{2}-\\d{2} /" "cont"
    rule          "cont"        "/^\\s+/"                  "cont"
""",
    )
    multiline = "[FILTER]\n    name multiline\n    match app\n    multiline.key_content log\n"
    config = tail_file_config(
        tmp_path,
        log,
        input_extra="    parser json",
        filters=multiline + "    multiline.parser java, dated, python",
        service_extra="    parsers_file parsers_multiline.conf",
        grace=3,
    )
    await run_pipeline(config)
    # The last trace was held open when the file ended: flushed before the output drained.
    assert [r["log"] for r in written_json_lines(tmp_path / "out" / "out.jsonl")] == [
        "start",
        "\n".join(JAVA),
        "2024-05-01 one line",
        "\n".join(PYTHON),
    ]


def test_bad_multiline_parser_section_is_refused_where_it_is(tmp_path: Path) -> None:
    log = write(tmp_path / "a.log", "")
    config = write(
        tmp_path / "p.conf",
        f"""[MULTILINE_PARSER]
    name bad
    type regex
    rule "cont" "/x/" "cont"
[INPUT]
    name tail
    path {log}
[OUTPUT]
    name stdout
    match *
""",
    )
    with pytest.raises(ConfigError, match='needs a rule from "start_state"'):
        Pipeline(load_config(config))


def test_state_of_a_tag_is_forgotten_once_nothing_is_open() -> None:
    """Tags made from file paths come and go: a tag with no open message keeps no state."""
    transform = multiline(**{"multiline.parser": "java"})
    transform.process(records(JAVA, tag="kube.a"))
    assert transform.joiners == {} and transform._pieces == {}
    held = multiline(buffer="on", **{"multiline.parser": "java"})
    out, _ = held.process_emitting(Batch("kube.b", records(JAVA, tag="kube.b"), token([])))
    assert len(out) == 0 and set(held.joiners) == {"kube.b"}  # the trace may go on
    container = multiline(**{"multiline.parser": "cri"})
    container.process(records(["2024-05-01T10:00:00.000000001Z stdout F whole"], tag="kube.c"))
    assert container.containers == {}


# -- tail's multiline.parser with line parsers ----------------------------------------------------


async def test_tail_multiline_parser_java_and_a_custom_parser(tmp_path: Path) -> None:
    """Fluent Bit's tail with ``multiline.parser`` naming line parsers: each file's lines are
    joined into messages before anything else sees them, as ``{log: text}`` records."""
    lines = ["starting", *JAVA, "Dec 14 06:41:08 Exception in thread main", "    at com.a(A.java:1)", "done"]
    log = write(tmp_path / "app.log", "\n".join(lines) + "\n")
    write(
        tmp_path / "ml.conf",
        '[MULTILINE_PARSER]\n    name dated\n    type regex\n    rule "start_state" "/^[A-Z][a-z]+ \\d+ /" "cont"\n'
        '    rule "cont" "/^\\s+at/" "cont"\n',
    )
    config = tail_file_config(
        tmp_path, log, input_extra="    multiline.parser java, dated", service_extra="    parsers_file ml.conf"
    )
    await run_pipeline(config)
    assert [r["log"] for r in written_json_lines(tmp_path / "out" / "out.jsonl")] == [
        "starting",
        "\n".join(JAVA),
        "Dec 14 06:41:08 Exception in thread main\n    at com.a(A.java:1)",
        "done",
    ]


def test_regex_joiner_resumes_an_open_message_without_repeating_lines() -> None:
    """The tail's checkpoint scheme: after a restart, lines before ``emitted`` are read again only
    to rebuild the message that was open; none of them comes out twice."""
    from kubetrail.parsers.multiline import JoinStats
    from kubetrail.parsers.multiline_rules import RegexLogJoiner, builtin

    data = [b"one", JAVA[0].encode(), JAVA[1].encode(), JAVA[2].encode(), b"two"]
    offsets = [sum(len(x) + 1 for x in data[:i]) for i in range(len(data))]
    first = RegexLogJoiner([builtin("java")], 1 << 20, False, "log", "u")
    out = first.process(data[:3], 0, "t", JoinStats())  # the trace is still open after line 3
    assert [r.body["log"] for r in out] == ["one"]
    starts, emitted = first.pending_starts(), offsets[3]
    assert starts == {"": offsets[1]}
    second = RegexLogJoiner([builtin("java")], 1 << 20, False, "log", "u")
    second.replay(emitted, starts)
    out = second.process(data[1:], offsets[1], "t", JoinStats())  # resumed at the open message
    assert [r.body["log"] for r in out] == ["\n".join(JAVA[:3]), "two"]
    assert [r.identity for r in out] == [("u", offsets[1]), ("u", offsets[4])]
    delivered = RegexLogJoiner([builtin("java")], 1 << 20, False, "log", "u")
    delivered.replay(offsets[4], {})  # nothing open: everything before offsets[4] was delivered
    assert [r.body["log"] for r in delivered.process(data, 0, "t", JoinStats())] == ["two"]


def test_tail_refuses_container_and_line_parsers_mixed(tmp_path: Path) -> None:
    log = write(tmp_path / "a.log", "")
    config = write(
        tmp_path / "p.conf",
        f"[INPUT]\n    name tail\n    path {log}\n    multiline.parser cri, java\n"
        "[OUTPUT]\n    name stdout\n    match *\n",
    )
    with pytest.raises(ConfigError, match="cannot be mixed with line parsers"):
        Pipeline(load_config(config))
    unknown = write(
        tmp_path / "q.conf",
        f"[INPUT]\n    name tail\n    path {log}\n    multiline.parser cobol\n[OUTPUT]\n    name stdout\n    match *\n",
    )
    with pytest.raises(ConfigError, match=r"unknown multiline\.parser 'cobol'; known: cri, docker, go, java"):
        Pipeline(load_config(unknown))


def hold_from_first(
    real_group: Callable[[list[Batch]], Awaitable[None]], gate: asyncio.Event, held: Callable[[Batch], bool]
) -> Callable[[list[Batch]], Awaitable[None]]:
    """A sink's ``write_group`` for batches queued together: those before the first ``held`` one
    are written at once, the rest once ``gate`` is set."""

    async def gated_group(batches: list[Batch]) -> None:
        cut = next((i for i, b in enumerate(batches) if held(b)), len(batches))
        if cut:
            await real_group(batches[:cut])
        if cut < len(batches):
            await gate.wait()  # the joined message waits here
            await real_group(batches[cut:])

    return gated_group


def tail_offset(db: Path) -> int:
    """The offset the tail checkpointed in ``db`` (-1 before any)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT offset FROM in_tail_files").fetchall()
    return rows[0][0] if rows else -1


async def test_a_message_held_across_batches_keeps_the_checkpoint_until_delivered(tmp_path: Path) -> None:
    """Tail reads one line per batch (batch_size and buffer_chunk_size 1): the python trace spans
    six batches, held by the filter (buffer on). Until the joined message is delivered the tail's
    checkpoint stays before the trace; then the whole file is checkpointed, nothing twice."""
    log = write(
        tmp_path / "app.log",
        "".join(orjson.dumps({"log": line}).decode() + "\n" for line in ["before", *PYTHON, "after"]),
    )
    config = tail_file_config(
        tmp_path,
        log,
        input_extra="    parser json\n    batch_size 1\n    buffer_chunk_size 1",
        filters="[FILTER]\n    name multiline\n    match app\n    multiline.parser python\n    flush_ms 60000",
        grace=3,
    )
    pipeline = Pipeline(load_config(config))
    runner = pipeline.runners[0]
    gate = asyncio.Event()
    real_write = runner.sink.write

    def has_traceback(batch: Batch) -> bool:
        return any("Traceback" in str(r.body.get("log")) for r in batch.records)

    async def gated(batch: Batch) -> None:
        if has_traceback(batch):
            await gate.wait()  # the joined message waits here
        await real_write(batch)

    runner.sink.write = gated  # type: ignore[method-assign]
    runner.sink.write_group = hold_from_first(runner.sink.write_group, gate, has_traceback)  # type: ignore[method-assign]
    task = asyncio.create_task(pipeline.run())

    def offset() -> int:
        return tail_offset(tmp_path / "tail.db")

    first_line = len(orjson.dumps({"log": "before"})) + 1
    await asyncio.sleep(1.0)  # every line read (one per batch), the joined message at the gate
    assert [r["log"] for r in written_json_lines(tmp_path / "out" / "out.jsonl")] == ["before"]
    # Past "before", not past the first line of the message that is not delivered yet.
    assert offset() == first_line
    gate.set()
    assert await asyncio.wait_for(task, 20) == 0
    assert [r["log"] for r in written_json_lines(tmp_path / "out" / "out.jsonl")] == [
        "before",
        "\n".join(PYTHON),
        "after",
    ]
    assert offset() == log.stat().st_size
