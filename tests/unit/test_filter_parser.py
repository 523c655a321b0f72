"""The ``parser`` filter against Fluent Bit's documentation examples and
``filter_parser/filter_parser.c``."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from kubetrail.core.errors import ConfigError
from kubetrail.core.record import Record
from kubetrail.parsers.registry import ParserRegistry
from kubetrail.transforms.parser import ParserTransform
from tests.unit.helpers import build, section
from tests.unit.run_helpers import out_file_records, run_config, tail_to_out_file

DUMMY_REGEX = r"^(?<INT>[^ ]+) (?<FLOAT>[^ ]+) (?<BOOL>[^ ]+) (?<STRING>.+)$"
PARSED = {"INT": "100", "FLOAT": "0.5", "BOOL": "true", "STRING": "This is example"}
T0 = 1_700_000_000_000_000_000


def registry() -> ParserRegistry:
    parsers = ParserRegistry()
    parsers.add_section(section("parser", name="dummy_test", format="regex", regex=DUMMY_REGEX))
    parsers.add_section(
        section(
            "parser",
            name="timed",
            format="regex",
            regex=r"^(?<time>\d{4}-\S+) (?<msg>.*)$",
            time_key="time",
            time_format="%Y-%m-%dT%H:%M:%S.%L%z",
        )
    )
    parsers.add_section(section("parser", name="kv", format="logfmt"))
    return parsers


def run(body: dict[str, Any], time_ns: int = T0, **options: Any) -> Record:
    record = Record("t", time_ns, body)
    (out,) = build(ParserTransform, parsers=registry(), **options).process([record])
    return out


def test_docs_example_parse_a_field() -> None:
    # docs (filters/parser, "Getting started"): only the parsed keys remain.
    out = run({"data": "100 0.5 true This is example"}, key_name="data", parser="dummy_test")
    assert out.body == PARSED and out.time_ns == T0  # no time in the parser: the record keeps its own


def test_docs_example_reserve_data_and_preserve_key() -> None:
    body = {"data": "100 0.5 true This is example", "key1": "value1", "key2": "value2"}
    # docs ("Reserve_Data On"): the parsed keys, then the record's other keys.
    out = run(dict(body), key_name="data", parser="dummy_test", reserve_data="on")
    assert list(out.body.items()) == [*PARSED.items(), ("key1", "value1"), ("key2", "value2")]
    # Preserve_Key On keeps key_name among them.
    out = run(dict(body), key_name="data", parser="dummy_test", reserve_data="on", preserve_key="on")
    assert out.body == {**PARSED, **body}
    # filter_parser.c: without reserve_data, preserve_key has no effect.
    out = run(dict(body), key_name="data", parser="dummy_test", preserve_key="on")
    assert out.body == PARSED


def test_parsers_tried_in_order_and_time_replaced() -> None:
    options = {"key_name": "log", "parser": ["timed", "dummy_test"]}
    out = run({"log": "2026-02-11T09:31:18.250Z started"}, **options)
    assert out.body == {"msg": "started"}
    assert out.time_ns == int(datetime.fromisoformat("2026-02-11T09:31:18+00:00").timestamp()) * 10**9 + 250_000_000
    out = run({"log": "100 0.5 true This is example"}, **options)  # the first fails, the second matches
    assert out.body == PARSED and out.time_ns == T0


def test_records_left_alone() -> None:
    for body in ({"other": "x"}, {"data": 42}, {"data": {"a": 1}}, {"data": "no match"}):
        out = run(dict(body), key_name="data", parser="dummy_test")
        assert out.body == body and out.time_ns == T0


def test_clashing_key_keeps_the_records_value_with_reserve_data() -> None:
    # Fluent Bit writes the parsed keys, then the record's; outputs show the later one.
    out = run({"log": "level=warn msg=x", "level": "info"}, key_name="log", parser="kv", reserve_data="on")
    assert out.body == {"level": "info", "msg": "x"}


def test_lazy_records_parse_and_untouched_ones_keep_their_bytes() -> None:
    untouched = Record("t", T0, None, b'{"log":"no pairs here?"}')
    changed = Record("t", T0, None, b'{"log":"a=1 b=2","s":"x"}')
    build(ParserTransform, parsers=registry(), key_name="msg", parser="kv").process([untouched])
    assert untouched.raw is not None
    build(ParserTransform, parsers=registry(), key_name="log", parser="kv", reserve_data="on").process([changed])
    assert changed.raw is None and changed.body == {"a": "1", "b": "2", "s": "x"}


def test_bad_options_name_the_key() -> None:
    with pytest.raises(ConfigError, match="'key_name': required"):
        build(ParserTransform, parsers=registry(), parser="kv")
    with pytest.raises(ConfigError, match="'parser': the parser filter needs at least one"):
        build(ParserTransform, parsers=registry(), key_name="log")
    with pytest.raises(ConfigError, match="'parser': unknown parser 'nope'; defined: "):
        build(ParserTransform, parsers=registry(), key_name="log", parser=["kv", "nope"])
    with pytest.raises(ConfigError, match="'reserve_data': bad value 'maybe'"):
        build(ParserTransform, parsers=registry(), key_name="log", parser="kv", reserve_data="maybe")
    # Deprecated in Fluent Bit, accepted here.
    build(ParserTransform, parsers=registry(), key_name="log", parser="kv", unescape_key="on")


def test_classic_config_through_kubetrail_run(tmp_path: Path) -> None:
    # The usual Kubernetes use: a container log line whose "log" holds JSON or an nginx line.
    lines = [
        '{"log":"{\\"level\\":\\"info\\",\\"msg\\":\\"ready\\"}","stream":"stdout"}',
        '{"log":"10.0.0.1 - - [11/Feb/2026:09:31:18 +0000] \\"GET / HTTP/1.1\\" 200 615 \\"-\\" \\"curl\\"",'
        '"stream":"stdout"}',
        '{"log":"neither","stream":"stderr"}',
    ]
    parsers = (
        "[PARSER]\n    Name nginx\n    Format regex\n"
        '    Regex ^(?<remote>[^ ]*) (?<host>[^ ]*) (?<user>[^ ]*) \\[(?<time>[^\\]]*)\\] "(?<method>\\S+)'
        '(?: +(?<path>[^\\"]*?)(?: +\\S*)?)?" (?<code>[^ ]*) (?<size>[^ ]*)(?: "(?<referer>[^\\"]*)" '
        '"(?<agent>[^\\"]*)")?$\n'
        "    Time_Key time\n    Time_Format %d/%b/%Y:%H:%M:%S %z\n    Types code:integer size:integer\n"
        "[PARSER]\n    Name app_json\n    Format json\n"
    )
    config = tail_to_out_file(
        tmp_path,
        lines,
        """
[FILTER]
    Name          parser
    Match         app
    Key_Name      log
    Parser        app_json
    Parser        nginx
    Reserve_Data  On
""",
        parsers=parsers,
    )
    result = run_config(config)
    assert result.returncode == 0, result.stderr
    records = out_file_records(tmp_path / "out" / "out.txt")
    assert records[0][2] == {"level": "info", "msg": "ready", "stream": "stdout"}
    assert records[1][1] == int(datetime.fromisoformat("2026-02-11T09:31:18+00:00").timestamp()) * 10**9
    assert records[1][2] == {
        "remote": "10.0.0.1",
        "host": "-",
        "user": "-",
        "method": "GET",
        "path": "/",
        "code": 200,
        "size": 615,
        "referer": "-",
        "agent": "curl",
        "stream": "stdout",
    }
    assert records[2][2] == {"log": "neither", "stream": "stderr"}
