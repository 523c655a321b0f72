"""The ``lua`` filter: Fluent Bit's contract (docs "filters/lua" and ``filter_lua/lua.c``), run
by a real Lua runtime (LuaJIT from the lupa package)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from kubetrail.core.errors import ConfigError
from kubetrail.core.record import Record
from kubetrail.transforms.lua import LuaTransform
from tests.unit.helpers import build, file_output_yaml, tail_yaml, write
from tests.unit.run_helpers import out_file_records, run_config, tail_to_out_file

T0 = 1_700_000_000_123_456_789


def run(code: str, bodies: list[dict[str, Any]], call: str = "f", **options: Any) -> list[Record]:
    transform = build(LuaTransform, code=code, call=call, **options)
    return transform.process([Record("app.x", T0, body, identity=("file", n)) for n, body in enumerate(bodies)])


def test_return_codes() -> None:
    # lua.c: -1 drops, 0 keeps the record as it was, 1 takes record and time, 2 takes the
    # record and keeps the time; any other code keeps the original (logged).
    code = """
function f(tag, ts, r)
  if r.c == -1 then return -1, ts, r end
  r.seen = tag
  if r.c == 0 then return 0, 0, r end
  if r.c == 1 then return 1, 1600000000.5, r end
  if r.c == 2 then return 2, 0, r end
  return 7, ts, r
end"""
    out = run(code, [{"c": -1}, {"c": 0}, {"c": 1}, {"c": 2}, {"c": 3}])
    assert [(r.body, r.time_ns) for r in out] == [
        ({"c": 0}, T0),
        ({"c": 1, "seen": "app.x"}, 1_600_000_000_500_000_000),
        ({"c": 2, "seen": "app.x"}, T0),
        ({"c": 3}, T0),
    ]


def test_docs_example_response_code_filter() -> None:
    # docs ("Response code filtering"): keep only records with response_code >= 400.
    code = """
function cb_response_code_filter(tag, timestamp, record)
  response_code = record["response_code"]
  if (response_code == nil or response_code < 400) then
    return -1, 0, 0
  end
  return 0, 0, 0
end"""
    bodies = [{"response_code": 200}, {"response_code": 404}, {"other": 1}, {"response_code": 503}]
    out = run(code, bodies, call="cb_response_code_filter")
    assert [r.body for r in out] == [{"response_code": 404}, {"response_code": 503}]


def test_docs_example_record_split() -> None:
    # docs ("Record split"): returning an array of maps makes one record of each.
    code = """
function cb_split(tag, timestamp, record)
  if record["x"] ~= nil then
    return 2, timestamp, record["x"]
  else
    return 2, timestamp, record
  end
end"""
    bodies = [{"x": [{"a1": "aa", "z1": "zz"}, {"b1": "bb", "x1": "xx"}, {"c1": "cc"}]}, {"y": 1}]
    out = run(code, bodies, call="cb_split")
    assert [r.body for r in out] == [{"a1": "aa", "z1": "zz"}, {"b1": "bb", "x1": "xx"}, {"c1": "cc"}, {"y": 1}]
    assert [r.time_ns for r in out] == [T0] * 4
    # Each part has its own identity (for idempotent sinks); an unsplit record keeps its own.
    assert [r.identity for r in out] == [("file", 0, 0), ("file", 0, 1), ("file", 0, 2), ("file", 1)]


def test_time_as_table_keeps_nanoseconds() -> None:
    # docs ("time_as_table"): the time is {sec, nsec} both ways.
    code = """
function f(tag, ts, r)
  r.sec = ts.sec; r.nsec = ts.nsec
  return 1, {sec = ts.sec + 1, nsec = ts.nsec}, r
end"""
    (out,) = run(code, [{}], time_as_table="on")
    assert out.body == {"sec": T0 // 10**9, "nsec": T0 % 10**9}
    assert out.time_ns == T0 + 10**9
    # As a number, the time is seconds (a double): Fluent Bit's flb_time_from_double.
    (out,) = run("function f(tag, ts, r) r.ts = ts return 1, ts, r end", [{}])
    assert abs(out.body["ts"] - T0 / 1e9) < 1e-6 and abs(out.time_ns - T0) < 1000


def test_values_both_ways() -> None:
    code = """
function f(tag, ts, r)
  r.int = 3; r.float = 2.5; r.whole = 4.0; r.t = true; r.s = "é"; r.list = {1, "two", {k = "v"}}
  r.map = {a = 1}; r.empty = {}; r.removed = nil; r.kept_type = type(r.nested.inner[2])
  return 2, ts, r
end"""
    (out,) = run(code, [{"removed": 1, "nested": {"inner": [1, 2.5, "x"]}, "nothing": None}])
    assert out.body == {
        "int": 3,
        "float": 2.5,
        "whole": 4,
        "t": True,
        "s": "é",
        "list": [1, "two", {"k": "v"}],
        "map": {"a": 1},
        "empty": {},  # lua_arraylength(): an empty table is a map
        "kept_type": "number",
        "nested": {"inner": [1, 2.5, "x"]},
    }  # "nothing" (null) is nil in Lua: the key is gone, as in Fluent Bit without enable_flb_null


def test_tables_with_whole_number_keys_are_arrays_up_to_the_largest() -> None:
    # flb_lua.c lua_arraylength(): table.maxn > 0 makes an array of that length; holes are nil
    # (null) and other keys are not written. A far too sparse table stays a map here.
    code = """
function f(tag, ts, r)
  r.holes = {1, nil, "s"}; r.mixed = {10, 20, name = "x"}; r.sparse = {}; r.sparse[100000] = 1
  return 2, ts, r
end"""
    (out,) = run(code, [{"in": [1, None, "x"]}])
    assert out.body == {
        "in": [1, None, "x"],
        "holes": [1, None, "s"],
        "mixed": [10, 20],
        "sparse": {"100000": 1},
    }


def test_type_int_key_type_array_key_and_flb_null() -> None:
    code = """
function f(tag, ts, r)
  r.code = 404.7; r.deep = {code = 1.5, other = 1.5}; r.tags = {}; r.items = {"a"}
  r.was_null = (r.gone == flb_null)
  return 2, ts, r
end"""
    (out,) = run(code, [{"gone": None}], type_int_key="code", type_array_key="tags items", enable_flb_null="on")
    assert out.body == {
        "code": 404,
        "deep": {"code": 1, "other": 1.5},
        "tags": [],
        "items": ["a"],
        "gone": None,
        "was_null": True,
    }


def test_runtime_errors_pass_the_record_and_are_counted_and_logged_per_state_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    code = """
function f(tag, ts, r)
  if r.bad == 1 then error("bad record") end
  if r.bad == 2 then return 1, ts, "not a table" end
  if r.bad == 3 then return 1, ts, {} end
  r.ok = true
  return 2, ts, r
end"""
    transform = build(LuaTransform, code=code, call="f")
    bodies = [{"bad": 1}, {"bad": 2}, {"bad": 3}, {"n": 1}, {"bad": 1}]
    with caplog.at_level("INFO", logger="kubetrail.test"):
        out = transform.process([Record("t", T0, body) for body in bodies])
    assert [r.body for r in out] == [{"bad": 1}, {"bad": 2}, {"bad": 3}, {"n": 1, "ok": True}, {"bad": 1}]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3  # failing, working again, failing
    assert "bad record" in messages[0] and "works again after 3 failed records" in messages[1]
    errors = generate_latest(transform.metrics.registry).decode()
    assert 'kubetrail_errors_total{component="lua.0",kind="test",plugin="lua",type="lua_error"} 4.0' in errors


def test_unchanged_lazy_records_keep_their_bytes() -> None:
    transform = build(LuaTransform, code="function f(t, ts, r) return 0, ts, r end", call="f")
    record = Record("t", T0, None, b'{"a":1}')
    transform.process([record])
    assert record.raw == b'{"a":1}'


def test_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'code': Lua script does not compile: code:3: .*expected"):
        build(LuaTransform, code="function f(tag, ts, r)\n  return 1, ts\n  r = = 1\nend", call="f")
    bad = write(tmp_path / "bad.lua", "-- line 1\nfunction f(tag, ts, r\n  return 0, ts, r\nend\n")
    with pytest.raises(ConfigError, match=rf"'script': Lua script does not compile: {bad}:3:"):
        build(LuaTransform, script=str(bad), call="f")
    with pytest.raises(ConfigError, match="'code': Lua script failed while loading: code:1: no"):
        build(LuaTransform, code="error('no')", call="f")
    with pytest.raises(ConfigError, match="'call': function 'missing' is not defined"):
        build(LuaTransform, code="function f() end", call="missing")
    with pytest.raises(ConfigError, match="'call': required"):
        build(LuaTransform, code="function f() end")
    with pytest.raises(ConfigError, match="'script': the lua filter needs 'script'"):
        build(LuaTransform, call="f")
    with pytest.raises(ConfigError, match="'script': cannot read Lua script"):
        build(LuaTransform, script=str(tmp_path / "none.lua"), call="f")
    with pytest.raises(ConfigError, match="'time_as_table': bad value"):
        build(LuaTransform, code="function f() end", call="f", time_as_table="sometimes")


def test_classic_config_through_kubetrail_run(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    write(
        tmp_path / "scripts" / "k8s.lua",
        """
-- Typical Kubernetes use: drop health checks, add a field, split batched lines.
function process(tag, timestamp, record)
  if record.log and string.find(record.log, "GET /healthz", 1, true) then
    return -1, timestamp, record
  end
  if record.lines then
    local out = {}
    for i, line in ipairs(record.lines) do out[i] = {log = line, part = i} end
    return 2, timestamp, out
  end
  if record.fail then error("cannot handle this one") end
  record.cluster = "prod"
  record.level = string.upper(record.level or "info")
  return 1, timestamp + 60, record
end
""",
    )
    config = tail_to_out_file(
        tmp_path,
        [
            '{"log":"GET /healthz 200"}',
            '{"log":"started","level":"warn"}',
            '{"lines":["a","b"]}',
            '{"fail":true}',
        ],
        """
[FILTER]
    Name    lua
    Match   app
    Script  scripts/k8s.lua
    Call    process
""",
    )
    result = run_config(config)
    assert result.returncode == 0, result.stderr
    records = out_file_records(tmp_path / "out" / "out.txt")
    bodies = [body for _, _, body in records]
    # (Lua tables have no key order: compared as sets of items.)
    assert [sorted(body.items()) for body in bodies] == [
        [("cluster", "prod"), ("level", "WARN"), ("log", "started")],
        [("log", "a"), ("part", 1)],
        [("log", "b"), ("part", 2)],
        [("fail", True)],
    ]
    # Code 1 moved its time by a minute (as a double: to within a microsecond).
    assert abs(records[0][1] - records[1][1] - 60 * 10**9) < 1000
    assert "cannot handle this one" in result.stderr


def test_compile_error_is_a_configuration_error_of_kubetrail_check(tmp_path: Path) -> None:
    write(tmp_path / "broken.lua", "function f(tag, ts, r)\n  return 1 ts, r\nend\n")
    config = write(
        tmp_path / "k.conf",
        "[INPUT]\n    name tail\n    path /x\n[FILTER]\n    name lua\n    match *\n    script broken.lua\n"
        "    call f\n[OUTPUT]\n    name stdout\n    match *\n",
    )
    result = subprocess.run(
        [sys.executable, "-m", "kubetrail.cli.main", "check", "-c", str(config)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert f"{config}:7: 'script': Lua script does not compile: {tmp_path / 'broken.lua'}:2:" in result.stderr


def test_inline_code_in_a_yaml_pipeline(tmp_path: Path) -> None:
    # The YAML form Fluent Bit's docs show for inline code ("code: |").
    log = write(tmp_path / "in.log", '{"level":"debug"}\n{"level":"error"}\n')
    filters = """  filters:
    - name: lua
      match: '*'
      call: drop_debug
      code: |
        function drop_debug(tag, timestamp, record)
          if record["level"] == "debug" then
            return -1, timestamp, record
          end
          record["seen_by"] = "lua"
          return 2, timestamp, record
        end
"""
    config = tail_yaml(
        tmp_path, log, tag="app", rest=filters + "  outputs:\n" + file_output_yaml(tmp_path, "*", "out.txt", fmt=None)
    )
    result = run_config(config)
    assert result.returncode == 0, result.stderr
    bodies = [body for _, _, body in out_file_records(tmp_path / "out" / "out.txt")]
    assert bodies == [{"level": "error", "seen_by": "lua"}]  # dict equality: Lua's key order does not matter
