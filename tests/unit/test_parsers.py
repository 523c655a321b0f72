import calendar
import random

import pytest

from kubetrail.core.errors import ConfigError
from kubetrail.parsers.json_parser import JsonParser
from kubetrail.parsers.regex_parser import RegexParser
from kubetrail.parsers.registry import ParserRegistry
from kubetrail.parsers.timefmt import TimeParser
from tests.unit.helpers import section

BASE = calendar.timegm((2026, 11, 28, 12, 0, 0)) * 1_000_000_000


@pytest.mark.parametrize(
    ("fmt", "text", "expected"),
    [
        ("%Y-%m-%dT%H:%M:%S.%LZ", "2026-11-28T12:00:00.123456Z", BASE + 123_456_000),
        ("%Y-%m-%dT%H:%M:%S.%L%z", "2026-11-28T13:00:00.5+01:00", BASE + 500_000_000),
        ("%Y-%m-%dT%H:%M:%S.%L%z", "2026-11-28T12:00:00.123456789Z", BASE + 123_456_789),
        ("%d/%b/%Y:%H:%M:%S %z", "28/Nov/2026:07:00:00 -0500", BASE),
        ("%s", "1795867200", 1795867200 * 1_000_000_000),
        (None, "2026-11-28T12:00:00.000001Z", BASE + 1000),
        (None, "2026-11-28T14:00:00+02:00", BASE),
        (None, "1795867200.25", 1795867200_250_000_000),
    ],
)
def test_time_formats(fmt: str | None, text: str, expected: int) -> None:
    parser = TimeParser(fmt)
    assert parser.parse_ns(text) == expected
    assert parser.parse_ns(text) == expected  # second call goes through the cache


def test_time_offset_for_zoneless_times() -> None:
    assert TimeParser("%Y-%m-%d %H:%M:%S", offset_seconds=3600).parse_ns("2026-11-28 13:00:00") == BASE


def test_time_format_mismatch_and_bad_directive() -> None:
    with pytest.raises(ValueError, match="does not match"):
        TimeParser("%Y-%m-%d").parse_ns("yesterday")
    with pytest.raises(ValueError, match="unsupported"):
        TimeParser("%Q")


def test_json_parser_lazy_keeps_original_bytes() -> None:
    parser = JsonParser("audit", time_key="ts", time_keep=True)
    line = b'{"ts":"2026-11-28T12:00:00.5Z","a":{"b":[1,2]}}'
    records, failed = parser.parse_lines([line, b"not json", b"[1,2]", b'{"ts":"garbage"}'], "t")
    assert failed == 2
    assert records[0].raw is line and records[0].time_ns == BASE + 500_000_000
    assert records[0].body == {"ts": "2026-11-28T12:00:00.5Z", "a": {"b": [1, 2]}}
    assert records[1].body == {"log": "not json"} and records[2].body == {"log": "[1,2]"}
    assert records[3].body == {"ts": "garbage"}  # valid JSON, unparsable time: kept, time = now


def test_json_parser_time_keep_off_removes_key() -> None:
    parser = JsonParser("j", time_key="time", time_format="%Y-%m-%dT%H:%M:%S.%LZ")
    records, failed = parser.parse_lines([b'{"time":"2026-11-28T12:00:00.25Z","x":1}'], "t")
    assert failed == 0 and records[0].body == {"x": 1} and records[0].time_ns == BASE + 250_000_000
    assert records[0].json_bytes() == b'{"x":1}'


def test_regex_parser_with_types_and_time() -> None:
    parser = RegexParser(
        "r",
        r"^(?<time>[^ ]+) (?<code>\d+) (?<msg>.*)$",
        time_key="time",
        time_format="%Y-%m-%dT%H:%M:%S.%L%z",
        types={"code": "integer"},
    )
    records, failed = parser.parse_lines([b"2026-11-28T12:00:00.001Z 404 not found", b"nope"], "t")
    assert failed == 1
    assert records[0].body == {"code": 404, "msg": "not found"} and records[0].time_ns == BASE + 1_000_000
    assert records[1].body == {"log": "nope"}


def test_builtin_cri_parser() -> None:
    cri = ParserRegistry().get("cri")
    assert cri is not None
    records, _ = cri.parse_lines([b"2026-11-28T12:00:00.000000001Z stderr F hello world"], "t")
    assert records[0].body["stream"] == "stderr" and records[0].body["message"] == "hello world"
    assert records[0].time_ns == BASE + 1


def test_parser_sections_and_their_errors() -> None:
    registry = ParserRegistry()
    registry.add_section(section("parser", name="mine", format="regex", regex="^(?<a>.)", types="a:integer"))
    assert registry.get("mine") is not None
    with pytest.raises(ConfigError, match="needs a 'regex'"):
        registry.add_section(section("parser", name="x", format="regex"))
    with pytest.raises(ConfigError, match="unsupported time format"):
        registry.add_section(section("parser", name="x", format="json", time_format="%Q"))
    with pytest.raises(ConfigError, match="one of json, regex"):
        registry.add_section(section("parser", name="x", format="xml"))


def test_fast_path_stays_correct_across_seconds_and_shapes() -> None:
    parser = TimeParser("%Y-%m-%dT%H:%M:%S.%LZ")
    samples = [
        "2026-11-28T12:00:00.5Z",
        "2026-11-28T12:00:00.25Z",
        "2026-11-28T12:00:01.000001Z",
        "2026-11-28T12:00:01Z",
        "2026-11-28T12:00:00.123456789Z",
        "2026-11-28T12:00:00.1234567891Z",
    ]
    expected = [
        BASE + 500_000_000,
        BASE + 250_000_000,
        BASE + 1_000_001_000,
        BASE + 1_000_000_000,
        BASE + 123_456_789,
        BASE + 123_456_789,
    ]
    assert [parser.parse_ns(s) for s in samples] == expected
    auto = TimeParser()
    assert [auto.parse_ns(s) for s in samples] == expected
    with pytest.raises(ValueError):
        parser.parse_ns("2026-11-28T12:00:00.12xZ")


def test_json_rfc3339_fast_path_and_fallbacks() -> None:
    parser = JsonParser("a", time_key="ts", time_format="%Y-%m-%dT%H:%M:%S.%L%z", time_keep=True)
    lines = [b'{"ts":"2026-11-28T13:00:00.000001+01:00"}', b'{"ts":1795867200.5}', b'{"ts":"28/11/2026"}', b'{"x":1}']
    records, failed = parser.parse_lines(lines, "t")
    assert failed == 0
    assert records[0].time_ns == BASE + 1000 and records[1].time_ns == BASE + 500_000_000
    assert records[0].raw is lines[0] and records[1].raw == lines[1]
    assert records[2].body == {"ts": "28/11/2026"} and records[3].body == {"x": 1}
    zoneless = JsonParser("z", time_key="ts", time_keep=True, time_offset=3600)
    assert zoneless.parse_lines([b'{"ts":"2026-11-28T13:00:00"}'], "t")[0][0].time_ns == BASE


def test_native_newline_count_is_bytes_count() -> None:
    native = pytest.importorskip("kubetrail_native")
    rng = random.Random(5)
    blocks = [b"", b"\n", b"x", b"\n" * 1000, b"a\nb\r\nc"]
    blocks += [bytes(rng.choice(b"\n\r{}x\x00\xff") for _ in range(rng.randrange(1, 5000))) for _ in range(200)]
    for block in blocks:
        assert native.count_newlines(block) == block.count(b"\n")
    with pytest.raises(TypeError):
        native.count_newlines("text\n")  # bytes only, as the tail reads them
