"""Users' own parsers on the fast path (issue 18).

* Time formats compiled natively (``kubetrail_native.TimeFormat``) give what the reference
  (``kubetrail.parsers.timefmt.TimeParser``) gives, on every ``Time_Format`` of Fluent Bit's
  stock parsers.conf and more, with ``time_offset``.
* A ``[PARSER] format json`` with ``time_key``/``time_format``/``time_keep`` on a lazy block
  (validated and parsed natively, ``time_key`` cut from the bytes) gives the records its eager
  line-by-line parse gives, for well-formed and bad lines alike.
* Through a real tail pipeline: the output, bad times counted, never a line lost.
"""

from __future__ import annotations

import random
import re
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubetrail.core.config import load_config
from kubetrail.core.errors import ConfigError
from kubetrail.core.record import Batch
from kubetrail.parsers import json_parser
from kubetrail.parsers.json_parser import JsonParser
from kubetrail.parsers.registry import ParserRegistry
from kubetrail.parsers.timefmt import TimeParser
from kubetrail.runtime.pipeline import Pipeline
from tests.unit.helpers import section, tail_file_config, write

native = pytest.importorskip("kubetrail_native", reason="kubetrail_native is not built")

STOCK = Path(__file__).parent / "data" / "fluent-bit-parsers.conf"

EXTRA_FORMATS = [
    "%Y-%m-%dT%H:%M:%S%z",  # envoy, istio
    "%Y-%m-%dT%H:%M:%S.%LZ",
    "%Y-%m-%d %H:%M:%S,%L",
    "%Y-%m-%d %H:%M:%S.%L %z",
    "%s",
    "%s.%L",
    "%Y%m%d%H%M%S",
    "%a %b %e %H:%M:%S %Y",
    "%A, %d %B %Y %H:%M:%S",
    "%F %T",
    "%y-%m-%d %k:%M:%S",
    "%m/%d/%Y %I:%M:%S %p",
    "%Y %j %H:%M:%S",
    "[%d/%b/%Y:%H:%M:%S %z]",
    "%Y-%m-%dT%H:%M:%S.%N%z",
    "%Y-%m-%dT%H:%M:%S.%f",
    "%H:%M:%S %Z %Y-%m-%d",
    "%Y-%m-%d %H:%M:%S %%",
]


def stock_formats() -> list[str]:
    formats = re.findall(r"(?im)^\s*time_format\s+(.+?)\s*$", STOCK.read_text())
    assert len(formats) >= 10, "the stock parsers file should have its Time_Format lines"
    return sorted(set(formats))


def strftime_for(fmt: str, moment: datetime, digits: int) -> str:
    """``moment`` written in ``fmt`` the way a program would (``%L`` with ``digits`` digits)."""
    fraction = f"{moment.microsecond:06d}{moment.microsecond % 7:03d}"[:digits]
    text = fmt.replace("%L", fraction).replace("%N", fraction).replace("%f", fraction)
    text = text.replace("%s", str(int(moment.timestamp())))
    text = text.replace("%k", f"{moment.hour:2d}").replace("%e", f"{moment.day:2d}")
    return moment.strftime(text.replace("%%", "%%%%")).replace("%%", "%")


def samples(fmt: str, count: int = 60) -> list[str]:
    rnd = random.Random(fmt)
    zones = [UTC, datetime.now(UTC).astimezone().tzinfo, None]
    out: list[str] = []
    for i in range(count):
        moment = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rnd.randrange(0, 3 * 365 * 86400))
        moment = moment.replace(microsecond=rnd.randrange(0, 1_000_000))
        zone = zones[i % 3] or UTC
        if i % 5 == 4 and "%Z" not in fmt:  # %Z of a fixed offset would be "UTC+04:00"
            zone = timezone(timedelta(hours=rnd.randrange(-11, 13), minutes=rnd.choice([0, 30])))
        out.append(strftime_for(fmt, moment.astimezone(zone), rnd.choice([1, 3, 6, 9])))
        if i % 6 == 0:  # the next one in the same second (the cached prefix)
            out.append(strftime_for(fmt, moment.astimezone(zone) + timedelta(microseconds=17), 6))
    return out


def reference(fmt: str | None, offset: int, text: str) -> int | None:
    try:
        return TimeParser(fmt, offset).parse_ns(text)
    except (ValueError, TypeError, AttributeError):
        return None


@pytest.mark.parametrize("fmt", stock_formats() + EXTRA_FORMATS)
@pytest.mark.parametrize("offset", [0, 7200, -18000])
def test_native_time_formats_equal_the_reference(fmt: str, offset: int) -> None:
    compiled = native.TimeFormat(fmt, offset)
    texts = samples(fmt)
    for text in texts:
        expected = reference(fmt, offset, text)
        assert expected is not None, f"the reference refuses its own sample {text!r} for {fmt!r}"
        assert compiled.parse_ns(text) == expected, (fmt, text)
    # Text that is not in the format: neither takes it (the scan then leaves it to the reference).
    for bad in ("", "yesterday", "2026-13-45T99:99:99Z", "Foo 32 25:00:00"):
        if reference(fmt, offset, bad) is None:
            assert compiled.parse_ns(bad) is None, (fmt, bad)


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-28T12:00:00.001800Z",
        "2026-11-28T12:00:00Z",
        "2026-11-28t12:00:00.5z",
        "2026-11-28 12:00:00.123456789+02:00",
        "2026-11-28T12:00:00-0530",
        "2026-11-28T12:00:00",  # no zone: time_offset
        "2024-02-29T23:59:59.999Z",
    ],
)
@pytest.mark.parametrize("offset", [0, 3600])
def test_native_automatic_mode_equals_the_reference(text: str, offset: int) -> None:
    assert native.TimeFormat(None, offset).parse_ns(text) == TimeParser(None, offset).parse_ns(text)


@pytest.mark.parametrize("text", ["2025-02-29T00:00:00Z", "2026-11-28T24:00:00Z", "1700000000", "2026-11-28"])
def test_native_automatic_mode_leaves_the_rest_to_the_reference(text: str) -> None:
    assert native.TimeFormat(None, 0).parse_ns(text) is None


def test_an_unsupported_directive_is_refused_at_start_naming_it() -> None:
    with pytest.raises(ValueError, match="%Q"):
        native.TimeFormat("%Y-%Q")
    registry = ParserRegistry()
    with pytest.raises(ConfigError, match="%Q"):
        registry.add_section(section("parser", name="x", format="json", time_key="t", time_format="%Y %Q"))


# --- the json parser's lazy block against its eager parse ------------------------------------

LINES = [
    b'{"a":1,"t":"2026-11-28T12:00:00.001800Z","b":"x"}',
    b'{"t":"2026-11-28T12:00:01.5Z","a":[1,{"t":"nested"}]}',
    b'{"a":{"t":"nested, not the key"},"t":"2026-11-28T12:00:02Z"}',
    b'{ "a" : 1 , "t" : "2026-11-28T12:00:03.25Z" }',
    b'{"t":"2026-11-28T12:00:04.000000001Z"}',
    b'{"no_time":true}',
    b"{}",
    b'{"t":"yesterday","a":1}',  # not in the format: kept whole, time of reading, counted
    b'{"t":null}',
    b'{"a":"\\u00e9\\"}","t":"2026-11-28T12:00:05Z"}',
    # The key found by its quoted text (kubetrail_native's `locate`), walked from the nearer end:
    b'{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx","t":"2026-11-28T12:00:06Z","z":{"q":["]\\"}{",{"w":"\\\\"}],"n":-1.5e3},"e":[]}',
    b'{"a":"t","b":1}',  # the quoted text as a value, not a key
    b'{"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa":1,"b":"t"}',  # the same, from the end
    b'{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxx","a":{"t":"2026-11-28T12:00:07Z"}}',  # only nested
    b'{"a":{"t":"x"},"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}',  # only nested, from the start
    b'{"u":"a\\u0026b","t":"2026-11-28T12:00:08Z"}',  # an escape that cannot spell the key
    b'{"u":"\\u0074","t":"2026-11-28T12:00:09Z"}',  # one that can: the whole walk decides
    b'{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx","t":"2026-11-28T12:00:10Z","s":"ends with \\\\"}',
    b'{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx","t":"2026-11-28T12:00:11Z","n":12,"b":true,"z":null}',
    b'{ "pad" : "xxxxxxxxxxxxxxxxxxxxxxxxxxxxx" , "t" : "2026-11-28T12:00:12Z" , "n" : [ 1 , 2 ] }',
    b'{"s":"\\"t\\" quoted","pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx","t":"2026-11-28T12:00:13Z"}',
    b'{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx","t":"2026-11-28T12:00:14Z","z":1}\r',  # CRLF
    b'  {"a":{"b":[1,2,{"c":"]"}]},"t":"2026-11-28T12:00:15Z"}\t',  # whitespace around the object
]
ODD_LINES = [
    b'{"t":1764331200}',  # a number: the reference's epoch seconds
    b'{"t":"2026-11-28T12:00:06\\u002e5Z"}',  # an escape the scan does not decode
    b"not json at all",
    b"[1,2,3]",
    b'{"t":"2026-11-28T12:00:07Z","t":"2026-11-28T12:00:08Z"}',  # a repeated key
    b'{"\\u0074":"2026-11-28T12:00:09Z"}',  # the key written with an escape
    b'{"t":"2026-11-28T12:00:10Z","m":"caf\xe9"}',  # invalid UTF-8 in a string msgspec skips
    b'{"k\xff":1,"t":"2026-11-28T12:00:11Z"}',  # ... and in a key
    b'{"t":"2026-11-28T12:00:12Z","n":1e999}',  # a number msgspec reads and orjson refuses
]

PARSERS = {
    "keep off": {"time_key": "t", "time_format": "%Y-%m-%dT%H:%M:%S.%LZ"},
    "keep on": {"time_key": "t", "time_format": "%Y-%m-%dT%H:%M:%S.%LZ", "time_keep": True},
    "no format, keep off": {"time_key": "t"},
    "offset": {"time_key": "t", "time_format": "%Y-%m-%dT%H:%M:%S", "time_offset": 3600},
}


def lazy_records(parser: JsonParser, lines: list[bytes]) -> tuple[list[Any], bytes | None, int]:
    block = b"".join(line + b"\n" for line in lines)
    lazy = parser.line_block(block, "t")
    assert lazy is not None
    bad: list[int] = []
    lazy.report = lambda kind, count: bad.append(count)
    lazy.fallback = lambda: Batch("t", parser._parse_eager(lines, "t")[0])
    batch = Batch("t", None, block=lazy)
    raw = batch.raw_block
    return [(r.time_ns, r.body) for r in batch.records], raw, sum(bad)


def eager_records(parser: JsonParser, lines: list[bytes]) -> list[Any]:
    records, _ = parser._parse_eager(lines, "t")
    return [(r.time_ns, r.body) for r in records]


def without_read_times(records: list[Any], since: int) -> list[Any]:
    return [(None if t >= since else t, body) for t, body in records]


@pytest.mark.parametrize("name", PARSERS)
def test_a_lazy_block_gives_what_the_eager_parse_gives(name: str) -> None:
    parser = JsonParser("p", **PARSERS[name])  # type: ignore[arg-type]
    assert parser._scanner is not None or name == "keep on"
    since = time.time_ns()
    records, raw, bad = lazy_records(parser, LINES)
    # (The RFC 3339 path of time_keep on parses a block whose times are all RFC 3339; this one
    # has "yesterday" and null, so it goes line by line, with the same records.)
    assert raw is not None or name == "keep on", "well-formed lines stay one block"
    assert without_read_times(records, since) == without_read_times(eager_records(parser, LINES), since)
    if parser._scanner is not None:
        assert bad == 2  # "yesterday" and null


@pytest.mark.parametrize("name", PARSERS)
@pytest.mark.parametrize("odd", range(len(ODD_LINES)))
def test_a_block_with_an_odd_line_gives_what_the_eager_parse_gives(name: str, odd: int) -> None:
    parser = JsonParser("p", **PARSERS[name])  # type: ignore[arg-type]
    lines = [*LINES[:3], ODD_LINES[odd], *LINES[3:]]
    since = time.time_ns()
    records, _raw, _bad = lazy_records(parser, lines)
    expected = eager_records(parser, lines)
    assert without_read_times(records, since) == without_read_times(expected, since)
    assert len(records) == len(lines)  # nothing dropped


def _random_value(rng: random.Random, depth: int) -> Any:
    """JSON with what a backwards walk could trip on: quotes, backslashes, brackets in strings,
    a nested "t", and \\u escapes (orjson writes some control characters that way)."""
    texts = ['"t"', "t", "\\", 'a\\"', "]}{[", "\x01", "\u00e9", ",:", "x" * rng.randint(0, 40)]
    kind = rng.randrange(6 if depth < 3 else 3)
    if kind == 0:
        return "".join(rng.choice(texts) for _ in range(rng.randint(0, 3)))
    if kind == 1:
        return rng.choice([0, -12, 3.5, 1e21, True, False, None])
    if kind == 2:
        return "2026-11-28T12:00:00.5Z"
    if kind == 3:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["t", "a", "b\\", '"', "pad"]
    return {rng.choice(keys) + str(i % 2): _random_value(rng, depth + 1) for i in range(rng.randint(0, 3))} | (
        {"t": _random_value(rng, depth + 1)} if rng.random() < 0.3 else {}
    )


@pytest.mark.parametrize("name", ["keep off", "keep on"])
def test_random_lines_give_what_the_eager_parse_gives(name: str) -> None:
    """The scan finds the key by its quoted text and walks from the nearer end of the line; on
    lines with the key at every depth and place, and text that looks like JSON inside strings,
    it must give what decoding each line gives."""
    parser = JsonParser("p", **PARSERS[name])  # type: ignore[arg-type]
    rng = random.Random(18)
    for _ in range(300):
        lines = []
        for _ in range(8):
            body = {f"k{i}": _random_value(rng, 1) for i in range(rng.randint(0, 4))}
            if rng.random() < 0.7:  # a top-level key somewhere among the others
                items = list(body.items())
                items.insert(rng.randint(0, len(items)), ("t", f"2026-11-28T12:00:0{rng.randint(0, 9)}.25Z"))
                body = dict(items)
            lines.append(orjson.dumps(body))
        since = time.time_ns()
        records, _raw, _bad = lazy_records(parser, lines)
        assert without_read_times(records, since) == without_read_times(eager_records(parser, lines), since), lines


def test_time_keep_off_cuts_the_member_keeping_the_bytes_around_it() -> None:
    parser = JsonParser("p", time_key="t", time_format="%Y-%m-%dT%H:%M:%S.%LZ")
    _, raw, _ = lazy_records(parser, LINES[:5])
    assert raw == (b'{"a":1,"b":"x"}\n{"a":[1,{"t":"nested"}]}\n{"a":{"t":"nested, not the key"}}\n{ "a" : 1  }\n{}\n')


def test_a_block_is_not_rewritten_before_a_filter_may_take_it() -> None:
    parser = JsonParser("p", time_key="t", time_format="%Y-%m-%dT%H:%M:%S.%LZ")
    block = LINES[0] + b"\n"
    lazy = parser.line_block(block, "t")
    assert lazy is not None
    batch = Batch("t", None, block=lazy)
    assert batch.pending_block() is None  # its bytes change on validation: no one may take them early
    kept = JsonParser("k", time_key="t", time_format="%Y-%m-%dT%H:%M:%S.%LZ", time_keep=True).line_block(block, "t")
    assert kept is not None and Batch("t", None, block=kept).pending_block() == block


def test_block_times_need_no_records() -> None:
    parser = JsonParser("p", time_key="t", time_format="%Y-%m-%dT%H:%M:%S.%LZ")
    lazy = parser.line_block(LINES[0] + b"\n" + LINES[4] + b"\n", "t")
    assert lazy is not None
    batch = Batch("t", None, block=lazy)
    assert list(batch.block_times()) == [1_795_867_200_001_800_000, 1_795_867_204_000_000_001]
    assert not batch.is_materialized


def test_without_the_native_module_the_parser_decodes_each_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_parser, "JsonLinesScanner", None)
    parser = JsonParser("p", time_key="t", time_format="%Y-%m-%dT%H:%M:%S.%LZ")
    assert parser.line_block(LINES[0] + b"\n", "t") is None
    assert eager_records(parser, LINES[:1]) == [(1_795_867_200_001_800_000, {"a": 1, "b": "x"})]


# --- through a real tail pipeline ------------------------------------------------------------


async def test_a_user_json_parser_through_tail_and_file(tmp_path: Path) -> None:
    events = [
        {"kind": "Event", "auditID": f"id-{i}", "stageTimestamp": f"2026-11-28T12:00:{i % 60:02d}.{i:06d}Z", "n": i}
        for i in range(3000)
    ]
    lines = [orjson.dumps(e) for e in events]
    lines[1000] = b'{"kind":"Event","auditID":"bad-time","stageTimestamp":"not a time"}'
    lines[2000] = b"this line is not JSON"
    log = write(tmp_path / "logs" / "audit.log", "")
    log.write_bytes(b"".join(line + b"\n" for line in lines))
    parser = (
        "[PARSER]\n    name audit_time\n    format json\n    time_key stageTimestamp\n"
        "    time_format %Y-%m-%dT%H:%M:%S.%LZ\n"
    )
    conf = tail_file_config(tmp_path, log, tag="audit", input_extra="    parser audit_time\n", service_extra="")
    conf.write_text(parser + conf.read_text())
    pipeline = Pipeline(load_config(conf))
    assert await pipeline.run() == 0
    out = (tmp_path / "out" / "out.jsonl").read_bytes().splitlines()
    assert len(out) == len(lines)  # nothing lost
    for i, line in enumerate(out):
        body = orjson.loads(line)
        if i == 1000:
            assert body["stageTimestamp"] == "not a time"  # kept whole
        elif i == 2000:
            assert body == {"log": "this line is not JSON"}
        else:
            expected = dict(events[i])
            del expected["stageTimestamp"]
            assert body == expected
    bad = {
        sample.labels.get("kind"): sample.value
        for metric in pipeline.metrics.registry.collect()
        for sample in metric.samples
        if sample.name == "kubetrail_tail_bad_input_total"
    }
    assert bad.get("bad_time") == 1


async def through_grep_to_plain_and_csv(tmp_path: Path, lines: list[bytes]) -> tuple[list[bytes], list[str], Any]:
    """``lines`` tailed with a json parser (``t``), through grep (``exclude msg ^drop``), into
    plain JSON lines and csv: both outputs' lines, and the tail's bad input counts."""
    log = write(tmp_path / "logs" / "app.log", "")
    log.write_bytes(b"".join(line + b"\n" for line in lines))
    parser = "[PARSER]\n    name p\n    format json\n    time_key t\n    time_format %Y-%m-%dT%H:%M:%SZ\n"
    conf = tail_file_config(
        tmp_path,
        log,
        input_extra="    parser p\n",
        filters="[FILTER]\n    name grep\n    match *\n    exclude msg ^drop\n",
        output_extra=f"[OUTPUT]\n    name file\n    match *\n    path {tmp_path / 'out'}\n"
        "    file out.csv\n    format csv\n",
    )
    conf.write_text(parser + conf.read_text())
    pipeline = Pipeline(load_config(conf))
    assert await pipeline.run() == 0
    bad = {
        sample.labels.get("kind"): sample.value
        for metric in pipeline.metrics.registry.collect()
        for sample in metric.samples
        if sample.name == "kubetrail_tail_bad_input_total"
    }
    out = (tmp_path / "out" / "out.jsonl").read_bytes().splitlines()
    return out, (tmp_path / "out" / "out.csv").read_text().splitlines(), bad


def numbered(count: int) -> list[bytes]:
    return [orjson.dumps({"t": f"2026-11-28T12:00:{i:02}Z", "msg": f"line {i}"}) for i in range(count)]


def csv_messages(rows: list[str]) -> list[str]:
    return [row.split(",", 1)[1].strip('"') for row in rows]


async def test_invalid_utf8_in_a_json_line_is_repaired_counted_filtered_and_delivered(tmp_path: Path) -> None:
    """msgspec validates a block without checking the UTF-8 of what it skips, while a filter
    and the csv writer decode with orjson: such a line's batch was passed on unfiltered, and a
    csv output retried it forever. The line is repaired (U+FFFD) and counted."""
    lines = numbered(50)
    lines[10] = b'{"t":"2026-11-28T12:00:10Z","msg":"caf\xe9 \xff"}'
    lines[20] = b'{"t":"2026-11-28T12:00:20Z","msg":"drop me \xc3"}'
    out, csv, bad = await through_grep_to_plain_and_csv(tmp_path, lines)
    expected = [f"line {i}" for i in range(50) if i not in (10, 20)]
    expected.insert(10, "caf\ufffd \ufffd")
    assert [orjson.loads(line)["msg"] for line in out] == expected
    assert csv_messages(csv) == expected
    assert bad.get("invalid_utf8") == 2


async def test_a_number_beyond_a_double_is_kept_as_its_text_and_delivered(tmp_path: Path) -> None:
    """msgspec's validation reads numbers of any size; orjson refuses ``1e999``: the grep filter
    failed on the batch and a csv output retried it forever. A filter and the csv writer now
    read it as its text (``decode_json``); plain JSON lines keep the line's bytes."""
    lines = numbered(50)
    lines[30] = b'{"t":"2026-11-28T12:00:30Z","msg":"drop me","n":1e999}'
    lines[31] = b'{"t":"2026-11-28T12:00:31Z","msg":"huge","n":-1e999}'
    out, csv, _bad = await through_grep_to_plain_and_csv(tmp_path, lines)
    assert out[30] == b'{"msg":"huge","n":-1e999}'  # its bytes, as parsed (time_key cut); line 30 dropped
    assert [orjson.loads(line)["msg"] for line in out[:30] + out[31:]] == [
        f"line {i}" for i in range(50) if i < 30 or i > 31
    ]
    assert csv[30].split(",", 1)[1] == '"huge","-1e999"'
    assert csv_messages(csv[:30] + csv[31:]) == [f"line {i}" for i in range(50) if i < 30 or i > 31]


async def test_out_file_format_takes_the_times_from_the_block(tmp_path: Path) -> None:
    lines = [b'{"a":%d,"t":"2026-11-28T12:00:00.%06dZ"}' % (i, i) for i in range(500)]
    log = write(tmp_path / "logs" / "app.log", "")
    log.write_bytes(b"".join(line + b"\n" for line in lines))
    parser = "[PARSER]\n    name p\n    format json\n    time_key t\n    time_format %Y-%m-%dT%H:%M:%S.%LZ\n"
    conf = tail_file_config(tmp_path, log, input_extra="    parser p\n")
    conf.write_text(parser + conf.read_text().replace("format plain", "format out_file"))
    assert await Pipeline(load_config(conf)).run() == 0
    out = (tmp_path / "out" / "out.jsonl").read_bytes().splitlines()
    assert out == [b'app: [1795867200.%09d, {"a":%d}]' % (i * 1000, i) for i in range(500)]


# --- output formats from the block (item 4) ---------------------------------------------------


def block_batch(times: list[int]) -> Batch:
    """A lazy batch of JSON lines (compact, as most logs are) with these times."""
    lines = [b'{"i":%d,"s":"caf\\u00e9 \\"q\\""}' % i for i in range(len(times))] + [b"{}"]
    times = [*times, times[0]]
    block = b"".join(line + b"\n" for line in lines)
    from kubetrail.core.record import Record

    return Batch(
        "app.x",
        None,
        raw_block=block,
        count=len(lines),
        materialize=lambda: [Record("app.x", t, None, line) for t, line in zip(times, lines, strict=True)],
    )


TIMES = [1_795_867_200_001_800_000, 1_795_867_200_000_000_000, 1_700_000_000_999_999_999, 5, 1_234_567_890_123_456_789]


def records_only(batch: Batch) -> Batch:
    """The same records with no block (the per-record formatters' path)."""
    from kubetrail.core.record import Record

    return Batch(batch.tag, [Record(r.tag, r.time_ns, orjson.loads(r.raw or b"{}")) for r in batch.records])


@pytest.mark.parametrize("use_native", [True, False])
def test_out_file_and_msgpack_text_from_a_block_equal_the_record_formatters(
    monkeypatch: pytest.MonkeyPatch, use_native: bool
) -> None:
    from kubetrail.core.dates import epoch_text
    from kubetrail.sinks import json_format

    if not use_native:
        monkeypatch.setattr(json_format, "frame_lines", None)
    batch = block_batch(TIMES)
    block = batch.raw_block
    assert block is not None
    expected = b"".join(
        f"{r.tag}: [{epoch_text(r.time_ns)}, ".encode() + r.json_bytes() + b"]\n" for r in block_batch(TIMES).records
    )
    assert json_format.framed_lines(block, batch.block_times(), "app.x") == expected
    numbered = b"".join(b"[%d] " % (7 + n) + line + b"\n" for n, line in enumerate(expected.splitlines()))
    assert json_format.framed_lines(block, batch.block_times(), "app.x", 7) == numbered


@pytest.mark.parametrize("fmt", ["json", "json_lines", "json_stream"])
@pytest.mark.parametrize("date_format", ["double", "epoch", "iso8601"])
@pytest.mark.parametrize("date_key", ["date", 'we"ird', None])
def test_json_formats_with_a_date_from_a_block_equal_the_record_path(
    fmt: str, date_format: str, date_key: str | None
) -> None:
    from kubetrail.sinks.json_format import encode_batch

    fast = encode_batch(block_batch(TIMES), fmt, date_key, date_format)
    slow = encode_batch(records_only(block_batch(TIMES)), fmt, date_key, date_format)
    assert [orjson.loads(x) for x in fast.replace(b"}{", b"}\n{").splitlines()] == [
        orjson.loads(x) for x in slow.replace(b"}{", b"}\n{").splitlines()
    ]
    if date_key == "date" and date_format == "double":  # the double's text is orjson's, byte for byte
        for t in TIMES:
            assert b'"date":' + orjson.dumps(t / 1e9) + b"," in fast


# --- the regex parser's lazy block against its line-by-line parse (item 3) ---------------------

CRI_LINES = [
    b"2026-12-01T12:00:00.123456789Z stdout F hello world",
    b'2026-12-01T12:00:01.5Z stderr P caf\xc3\xa9 "quoted" \\ back\tslash \x01 ctl',
    b"2026-12-01T12:00:02Z stdout F ",  # an empty message
    b"not-a-time stdout F kept whole: the time is counted as bad",
    b"2026-12-01T12:00:03+02:00 stdout F an offset",
]


def regex_records(parser: Any, lines: list[bytes]) -> tuple[list[Any], bytes | None]:
    block = b"".join(line + b"\n" for line in lines)
    lazy = parser.line_block(block, "t")
    assert lazy is not None
    lazy.fallback = lambda: Batch("t", parser.parse_lines(lines, "t")[0])
    batch = Batch("t", None, block=lazy)
    raw = batch.raw_block
    return [(r.time_ns, r.body) for r in batch.records], raw


def regex_parser(regex: str, **options: Any) -> Any:
    from kubetrail.parsers.regex_parser import RegexParser

    return RegexParser("r", regex, **options)


CRI_REGEX = r"^(?<time>[^ ]+) (?<stream>stdout|stderr) (?<logtag>[^ ]*) ?(?<log>.*)$"
APACHE2 = (
    r'^(?<host>[^ ]*) [^ ]* (?<user>[^ ]*) \[(?<time>[^\]]*)\] "(?<method>\S+)(?: +(?<path>[^ ]*) +\S*)?" '
    r'(?<code>[^ ]*) (?<size>[^ ]*)(?: "(?<referer>[^\"]*)" "(?<agent>.*)")?$'
)
APACHE_LINES = [
    b'192.168.0.1 - - [28/Nov/2026:12:00:00 +0000] "GET /x HTTP/1.1" 200 512 "-" "curl/8"',
    b'10.0.0.2 - bob [28/Nov/2026:12:00:01 -0500] "POST /y HTTP/2" 201 0',  # no referer/agent
]


@pytest.mark.parametrize("skip_empty", [True, False])
@pytest.mark.parametrize("keep", [True, False])
def test_a_regex_block_gives_what_the_line_parse_gives(skip_empty: bool, keep: bool) -> None:
    for regex, fmt, lines in (
        (CRI_REGEX, "%Y-%m-%dT%H:%M:%S.%L%z", CRI_LINES),
        (APACHE2, "%d/%b/%Y:%H:%M:%S %z", APACHE_LINES),
    ):
        parser = regex_parser(regex, time_key="time", time_format=fmt, time_keep=keep, skip_empty_values=skip_empty)
        assert parser._scanner is not None
        since = time.time_ns()
        records, raw = regex_records(parser, lines)
        expected = [(r.time_ns, r.body) for r in parser.parse_lines(lines, "t")[0]]
        assert without_read_times(records, since) == without_read_times(expected, since)
        assert raw is not None and raw.count(b"\n") == len(lines)


def test_a_line_the_regex_does_not_match_sends_the_block_line_by_line() -> None:
    parser = regex_parser(CRI_REGEX, time_key="time", time_format="%Y-%m-%dT%H:%M:%S.%L%z")
    lines = [CRI_LINES[0], b"no", CRI_LINES[2]]
    records, raw = regex_records(parser, lines)
    assert raw is None and records[1][1] == {"log": "no"} and len(records) == 3


def test_a_pattern_rust_does_not_compile_stays_with_python_re() -> None:
    parser = regex_parser(r"^(?<a>\w+)(?=!)(?<b>.*)$")  # look-ahead
    assert parser._scanner is None and parser.line_block(b"x!y\n", "t") is None
    assert parser.parse_value("hi!there") == ({"a": "hi", "b": "!there"}, None)


async def test_a_rewritten_block_reaches_the_audit_filter_validated(tmp_path: Path) -> None:
    """time_keep off changes the block's bytes, so the kubernetes_audit filter is not offered
    the block before validation: it scans the cut lines, and their times come from the parser."""
    from tests.unit.test_audit_scan import base_event

    lines = [orjson.dumps(base_event(i, level="Metadata")) for i in range(200)]
    log = write(tmp_path / "logs" / "audit.log", "")
    log.write_bytes(b"".join(line + b"\n" for line in lines))
    parser = (
        "[PARSER]\n    name a\n    format json\n    time_key stageTimestamp\n    time_format %Y-%m-%dT%H:%M:%S.%LZ\n"
    )
    flt = "[FILTER]\n    name kubernetes_audit\n    match *\n    dedupe off\n"
    conf = tail_file_config(tmp_path, log, tag="audit", input_extra="    parser a\n", filters=flt)
    conf.write_text(parser + conf.read_text().replace("format plain", "format out_file"))
    assert await Pipeline(load_config(conf)).run() == 0
    out = (tmp_path / "out" / "out.jsonl").read_bytes().splitlines()
    assert len(out) == 200
    for i, line in enumerate(out):
        head, body = line.split(b", ", 1)
        assert head == b"audit: [1795867200.000002000"  # the event's stageTimestamp, from the parser
        record = orjson.loads(body[:-1])
        assert "stageTimestamp" not in record and record["k8s.audit.id"] == f"00000000-0000-0000-0000-{i:012d}"


@pytest.mark.parametrize("fmt", ["csv", "ltsv", "template", "out_file", "plain"])
def test_file_formats_from_a_block_equal_the_record_path(tmp_path: Path, fmt: str) -> None:
    from kubetrail.core.record import Record
    from kubetrail.sinks.file import FileSink
    from tests.unit.helpers import build

    parser = JsonParser("p", time_key="t", time_format="%Y-%m-%dT%H:%M:%S.%LZ")

    def lazy_batch() -> Batch:
        compact = [LINES[0], LINES[1], LINES[2], LINES[4]]  # written as orjson writes them
        block = b"".join(line + b"\n" for line in compact)
        lazy = parser.line_block(block, "app")
        assert lazy is not None
        return Batch("app", None, block=lazy)

    sink = build(FileSink, path=str(tmp_path), format=fmt, template="{time} {a} {b}")

    def written(batch: Batch, name: str) -> bytes:
        sink._write_sync(tmp_path / name, [sink._data(batch)], batch)  # the worker thread's part
        sink._files.pop(tmp_path / name).close()
        return (tmp_path / name).read_bytes()

    lazy = lazy_batch()
    from_block = written(lazy, "block")
    assert not lazy.is_materialized  # written without a Record per line
    by_records = Batch("app", [Record(r.tag, r.time_ns, dict(r.body)) for r in lazy_batch().records])
    assert from_block == written(by_records, "records")


def test_native_parsers_may_be_used_and_dropped_on_other_threads() -> None:
    """Parsers are built with the config and used by inputs that may run in threads of their
    own (``threaded on``), so the native objects they hold must not be tied to one thread."""
    import threading

    from kubetrail.parsers.regex_parser import RegexParser

    holders: list[Any] = [
        JsonParser("j", time_key="t", time_format="%Y-%m-%dT%H:%M:%S.%LZ"),
        RegexParser("r", CRI_REGEX, time_key="time", time_format="%Y-%m-%dT%H:%M:%S.%L%z"),
        native.TimeFormat("%Y-%m-%dT%H:%M:%S.%LZ"),
    ]
    errors: list[BaseException] = []

    def use_and_drop() -> None:
        try:
            assert holders[0].line_block(LINES[0] + b"\n", "t").data() is not None
            assert holders[1].line_block(CRI_LINES[0] + b"\n", "t").data() is not None
            assert holders[2].parse_ns("2026-11-28T12:00:00.5Z") == 1_795_867_200_500_000_000
            holders.clear()  # the last references go away on this thread
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=use_and_drop)
    thread.start()
    thread.join()
    assert not errors and not holders
