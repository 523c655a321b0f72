"""Parser formats logfmt, ltsv (and tskv), the field decoders, and Fluent Bit's stock parsers file.

Expected values come from Fluent Bit's parser sources (``src/flb_parser_logfmt.c``,
``src/flb_parser_ltsv.c``, ``src/flb_parser_decoder.c``), its documentation pages for the
logfmt/ltsv parsers and decoders, and its runtime tests (``tests/internal/parser_logfmt.c``,
``parser_ltsv.c``), as noted on each test.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kubetrail.core.config import load_config
from kubetrail.core.errors import ConfigError
from kubetrail.parsers.decoders import FieldDecoders, unescape, unescape_utf8
from kubetrail.parsers.logfmt_parser import LogfmtParser
from kubetrail.parsers.ltsv_parser import LtsvParser
from kubetrail.parsers.registry import ParserRegistry
from tests.unit.helpers import section, write
from tests.unit.run_helpers import out_file_records, run_config

DATA = Path(__file__).parent / "data"
STOCK = DATA / "fluent-bit-parsers.conf"


def ns(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp()) * 1_000_000_000


# --- logfmt ---------------------------------------------------------------------------------


def test_logfmt_pairs_quotes_and_bare_keys() -> None:
    # flb_parser_logfmt.c: a bare key and "key=" pack true, key="" packs "", quoted values are
    # unescaped, anything that is not an ident byte between pairs is skipped.
    parser = LogfmtParser("l")
    body, time_ns = parser.parse_value('key=val  quoted="a \\"b\\" c" bare empty= blank="" ,odd=1') or ({}, 0)
    assert body == {"key": "val", "quoted": 'a "b" c', "bare": True, "empty": True, "blank": "", ",odd": "1"}
    assert time_ns is None  # no time_format: no time read, the record keeps its own


def test_logfmt_docs_example_with_time_and_types() -> None:
    # Fluent Bit docs (parsers/logfmt): key1=val1 key2=val2 key3=val3 ... and the time key.
    parser = LogfmtParser("l", time_format="%Y-%m-%dT%H:%M:%S%z", types={"n": "integer", "ok": "bool"})
    body, time_ns = parser.parse_value("time=2020-07-01T12:00:00+0200 level=info n=42 ok=true msg=started") or ({}, 0)
    assert body == {"level": "info", "n": 42, "ok": True, "msg": "started"}
    assert time_ns == ns("2020-07-01T10:00:00+00:00")
    kept = LogfmtParser("l", time_key="ts", time_format="%s", time_keep=True)
    assert kept.parse_value("ts=1600000000 a=b") == ({"ts": "1600000000", "a": "b"}, 1_600_000_000 * 10**9)


def test_logfmt_failures() -> None:
    parser = LogfmtParser("l", time_format="%Y-%m-%d")
    assert parser.parse_value('  = "" ') is None  # no key at all
    assert parser.parse_value("time=yesterday a=1") is None  # a time not in time_format fails the line
    assert parser.parse_value("time a=1") == ({"time": True, "a": "1"}, None)  # a bare time key is a key
    strict = LogfmtParser("l", no_bare_keys=True)
    assert strict.parse_value("a=1 b") is None  # logfmt_no_bare_keys
    assert strict.parse_value("a=1 b=2") == ({"a": "1", "b": "2"}, None)
    # Only the first line is read.
    assert parser.parse_value("a=1\nb=2") == ({"a": "1"}, None)


def test_logfmt_escapes_in_quoted_values() -> None:
    parser = LogfmtParser("l")
    body, _ = parser.parse_value(r'm="tab\there caf\u00e9 back\\slash" u="unterminated') or ({}, 0)
    assert body == {"m": "tab\there café back\\slash", "u": "unterminated"}


def test_logfmt_parse_lines_keeps_unparsed_lines() -> None:
    parser = LogfmtParser("l")
    records, failed = parser.parse_lines([b"a=1", b"   "], "t")
    assert failed == 1 and records[0].body == {"a": "1"} and records[1].body == {"log": "   "}


# --- ltsv -----------------------------------------------------------------------------------


def test_ltsv_docs_example() -> None:
    # Fluent Bit docs (parsers/ltsv): an access log line; values keep spaces and colons.
    parser = LtsvParser(
        "access",
        time_key="time",
        time_format="[%d/%b/%Y:%H:%M:%S %z]",
        types={"status": "integer", "size": "integer", "reqtime": "float"},
    )
    line = (
        "host:127.0.0.1\tident:-\tuser:-\ttime:[10/Jul/2018:13:27:05 +0200]\treq:GET / HTTP/1.1\t"
        "status:200\tsize:16218\treferer:http://127.0.0.1/\tua:Mozilla/5.0\treqtime:0.000\tupsttime:-"
    )
    body, time_ns = parser.parse_value(line) or ({}, 0)
    assert body == {
        "host": "127.0.0.1",
        "ident": "-",
        "user": "-",
        "req": "GET / HTTP/1.1",
        "status": 200,
        "size": 16218,
        "referer": "http://127.0.0.1/",
        "ua": "Mozilla/5.0",
        "reqtime": 0.0,
        "upsttime": "-",
    }
    assert time_ns == ns("2018-07-10T11:27:05+00:00")


def test_ltsv_edge_cases() -> None:
    parser = LtsvParser("l")
    # flb_parser_ltsv.c: reading stops at a label not followed by ':' (what was read is kept),
    # a field without a label is skipped, an empty value is "".
    assert parser.parse_value("a:1\tb c:2") == ({"a": "1"}, None)
    assert parser.parse_value(":x\ta:\tb:y") == ({"a": "", "b": "y"}, None)
    assert parser.parse_value("no label here") is None
    assert parser.parse_value("a:1\r\nb:2") == ({"a": "1"}, None)
    tskv = LtsvParser("t", separator="=")
    assert tskv.parse_value("tskv\ta=1\tb=x y=z") == ({"a": "1", "b": "x y=z"}, None)


# --- decoders -------------------------------------------------------------------------------


def test_unescape_functions() -> None:
    # unescape_string(): C escapes become characters, any other escaped character loses its
    # backslash. unescape_string_utf8(): \u, \x, octal; a backslash before " ' \ / is kept.
    assert unescape(r"a\nb\"c\\d\q") == 'a\nb"c\\dq'
    assert unescape_utf8(r"caf\u00e9 \x41\101 \"q\" \U0001F600 \ud83d\ude00 \ud800") == 'café AA \\"q\\" 😀 😀 \ufffd'
    assert unescape_utf8("plain") == "plain"


def test_decode_field_as_chain_as_in_stock_docker_parser() -> None:
    # Fluent Bit's stock docker parser: escaped_utf8 with do_next, then escaped.
    decoders = FieldDecoders()
    decoders.add("escaped_utf8 log do_next", as_value=True)
    decoders.add("escaped log", as_value=True)
    body = {"log": r"caf\u00e9 said \"hi\"", "stream": "stdout"}
    decoders.apply(body)
    assert body == {"log": 'café said "hi"', "stream": "stdout"}


def test_decode_field_json_adds_keys_and_as_replaces() -> None:
    # Decode_Field json: the object's keys are appended to the record, the field stays.
    adds = FieldDecoders()
    adds.add("json log", as_value=False)
    body: dict[str, object] = {"log": '{"level":"warn","n":1}', "stream": "stdout"}
    adds.apply(body)
    assert body == {"log": '{"level":"warn","n":1}', "stream": "stdout", "level": "warn", "n": 1}
    # Decode_Field_As json: the field becomes the object; escaped JSON is unescaped first.
    replaces = FieldDecoders()
    replaces.add("json log", as_value=True)
    body = {"log": '{\\"a\\":[1,2]}'}
    replaces.apply(body)
    assert body == {"log": {"a": [1, 2]}}
    # A "\n" in the JSON's strings became a line break when unescaped; it is still read.
    body = {"log": '{"msg":"line1\\nline2"}\n'}
    replaces.apply(body)
    assert body == {"log": {"msg": "line1\nline2"}}
    # Not a JSON object (array, text, leading space): the value stays as it was.
    for text in ("[1,2]", "plain", ' {"a":1}'):
        body = {"log": text}
        replaces.apply(body)
        assert body == {"log": text}
    # Non-string values are not decoded.
    body = {"log": 5}
    replaces.apply(body)
    assert body == {"log": 5}


def test_decoder_actions() -> None:
    # No action: stop after the first rule even when it failed; try_next: go on when it failed.
    stop = FieldDecoders()
    stop.add("json log", as_value=True)
    stop.add("escaped log", as_value=True)
    body = {"log": r"not json \n"}
    stop.apply(body)
    assert body == {"log": r"not json \n"}
    try_next = FieldDecoders()
    try_next.add("json log try_next", as_value=True)
    try_next.add("escaped log", as_value=True)
    body = {"log": r"not json \n"}
    try_next.apply(body)
    assert body == {"log": "not json \n"}
    # Once the value is an object no later rule runs on it.
    done = FieldDecoders()
    done.add("json log do_next", as_value=True)
    done.add("escaped log", as_value=True)
    body = {"log": '{"a":"x\\\\ny"}'}
    done.apply(body)
    assert body == {"log": {"a": "x\ny"}}


def test_decoders_on_every_format_through_parser_sections() -> None:
    registry = ParserRegistry()
    registry.add_section(section("parser", name="lf", format="logfmt", decode_field_as="escaped msg"))
    registry.add_section(section("parser", name="lt", format="ltsv", decode_field="json payload"))
    registry.add_section(
        section("parser", name="rx", format="regex", regex="^(?<msg>.*)$", decode_field_as="escaped_utf8 msg")
    )
    registry.add_section(section("parser", name="js", format="json", decode_field_as="json inner"))
    assert registry.get("lf").parse_value('msg="a\\\\tb"') == ({"msg": "a\tb"}, None)
    assert registry.get("lt").parse_value('payload:{"k":"v"}') == ({"payload": '{"k":"v"}', "k": "v"}, None)
    assert registry.get("rx").parse_value(r"caf\u00e9") == ({"msg": "café"}, None)
    json_parser = registry.get("js")
    assert json_parser.parse_value('{"inner":"{\\"a\\":1}"}') == ({"inner": {"a": 1}}, None)
    records, failed = json_parser.parse_lines([b'{"inner":"{\\"a\\":1}"}'], "t")
    assert failed == 0 and records[0].body == {"inner": {"a": 1}} and records[0].raw is None


def test_parser_section_errors_name_the_key() -> None:
    registry = ParserRegistry()
    with pytest.raises(ConfigError, match=r"'decode_field_as'.*unknown decoder 'base64'"):
        registry.add_section(section("parser", name="x", format="json", decode_field_as="base64 log"))
    with pytest.raises(ConfigError, match=r"'decode_field'.*DECODER FIELD"):
        registry.add_section(section("parser", name="x", format="json", decode_field="json"))
    with pytest.raises(ConfigError, match=r"'decode_field'.*unknown action 'do_nxt'"):
        registry.add_section(section("parser", name="x", format="json", decode_field="json log do_nxt"))
    with pytest.raises(ConfigError, match="'format'"):
        registry.add_section(section("parser", name="x", format="csv"))
    with pytest.raises(ConfigError, match="unsupported time format"):
        registry.add_section(section("parser", name="x", format="logfmt", time_format="%Q"))


# --- Fluent Bit's stock parsers.conf ----------------------------------------------------------

# One sample line per parser of the stock file and what Fluent Bit makes of it (the regexes'
# named groups; times per the Time_Format, UTC unless the line has a zone).
STOCK_SAMPLES: dict[str, tuple[str, dict[str, object], str | None]] = {
    "apache": (
        '192.168.2.20 - - [29/Jul/2015:10:27:10 -0300] "GET /cgi-bin/try/ HTTP/1.0" 200 3395',
        {"host": "192.168.2.20", "user": "-", "method": "GET", "path": "/cgi-bin/try/", "code": "200", "size": "3395"},
        "2015-07-29T13:27:10+00:00",
    ),
    "apache2": (
        '192.168.2.20 - frank [29/Jul/2015:10:27:10 -0300] "GET /a.gif HTTP/1.0" 200 2326 "http://x/" "Mozilla/4.08"',
        {
            "host": "192.168.2.20",
            "user": "frank",
            "method": "GET",
            "path": "/a.gif",
            "code": "200",
            "size": "2326",
            "referer": "http://x/",
            "agent": "Mozilla/4.08",
        },
        "2015-07-29T13:27:10+00:00",
    ),
    "apache_error": (
        "[Wed Oct 11 14:32:52 2000] [error] [client 127.0.0.1] client denied by server configuration",
        {
            "time": "Oct 11 14:32:52 2000",
            "level": "error",
            "client": "127.0.0.1",
            "message": "client denied by server configuration",
        },
        None,  # no Time_Key: the record keeps its own time
    ),
    "nginx": (
        '172.17.0.1 - - [11/Feb/2026:09:31:18 +0000] "GET /index.html HTTP/1.1" 200 615 "-" "curl/8.5.0"',
        {
            "remote": "172.17.0.1",
            "host": "-",
            "user": "-",
            "method": "GET",
            "path": "/index.html",
            "code": "200",
            "size": "615",
            "referer": "-",
            "agent": "curl/8.5.0",
        },
        "2026-02-11T09:31:18+00:00",
    ),
    "k8s-nginx-ingress": (
        '10.0.0.1 - [10.0.0.1] - - [11/Feb/2026:09:31:18 +0100] "GET /api HTTP/1.1" 200 12 "-" "curl/8.5.0" '
        "75 0.003 [default-api-80] 10.1.2.3:8080 12 0.004 200 abc123",
        {
            "host": "10.0.0.1",
            "real_ip": "10.0.0.1",
            "user": "-",
            "method": "GET",
            "path": "/api",
            "code": "200",
            "size": "12",
            "referer": "-",
            "agent": "curl/8.5.0",
            "request_length": "75",
            "request_time": "0.003",
            "proxy_upstream_name": "default-api-80",
            "upstream_addr": "10.1.2.3:8080",
            "upstream_response_length": "12",
            "upstream_response_time": "0.004",
            "upstream_status": "200",
            "last": "abc123",
        },
        "2026-02-11T08:31:18+00:00",
    ),
    "json": ('{"time":"11/Feb/2026:09:31:18 +0000","msg":"hi"}', {"msg": "hi"}, "2026-02-11T09:31:18+00:00"),
    "docker": (
        '{"log":"caf\\\\u00e9 \\\\\\"quoted\\\\\\"\\n","stream":"stdout","time":"2026-02-11T09:31:18.5Z"}',
        {"log": 'café "quoted"\n', "stream": "stdout", "time": "2026-02-11T09:31:18.5Z"},
        "2026-02-11T09:31:18.5+00:00",
    ),
    "docker-daemon": (
        'time="2026-02-11T09:31:18.25Z" level=info msg="Loading containers: start."',
        {"time": "2026-02-11T09:31:18.25Z", "level": "info", "msg": "Loading containers: start."},
        "2026-02-11T09:31:18.25+00:00",
    ),
    "syslog-rfc5424": (
        '<165>1 2026-02-11T09:31:18.003Z host.example.com evntslog - ID47 [exampleSDID@32473 iut="3"] An event',
        {
            "pri": "165",
            "time": "2026-02-11T09:31:18.003Z",
            "host": "host.example.com",
            "ident": "evntslog",
            "pid": "-",
            "msgid": "ID47",
            "extradata": '[exampleSDID@32473 iut="3"]',
            "message": "An event",
        },
        "2026-02-11T09:31:18.003+00:00",
    ),
    "syslog-rfc3164-local": (
        "<13>Feb 11 09:31:18 sshd[1234]: Accepted publickey for root",
        {
            "pri": "13",
            "time": "Feb 11 09:31:18",
            "ident": "sshd",
            "pid": "1234",
            "message": "Accepted publickey for root",
        },
        "YEAR-02-11T09:31:18+00:00",
    ),
    "syslog-rfc3164": (
        "<34>Feb 11 09:31:18 mymachine su: su root failed for lonvick",
        {
            "pri": "34",
            "time": "Feb 11 09:31:18",
            "host": "mymachine",
            "ident": "su",
            "message": "su root failed for lonvick",
        },
        "YEAR-02-11T09:31:18+00:00",  # the first of its two Time_Format lines
    ),
    "mongodb": (
        "2026-02-11T09:31:18.123+0000 I NETWORK  [initandlisten] waiting for connections on port 27017 12ms",
        {
            "time": "2026-02-11T09:31:18.123+0000",
            "severity": "I",
            "component": "NETWORK",
            "context": "initandlisten",
            "message": "waiting for connections on port 27017",
            "ms": "12",
        },
        "2026-02-11T09:31:18.123+00:00",
    ),
    "cri": (
        "2026-02-11T09:31:18.123456789+01:00 stdout F hello world",
        {"stream": "stdout", "logtag": "F", "message": "hello world"},
        "2026-02-11T08:31:18.123456789+00:00",
    ),
    "kube-custom": (
        "kube.web-6d4cf56db6-x2x9z_default_nginx-" + "a" * 64 + ".log",
        {
            "tag": "kube",
            "pod_name": "web-6d4cf56db6-x2x9z",
            "namespace_name": "default",
            "container_name": "nginx",
            "docker_id": "a" * 64,
        },
        None,
    ),
    "filter-kube-test": (
        "kube.web_default_app-" + "b" * 64 + ".log",
        {"tag": "kube", "pod_name": "web", "namespace_name": "default", "container_name": "app", "docker_id": "b" * 64},
        None,
    ),
}


def _expected_ns(text: str) -> int:
    text = text.replace("YEAR", str(datetime.now(UTC).year))
    base, _, rest = text.partition(".")
    if not rest:
        return ns(text)
    fraction, zone = rest[: rest.index("+")], rest[rest.index("+") :]
    return ns(base + zone) + int(fraction.ljust(9, "0"))


def test_stock_parsers_file_parses_a_sample_for_every_parser() -> None:
    config = load_config(DATA / "stock-pipeline.conf")
    registry = ParserRegistry()
    for parser_section in config.parsers:
        registry.add_section(parser_section)
    names = {s.get("name") for s in config.parsers}
    assert names == set(STOCK_SAMPLES)  # every parser of the stock file has a sample here
    for name, (line, body, when) in STOCK_SAMPLES.items():
        parser = registry.get(name)
        assert parser is not None
        parsed = parser.parse_value(line)
        assert parsed is not None, name
        assert parsed[0] == body, name
        assert parsed[1] == (None if when is None else _expected_ns(when)), name


def test_kubetrail_check_loads_the_stock_parsers_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kubetrail.cli.main", "check", "-c", str(DATA / "stock-pipeline.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for name in STOCK_SAMPLES:
        assert f"- {name}\n" in result.stdout


def test_logfmt_and_ltsv_through_tail_in_a_real_process(tmp_path: Path) -> None:
    log = write(tmp_path / "app.log", 'time=2026-02-11T09:31:18Z level=warn msg="disk \\"full\\""\nnot logfmt\n')
    access = write(tmp_path / "access.log", "host:10.0.0.1\tstatus:404\ttime:2026-02-11T09:31:19Z\n")
    write(
        tmp_path / "parsers.conf",
        "[PARSER]\n    Name lf\n    Format logfmt\n    Time_Format %Y-%m-%dT%H:%M:%S%z\n"
        "[PARSER]\n    Name lt\n    Format ltsv\n    Time_Key time\n    Time_Format %Y-%m-%dT%H:%M:%S%z\n"
        "    Types status:integer\n",
    )
    config = write(
        tmp_path / "p.conf",
        f"""
[SERVICE]
    parsers_file parsers.conf
    grace 2
[INPUT]
    name tail
    path {log}
    tag app
    parser lf
    read_from_head on
    exit_on_eof on
    db {tmp_path / "a.db"}
[INPUT]
    name tail
    path {access}
    tag acc
    parser lt
    read_from_head on
    exit_on_eof on
    db {tmp_path / "b.db"}
[OUTPUT]
    name file
    match *
    path {tmp_path / "out"}
    file out.txt
    mkdir on
""",
    )
    result = run_config(config)
    assert result.returncode == 0, result.stderr
    records = out_file_records(tmp_path / "out" / "out.txt")
    assert len(records) == 3
    assert ("acc", ns("2026-02-11T09:31:19+00:00"), {"host": "10.0.0.1", "status": 404}) in records
    assert ("app", ns("2026-02-11T09:31:18+00:00"), {"level": "warn", "msg": 'disk "full"'}) in records
    # Any word is a bare logfmt key (true), as in Fluent Bit.
    assert [r[0] for r in records if r[2] == {"not": True, "logfmt": True}] == ["app"]
