"""Output formats written natively from a block equal the Python path byte for byte (issue 18).

* ``file`` ``csv``/``ltsv``/``template`` by ``kubetrail_native.FieldsWriter`` against the
  Python formatters (``orjson.loads`` per line, ``FileSink._format_*``), on hand-picked and
  random lines: escapes, unicode (surrogate pairs too), nested values, missing keys, numbers,
  booleans, null, repeated keys, whitespace; the lines the writer leaves to Python (floats,
  integers beyond 64 bits, repeated keys) are named and spliced back in place.
* The ``json`` family (``stdout``, ``http``) from a block with ``frame_lines``: each format and
  date option equals the record path's bytes.
* ``stdout`` writing a block with ``writev`` into a real file equals what it writes into an
  in-memory stream (the encoded path), numbering continued across batches.
* The same three formats from the ``json`` parser's member spans (``LineMembers``, kept by its
  scan when the sink asks): the spans are each line's members (checked against orjson), and
  the text written from them equals the Python formatters and the writer's own walk, with the
  time key cut first, last, in the middle or absent, and lines whose time the scan left.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
from array import array
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubetrail.core.block import ReadyBlock
from kubetrail.core.component import ComponentContext
from kubetrail.core.metrics import MetricsRegistry
from kubetrail.core.options import resolve_options
from kubetrail.core.record import Batch, Record
from kubetrail.parsers import json_parser
from kubetrail.parsers.json_parser import JsonParser
from kubetrail.parsers.registry import ParserRegistry
from kubetrail.sinks import file as file_module
from kubetrail.sinks.file import FileSink
from kubetrail.sinks.json_format import encode_batch
from kubetrail.sinks.stdout import StdoutSink
from tests.unit.helpers import build, run_pipeline, section, tail_input

native = pytest.importorskip("kubetrail_native", reason="kubetrail_native is not built")

# Lines the native writer must write itself (no float, no wide integer, no repeated key).
NATIVE_LINES = [
    b'{"a":"x","n":1}',
    b"{}",
    b'{"s":"caf\\u00e9 \\"q\\" back\\\\slash \\/ tab\\t nl\\n cr\\r bs\\b ff\\f ctl\\u0001 del\x7f"}',
    '{"u":"é 😀 \u2028 日本","k\u00e9y":"v"}'.encode(),
    b'{"pair":"\\ud83d\\ude00","lower":"\\u00E9"}',
    b'{"nested":{"b":[1,-2,true,false,null,"s\\"",{"c":"\\u0001\\u001f\\n"}],"e":{}},"arr":[]}',
    b'  { "spaced" : [ 1 , { "x" : "y" } ] , "t" : true }  ',
    b'{"ints":[0,-1,9223372036854775807,-9223372036854775808,18446744073709551615]}',
    b'{"digits":{"a":999999999999999999,"b":-999999999999999999,"c":1000000000000000000}}',
    b'{"n":null,"t":true,"f":false,"i":-42}',
    b'{"delims":"a,b\\tc d:e=f","time":"their own time"}',
    b'{"quote":"\\"\\"","empty":""}',
    b'{"time":{"nested":1},"message":"m"}',
    b'{"esc\\"key":"v","k\\\\2":1}',
    b'{"deep":[[[[[[[[[[{"a":[[[]]]}]]]]]]]]]]}',
    # Escapes past the first 16 bytes of a nested string (the escaper skips clean 16-byte chunks).
    b'{"long":{"v":"0123456789abcdefghij\\"klmnopqrstuvwxyz0123456789\\n\\u0001 after \\\\ the chunks\\t"}}',
    # Nested values already written as orjson writes them (copied whole) beside ones that are
    # not (re-encoded): escapes orjson writes otherwise, spaces, the same key in other objects.
    b'{"c":{"s":"a\\"b\\\\c\\n\\u001f/\x7f","l":["x",{"k":[true,null]}],"n":-12}}',
    b'{"d":{"s":"\\u007f"},"e":["\\u0008\\u000a\\u000B\\u000b\\u0020"],"u":{"s":"\\u00e9\\/x"},"h":["\\u001F"],"w":{"k":1,"s":"\\ud83d\\ude00"}}',
    b'{"a":{"k":{"k":1},"j":{"k":2}},"b":[{"k":1},{"k":2,"j":[{"k":3}]}],"k":{"k":0}}',
    b'{"s":{ "k":1},"t":[1 ,2],"v":{"k" :1},"x":[1,2 ],"y":{"a":[]\t,"b":{}}}',
    b'{"q":["\\"\\"",{"\\"":"\\""}],"m":"0123456789abcdef0123456789abcdef\\"x"}',
]

# Lines it must leave to Python (and why), each spliced back where it belongs.
SLOW_LINES = [
    b'{"f":1.5}',  # a float: orjson's own repr
    b'{"a":1,"a":2}',  # a repeated key: orjson keeps the first place with the last value
    b'{"big":18446744073709551616}',  # beyond 64 bits: orjson reads a float
    b'{"neg":-9223372036854775809}',
    b'{"z":-0}',  # orjson reads 0
    b'{"e":1e5}',
    b'{"nested":{"x":[0.1]}}',
    b'{"nested":{"k":1,"j":2,"k":3}}',  # a key repeated inside a value: orjson keeps one
    b'{"arr":[{"a":1},{"b":2,"b":3}]}',
    b'{"deeper":[{"a":{"b":{"c":1,"c":2}}}]}',  # repeated in an object inside a compact value
    b'{"after":{"a":{"x":1},"b":[1,2.5]}}',  # a float after a compact member
]

TIMES = [1_795_867_200_001_800_000, 0, 5, 1_700_000_000_999_999_999, -1_500_000_000]

TEMPLATES = [
    "{time} {message}",
    "{a} {n} {missing} {time}",
    "[{s}] {u}{pair} {nested} {ints} {t}{f}{n} {delims}",
    "no placeholders",
    '{time}{time} {esc"key} {k\\2} {} {{a}} {a b}',
    "{f} {a} {big} {deep}",
    "{nested} {arr}",
]

FORMATS: list[dict[str, str]] = [
    {"format": "csv"},
    {"format": "csv", "delimiter": "tab"},
    {"format": "csv", "delimiter": "space"},
    {"format": "ltsv"},
    {"format": "ltsv", "delimiter": "comma", "label_delimiter": "="},
    {"format": "ltsv", "delimiter": "space", "label_delimiter": "=>"},
    *({"format": "template", "template": template} for template in TEMPLATES),
]


def sink(tmp_path: Path, **props: str) -> FileSink:
    return build(FileSink, path=str(tmp_path), **props)  # type: ignore[no-any-return]


def reference(s: FileSink, lines: list[bytes], times: list[int]) -> bytes:
    """The Python formatter, one decoded line at a time."""
    formatter = s._body_formatter
    assert formatter is not None
    return b"".join(formatter(t, orjson.loads(line)) for t, line in zip(times, lines, strict=True))


def native_text(s: FileSink, tmp_path: Path, lines: list[bytes], times: list[int]) -> bytes:
    """What the sink's worker writes for a block in this format (natively, Python for the
    lines the native writer leaves)."""
    path = tmp_path / "written"
    path.unlink(missing_ok=True)
    with path.open("ab") as handle:
        s._write_fields(handle, file_module._Fields(block_of(lines), times))
    return path.read_bytes()


def stops(s: FileSink, lines: list[bytes], times: list[int]) -> list[int]:
    """The lines the native writer leaves to Python."""
    found: list[int] = []
    first = 0
    with open(os.devnull, "wb") as null:
        block, packed = block_of(lines), file_module.times_bytes(times)
        while (stop := s._fields_writer.write(null.fileno(), block, packed, first)) is not None:
            found.append(stop)
            first = stop + 1
    return found


def times_for(n: int) -> list[int]:
    return [TIMES[i % len(TIMES)] + i for i in range(n)]


def block_of(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


@pytest.mark.parametrize("props", FORMATS, ids=lambda p: "-".join(p.values()))
def test_field_formats_from_native_equal_python(tmp_path: Path, props: dict[str, str]) -> None:
    s = sink(tmp_path, **props)
    assert s._fields_writer is not None
    lines = NATIVE_LINES
    times = times_for(len(lines))
    assert stops(s, lines, times) == []  # every one of these lines written natively
    assert native_text(s, tmp_path, lines, times) == reference(s, lines, times)


@pytest.mark.parametrize("props", FORMATS, ids=lambda p: "-".join(p.values()))
def test_lines_left_to_python_are_spliced_in_place(tmp_path: Path, props: dict[str, str]) -> None:
    s = sink(tmp_path, **props)
    lines: list[bytes] = []
    for i, odd in enumerate(SLOW_LINES):  # an odd line between native ones, and two in a row
        lines += [NATIVE_LINES[i % len(NATIVE_LINES)], odd]
    lines += [SLOW_LINES[0], SLOW_LINES[1]]
    times = times_for(len(lines))
    if props["format"] != "template":  # a template needs only some values (floats elsewhere do not matter)
        assert stops(s, lines, times) == [i for i, line in enumerate(lines) if line in SLOW_LINES]
    assert native_text(s, tmp_path, lines, times) == reference(s, lines, times)


def random_value(rnd: random.Random, depth: int = 0) -> Any:
    kind = rnd.randrange(9 if depth < 3 else 6)
    pool = ['"', "\\", "\n", "\t", "\x01", "\x1f", "\x7f", "é", "😀", "\u2028", ",", " ", ":", "=", "{", "}", "a", "Z"]
    if kind == 0:
        return "".join(rnd.choice(pool) for _ in range(rnd.randrange(8)))
    if kind == 1:
        return rnd.choice([0, 1, -1, 7, 2**63 - 1, -(2**63), 2**64 - 1, rnd.randrange(-(10**12), 10**12)])
    if kind == 2:
        return rnd.choice([True, False, None])
    if kind == 3:
        return rnd.choice([0.5, -1.25, 1e16, 3.0])  # floats: left to Python
    if kind in (4, 5):
        return "".join(rnd.choice("abc xyz-_/.") for _ in range(rnd.randrange(12)))
    if kind in (6, 7):
        return {random_key(rnd): random_value(rnd, depth + 1) for _ in range(rnd.randrange(4))}
    return [random_value(rnd, depth + 1) for _ in range(rnd.randrange(4))]


def random_key(rnd: random.Random) -> str:
    return rnd.choice(["a", "b", "time", "message", "k é", 'q"', "n\\", "log", "x"])


def random_line(rnd: random.Random) -> bytes:
    body = {random_key(rnd): random_value(rnd) for _ in range(rnd.randrange(6))}
    style = rnd.randrange(5)
    if style == 0:
        return orjson.dumps(body)
    if style == 1:  # ASCII escapes, surrogate pairs, spaces after separators
        return json.dumps(body, ensure_ascii=True).encode()
    if style == 2:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    text = orjson.dumps(body).decode()
    if style == 3:  # escapes orjson does not write: upper-case hex, an escaped slash
        return re.sub(r"\\u00([0-9a-f]{2})", lambda m: "\\u00" + m[1].upper(), text).replace("/", "\\/").encode()
    return text.replace(",", ", ", 1).encode()  # one space: in a string or between members


@pytest.mark.parametrize("props", FORMATS, ids=lambda p: "-".join(p.values()))
def test_random_lines_equal_python(tmp_path: Path, props: dict[str, str]) -> None:
    rnd = random.Random(18)
    s = sink(tmp_path, **props)
    lines = [random_line(rnd) for _ in range(600)]
    times = times_for(len(lines))
    assert len(stops(s, lines, times)) < len(lines) // 2  # most lines native: the writer is exercised
    assert native_text(s, tmp_path, lines, times) == reference(s, lines, times)


def test_without_the_native_writer_the_python_formatter_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_module, "FieldsWriter", None)
    s = sink(tmp_path, format="csv")
    assert s._fields_writer is None
    lines, times = NATIVE_LINES, times_for(len(NATIVE_LINES))
    assert s._fields_from_block(block_of(lines), times) == reference(s, lines, times)


def test_a_block_with_a_wrong_count_of_times_is_refused() -> None:
    writer = native.FieldsWriter(0)
    with open(os.devnull, "wb") as null, pytest.raises(ValueError, match="one time per line"):
        writer.write(null.fileno(), b'{"a":1}\n{"b":2}\n', file_module.times_bytes([1]), 0)


@pytest.mark.parametrize("fmt", ["csv", "ltsv", "template"])
def test_the_file_sink_writes_a_lazy_block_natively(tmp_path: Path, fmt: str) -> None:
    """Through the sink's own write (the worker thread's part): no record built, the same file
    as the records give, a float line included."""
    lines = [*NATIVE_LINES, SLOW_LINES[0], NATIVE_LINES[0]]
    times = times_for(len(lines))
    s = sink(tmp_path, format=fmt, template="{time} {a} {s}")

    def written(batch: Batch, name: str) -> bytes:
        s._write_sync(tmp_path / name, [s._data(batch)], batch)
        s._files.pop(tmp_path / name).close()
        return (tmp_path / name).read_bytes()

    lazy = block_batch(lines, times)
    from_block = written(lazy, "block")
    assert not lazy.is_materialized
    by_records = Batch("app.x", [Record("app.x", t, orjson.loads(line)) for t, line in zip(times, lines, strict=True)])
    assert from_block == written(by_records, "records")
    assert from_block.startswith(b"1795867200.001800000") or fmt == "ltsv"  # the first line's time


# --- the json family from a block (stdout, http) -------------------------------------------


def block_batch(lines: list[bytes], times: list[int], tag: str = "app.x") -> Batch:
    """A batch of a block that knows its lines' times (as a parser's block does)."""
    lazy = ReadyBlock(
        block_of(lines), len(lines), lambda: [Record(tag, t, None, line) for t, line in zip(times, lines, strict=True)]
    )
    lazy.times = array("q", times)
    return Batch(tag, None, block=lazy)


def records_batch(lines: list[bytes], times: list[int], tag: str = "app.x") -> Batch:
    return Batch(tag, [Record(tag, t, None, line) for t, line in zip(times, lines, strict=True)])


COMPACT = [line for line in NATIVE_LINES if not line.startswith(b" ")] + [b'{"f":1.5}']


@pytest.mark.parametrize("fmt", ["json", "json_lines", "json_stream"])
@pytest.mark.parametrize(("date_key", "date_format"), [(None, "double"), ("date", "double"), ('w"k', "epoch")])
def test_json_formats_from_a_block_equal_the_record_path(fmt: str, date_key: str | None, date_format: str) -> None:
    times = [1_795_867_200_123_456_789 + i * 1_000_003 for i in range(len(COMPACT))]
    block = block_batch(COMPACT, times)
    fast = encode_batch(block, fmt, date_key, date_format)
    assert not block.is_materialized  # framed from the block, no record built
    assert fast == encode_batch(records_batch(COMPACT, times), fmt, date_key, date_format)
    if fmt == "json":
        assert len(orjson.loads(fast)) == len(COMPACT)


def test_an_empty_block_is_an_empty_json_array() -> None:
    assert encode_batch(block_batch([], []), "json", None, "double") == b"[]\n"
    assert encode_batch(block_batch([], []), "json", "date", "double") == b"[]\n"


def stdout_sink(stream: Any, **props: str) -> StdoutSink:
    values = resolve_options(section("output", **props), StdoutSink.options, "stdout")
    ctx = ComponentContext(
        "stdout.0", MetricsRegistry().component("stdout.0", "sink", "stdout"), logging.getLogger("t"), ParserRegistry()
    )
    return StdoutSink(ctx, values, stream=stream)


@pytest.mark.parametrize(
    "props",
    [
        {"format": "msgpack"},
        {"format": "json_lines"},
        {"format": "json_lines", "json_date_format": "epoch", "json_date_key": "ts"},
        {"format": "json_lines", "json_date_format": "iso8601"},
        {"format": "json"},
    ],
    ids=lambda p: "-".join(p.values()),
)
async def test_stdout_by_writev_equals_the_encoded_stream(tmp_path: Path, props: dict[str, str]) -> None:
    times = [1_795_867_200_123_456_789 + i * 1_000_003 for i in range(len(COMPACT))]
    lines = COMPACT
    in_memory = io.BytesIO()
    expected_sink = stdout_sink(in_memory, **props)
    for _ in range(2):
        await expected_sink.write(records_batch(lines, times))
    with (tmp_path / "out").open("wb") as stream:
        s = stdout_sink(stream, **props)
        for _ in range(2):  # the second batch numbered after the first (msgpack)
            batch = block_batch(lines, times)
            await s.write(batch)
            # iso8601 dates are Python's to write (from records); the others come from the block.
            assert batch.is_materialized == (props.get("json_date_format") == "iso8601")
    assert (tmp_path / "out").read_bytes() == in_memory.getvalue()
    if props["format"] == "msgpack":
        assert in_memory.getvalue().splitlines()[len(lines)].startswith(b"[%d] app.x: [" % len(lines))


async def test_stdout_writes_what_it_buffered_before_the_block(tmp_path: Path) -> None:
    times = [1, 2]
    lines = [b'{"a":1}', b'{"b":2}']
    with (tmp_path / "out").open("wb") as stream:
        s = stdout_sink(stream, format="msgpack")
        stream.write(b"before\n")  # e.g. something else printed on stdout
        await s.write(block_batch(lines, times))
    assert (tmp_path / "out").read_bytes() == (
        b'before\n[0] app.x: [0.000000001, {"a":1}]\n[1] app.x: [0.000000002, {"b":2}]\n'
    )


def test_a_line_orjson_refuses_is_written_as_its_text(tmp_path: Path) -> None:
    """A lone surrogate: the native writer leaves the line and orjson refuses it, so its body
    is the line under ``log`` (``decode_body``) and the batch is written, in order."""
    s = sink(tmp_path, format="csv")
    target = tmp_path / "out.csv"
    lines = [b'{"a":2}', b'{"a":"\\ud800"}', b'{"a":3}']
    batch = block_batch(lines, [2, 3, 4])
    s._write_sync(target, [s._data(batch)], batch)
    assert target.read_bytes() == b'0.000000002,"2"\n0.000000003,"{""a"":""\\ud800""}"\n0.000000004,"3"\n'


def test_a_line_that_fails_to_format_leaves_nothing_of_the_batch(tmp_path: Path) -> None:
    """A line the Python formatter fails on, after the native writer wrote part of the batch:
    that part is cut, so a retry does not repeat it."""
    s = sink(tmp_path, format="csv")
    target = tmp_path / "out.csv"
    good = block_batch([b'{"a":1}'], [1])
    s._write_sync(target, [s._data(good)], good)
    before = target.read_bytes()
    formatter = s._body_formatter
    assert formatter is not None

    def failing(time_ns: int, body: dict[str, Any]) -> bytes:
        if body.get("a") == 2.5:
            raise ValueError("cannot format")
        return formatter(time_ns, body)

    s._body_formatter = failing
    lines = [b'{"a":2}', b'{"a":2.5}', b'{"a":3}']  # a float: the native writer leaves it to Python
    bad = block_batch(lines, [2, 3, 4])
    with pytest.raises(ValueError, match="cannot format"):
        s._write_sync(target, [s._data(bad)], bad)
    assert target.read_bytes() == before == b'0.000000001,"1"\n'


# --- csv, ltsv and template from the json parser's member spans ------------------------------

TS = b'"ts":"2026-11-28T12:00:00.001800Z"'
KEY_ESCAPED, VALUE_ESCAPED, COMPACT_VALUE = 1, 2, 4  # LineMembers flags


def with_time(line: bytes, where: int) -> bytes:
    """``line`` (an object) with the ``ts`` member put first (0), last (1), or not at all (2)."""
    if where == 2:
        return line
    at = line.index(b"{") + 1
    empty = line[at:].lstrip().startswith(b"}")
    if where == 0 or empty:
        return line[:at] + TS + (b"" if empty else b",") + line[at:]
    end = line.rindex(b"}")
    return line[:end] + b"," + TS + line[end:]


def random_timed_line(rnd: random.Random) -> bytes:
    """A random object with ``ts`` at a random place (the middle too), in one of several spellings."""
    body = {random_key(rnd): random_value(rnd) for _ in range(rnd.randrange(6))}
    items = list(body.items())
    if rnd.randrange(4):
        items.insert(rnd.randrange(len(items) + 1), ("ts", f"2026-11-28T12:00:00.{rnd.randrange(1000):03d}Z"))
    body = dict(items)
    style = rnd.randrange(3)
    if style == 0:
        return orjson.dumps(body)
    if style == 1:
        return json.dumps(body, ensure_ascii=True).encode()
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


PARSER = JsonParser("p", time_key="ts", time_format="%Y-%m-%dT%H:%M:%S.%LZ")


def timed_lines() -> list[bytes]:
    """Lines the parser keeps as a block. Those its scan refuses (a key written with escapes
    might spell the time key; the line-by-line path decides them) are left out."""
    lines = [with_time(line, i % 3) for i, line in enumerate(NATIVE_LINES + SLOW_LINES)]
    lines += [with_time(line, 1 - i % 2) for i, line in enumerate(NATIVE_LINES)]
    lines.append(b'{"a":"x","ts":"not a time","b":[1]}')  # a time the scan leaves: kept, not cut
    lines.append(b'{"ts":true,"m":{"k":"v"}}')  # not a string: the same
    rnd = random.Random(1805)
    lines += [random_timed_line(rnd) for _ in range(600)]
    kept = [line for line in lines if PARSER.line_block(line + b"\n", "t").data() is not None]  # type: ignore[union-attr]
    assert len(kept) > 300
    return kept


def scanned(lines: list[bytes], keep_members: bool = True) -> tuple[bytes, list[int], Any]:
    """The json parser's block of ``lines`` (time_key ts cut out): its bytes, times, members."""
    lazy = PARSER.line_block(block_of(lines), "t")
    assert lazy is not None
    lazy.keep_members = keep_members
    data = lazy.data()
    assert data is not None and lazy.times is not None
    return data, list(lazy.times), lazy.members


def has_float(value: Any) -> bool:
    if isinstance(value, dict):
        return any(has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(has_float(v) for v in value)
    return isinstance(value, float)


def test_members_are_each_lines_members() -> None:
    # Lines without a repeated top-level key (a dict has one of them, the spans both).
    lines = [line for line in timed_lines() if len(json.loads(line, object_pairs_hook=list)) == len(orjson.loads(line))]
    data, _, members = scanned(lines)
    out_lines = data.split(b"\n")[:-1]
    assert len(members) == len(out_lines) == len(lines)
    compact_seen = 0
    for index, line in enumerate(out_lines):
        body = orjson.loads(line)
        spans = members.line(index)
        assert [orjson.loads(line[a:b]) for a, b, _, _, _ in spans] == list(body)
        for (key, key_end, value, value_end, flags), name in zip(spans, body, strict=True):
            raw = line[value:value_end]
            assert orjson.loads(raw) == body[name]
            assert bool(flags & KEY_ESCAPED) == (b"\\" in line[key:key_end])
            assert bool(flags & VALUE_ESCAPED) == (raw.startswith(b'"') and b"\\" in raw)
            container = raw[:1] in (b"{", b"[")
            orjsons = container and orjson.dumps(orjson.loads(raw)) == raw
            if flags & COMPACT_VALUE:  # copied whole by the writer: must be orjson's own text
                assert orjsons
                compact_seen += 1
            else:  # and every container that is orjson's text (floats aside: the walk leaves them) is
                assert not orjsons or has_float(body[name])
    assert compact_seen > 100
    assert b'"ts":"2026' not in data and b'"ts":"not a time"' in data and b'"ts":true' in data


# Bytes that break JSON, or make it valid JSON only some decoders take.
MUTATIONS = [b'"', b"\\", b",", b"}", b"]", b"{", b"[", b":", b" ", b"\t", b"\x01", b"\xff", b"\xc3", b"e", b"-"]
MUTATIONS += [b".", b"0", b"1e999", b"1E+2", b"tru", b"nul", b"\\ud800", b"\\uDC00", b"\\u12", b"\\x", b",}", b"1" * 40]


def mutated(rnd: random.Random, line: bytes) -> bytes:
    for _ in range(rnd.randrange(1, 3)):
        at = rnd.randrange(len(line) + 1)
        op = rnd.randrange(3)
        if op == 0:
            line = line[:at] + rnd.choice(MUTATIONS) + line[at:]
        elif op == 1:
            line = line[:at] + line[at + 1 :]
        else:
            line = line[:at] + rnd.choice(MUTATIONS) + line[at + 1 :]
    return line


def test_the_scan_vouches_only_for_lines_msgspec_and_orjson_both_take() -> None:
    """With members, the scan checks each line as it walks it (``LineMembers.validated``) and
    the parser then skips msgspec's pass: it must never vouch for a line msgspec refuses (not
    JSON) or orjson refuses (a filter could not decode it), on lines broken at random."""
    rnd = random.Random(2026)
    scanner = PARSER._scanner
    lines = timed_lines() + [random_line(rnd) for _ in range(300)]
    vouched = refused = 0
    for _ in range(6000):
        line = rnd.choice(lines)
        if rnd.randrange(4):
            line = mutated(rnd, line)
        if not line or b"\n" in line:
            continue
        result = scanner.scan(line + b"\n", 0, members=True)  # never raises, whatever the line
        if result is None or not result[3].validated:
            refused += 1
            continue
        vouched += 1
        assert len(json_parser._VALID_ONLY.decode_lines(line + b"\n")) == 1, line
        assert isinstance(orjson.loads(line), dict), line
    assert vouched > 1500 and refused > 1500
    # One line it does not vouch for is enough for the block.
    good = [b'{"ts":"2026-11-28T12:00:00.001Z","a":[1,{"b":null}]}'] * 3
    assert scanner.scan(block_of(good), 0, members=True)[3].validated
    assert not scanner.scan(block_of([*good, b'{"a":[1.5]}']), 0, members=True)[3].validated


@pytest.mark.parametrize("nested_float", [False, True])
def test_msgspec_runs_only_for_a_block_the_scan_does_not_vouch_for(
    monkeypatch: pytest.MonkeyPatch, nested_float: bool
) -> None:
    calls: list[int] = []
    real = json_parser._VALID_ONLY

    class Counting:
        def decode_lines(self, data: bytes) -> Any:
            calls.append(len(data))
            return real.decode_lines(data)

    monkeypatch.setattr(json_parser, "_VALID_ONLY", Counting())
    lines = [b'{"ts":"2026-11-28T12:00:00.001Z","a":[1,{"b":"x"}],"n":2.5}'] * 10
    if nested_float:
        lines.append(b'{"ts":"2026-11-28T12:00:00.002Z","a":[1.5]}')
    _, times, members = scanned(lines)
    assert members is not None and len(times) == len(lines)
    assert len(calls) == int(nested_float)
    _, _, none = scanned(lines, keep_members=False)  # without members: msgspec, as ever
    assert none is None and len(calls) == 1 + int(nested_float)


def test_members_are_not_kept_unless_asked() -> None:
    assert scanned(NATIVE_LINES[:3], keep_members=False)[2] is None


@pytest.mark.parametrize("props", FORMATS, ids=lambda p: "-".join(p.values()))
def test_field_formats_from_members_equal_python(tmp_path: Path, props: dict[str, str]) -> None:
    s = sink(tmp_path, **props)
    data, times, members = scanned(timed_lines())
    out_lines = data.split(b"\n")[:-1]
    packed = file_module.times_bytes(times)

    def written(with_members: Any) -> tuple[bytes, list[int]]:
        path = tmp_path / "written"
        path.unlink(missing_ok=True)
        with path.open("ab") as handle:
            s._write_fields(handle, file_module._Fields(data, times, with_members))
        found, first = [], 0
        with open(os.devnull, "wb") as null:
            extra = () if with_members is None else (with_members,)
            while (stop := s._fields_writer.write(null.fileno(), data, packed, first, *extra)) is not None:
                found.append(stop)
                first = stop + 1
        return path.read_bytes(), found

    from_members, left = written(members)
    assert from_members == reference(s, out_lines, times)
    assert (from_members, left) == written(None)  # the same lines left to Python as by its own walk
    assert len(left) < len(out_lines) // 2


def test_members_of_another_block_are_refused() -> None:
    data, times, members = scanned(NATIVE_LINES[:3])
    writer = native.FieldsWriter(0)
    packed = file_module.times_bytes(times)
    with open(os.devnull, "wb") as null:
        assert writer.write(null.fileno(), data, packed, 0, members) is None
        with pytest.raises(ValueError, match="members of another block"):
            writer.write(null.fileno(), bytes(bytearray(data)), packed, 0, members)


@pytest.mark.parametrize("fmt", ["csv", "ltsv", "template"])
def test_the_file_sink_asks_the_parser_for_members(tmp_path: Path, fmt: str) -> None:
    """Through the sink: a parser's block gets ``keep_members`` before it is validated, and
    the file is the records' file; a block validated before the sink asked is written by the
    writer's own walk, the same bytes."""
    lines = timed_lines()[:60]
    parser = PARSER
    s = sink(tmp_path, format=fmt, template="{time} {a} {s} {nested}")

    def written(batch: Batch, name: str) -> tuple[bytes, Any]:
        data = s._data(batch)
        s._write_sync(tmp_path / name, [data], batch)
        s._files.pop(tmp_path / name).close()
        return (tmp_path / name).read_bytes(), data

    def by_records(batch: Batch, name: str) -> bytes:  # the same records (times of reading included), decoded
        return written(Batch("t", [Record("t", r.time_ns, r.body) for r in batch.records]), name)[0]

    lazy = Batch("t", None, block=parser.line_block(block_of(lines), "t"))
    text, data = written(lazy, "members")
    assert isinstance(data, file_module._Fields) and data.members is not None
    assert not lazy.is_materialized
    assert text == by_records(lazy, "records")
    early = parser.line_block(block_of(lines), "t")
    assert early is not None and early.data() is not None  # validated before any sink asked
    walked = Batch("t", None, block=early)
    text, data = written(walked, "walked")
    assert isinstance(data, file_module._Fields) and data.members is None
    assert text == by_records(walked, "records-walked")


@pytest.mark.parametrize("fmt", ["csv", "ltsv"])
async def test_through_tail_the_spans_reach_the_writer(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real pipeline (tail with the user's json parser -> file): every batch is written from
    the parser's member spans, and the file is what the Python formatter makes of each record."""
    base = 1_795_867_200 * 10**9  # 2026-11-28T12:00:00Z
    bodies: list[dict[str, Any]] = []
    lines: list[bytes] = []
    for i in range(3000):
        body: dict[str, Any] = {"kind": "Event", "auditID": f"id-{i}", "user": {"name": f'u"{i}', "groups": ["a", "b"]}}
        if i % 7 == 0:
            body["note"] = "tab\there é 😀"
        if i % 11 == 0:
            body["ratio"] = i / 8  # a float: that line is Python's
        bodies.append(body)
        stamp = f"2026-11-28T12:00:{i % 60:02d}.{i:06d}Z"
        lines.append(orjson.dumps({**body, "ts": stamp}) if i % 2 else orjson.dumps({"ts": stamp, **body}))
    log = tmp_path / "logs" / "app.log"
    log.parent.mkdir()
    log.write_bytes(b"".join(line + b"\n" for line in lines))
    conf = tmp_path / "p.conf"
    conf.write_text(
        "[PARSER]\n    name p\n    format json\n    time_key ts\n    time_format %Y-%m-%dT%H:%M:%S.%LZ\n"
        + tail_input(log, tag="app", parser="p")
        + f"[OUTPUT]\n    name file\n    match *\n    path {tmp_path}\n    file out.txt\n    format {fmt}\n"
    )
    spans: list[bool] = []
    write_fields = FileSink._write_fields

    def spying(self: FileSink, handle: Any, data: Any) -> None:
        spans.append(data.members is not None)
        write_fields(self, handle, data)

    monkeypatch.setattr(FileSink, "_write_fields", spying)
    await run_pipeline(conf)
    assert spans and all(spans)
    s = sink(tmp_path, format=fmt)
    times = [base + (i % 60) * 10**9 + i * 1000 for i in range(len(bodies))]
    expected = b"".join(s._body_formatter(t, body) for t, body in zip(times, bodies, strict=True))  # type: ignore[misc]
    assert (tmp_path / "out.txt").read_bytes() == expected
