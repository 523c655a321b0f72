"""The ``record_modifier`` filter against Fluent Bit's documentation examples and
``filter_record_modifier/filter_modifier.c``."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from kubetrail.core.errors import ConfigError
from kubetrail.core.record import Record
from kubetrail.transforms.record_modifier import RecordModifierTransform
from tests.unit.helpers import build
from tests.unit.run_helpers import out_file_records, run_config, tail_to_out_file

MEM = {"Mem.total": 1016024, "Mem.used": 716672, "Mem.free": 299352, "Swap.total": 2064380, "Swap.used": 0}


def run(bodies: list[dict[str, Any]], **options: Any) -> list[dict[str, Any]]:
    records = [Record("t", 1, body) for body in bodies]
    return [record.body for record in build(RecordModifierTransform, **options).process(records)]


def test_docs_example_append_records() -> None:
    # docs (filters/record-modifier, "Append fields"): Record hostname / Record product are
    # appended after the record's keys, in the order written.
    (out,) = run([dict(MEM)], record=["hostname localhost.localdomain", "product Awesome_Tool"])
    assert list(out) == [*MEM, "hostname", "product"]
    assert out["hostname"] == "localhost.localdomain" and out["product"] == "Awesome_Tool"
    # The value is everything after the first space.
    (out,) = run([{}], record="msg hello  big world")
    assert out == {"msg": "hello  big world"}


def test_docs_example_remove_keys() -> None:
    # docs ("Remove fields with Remove_key"): Remove_key Swap.total, Swap.used, Swap.free.
    (out,) = run([dict(MEM)], remove_key=["Swap.total", "Swap.used", "Swap.free"])
    assert out == {"Mem.total": 1016024, "Mem.used": 716672, "Mem.free": 299352}


def test_docs_example_allowlist() -> None:
    # docs ("Retain fields with Allowlist_key"): Allowlist_key Mem.total, Mem.used, Mem.free;
    # Whitelist_key is its old name.
    expected = {"Mem.total": 1016024, "Mem.used": 716672, "Mem.free": 299352}
    assert run([dict(MEM)], allowlist_key=["Mem.total", "Mem.used", "Mem.free"]) == [expected]
    assert run([dict(MEM)], whitelist_key=["Mem.total", "Mem.used", "Mem.free"]) == [expected]


def test_wildcards_and_case_insensitive_names() -> None:
    # filter_modifier.c: a trailing * matches a prefix; names compare with strncasecmp.
    assert run([dict(MEM)], remove_key="mem.*") == [{"Swap.total": 2064380, "Swap.used": 0}]
    assert run([dict(MEM)], allowlist_key="SWAP.USED") == [{"Swap.used": 0}]


def test_allowlist_matching_nothing_drops_the_record() -> None:
    # filter_modifier.c: a record left with no key is not written (removed_map_num <= 0).
    assert run([{"a": 1}, {"keep": 2}], allowlist_key="keep") == [{"keep": 2}]
    # ...unless a record key is appended.
    assert run([{"a": 1}], allowlist_key="keep", record="k v") == [{"k": "v"}]
    # A record that was empty and not changed passes.
    assert run([{}], remove_key="a") == [{}]


def test_record_replaces_an_existing_key_and_uuid_key() -> None:
    # Fluent Bit appends a second "a"; outputs show the later value.
    (out,) = run([{"a": "old", "b": 1}], record="a new", uuid_key="id")
    assert out["a"] == "new" and out["b"] == 1
    assert uuid.UUID(out["id"]).version == 4
    first, second = run([{}, {}], uuid_key="id")
    assert first["id"] != second["id"]


def test_lazy_records_keep_their_bytes_unless_changed() -> None:
    untouched = Record("t", 1, None, b'{"a":1}')
    changed = Record("t", 1, None, b'{"a":1,"x":2}')
    build(RecordModifierTransform, remove_key="x").process([untouched, changed])
    assert untouched.raw == b'{"a":1}'
    assert changed.raw is None and changed.json_bytes() == b'{"a":1}'


def test_bad_options_name_the_key() -> None:
    with pytest.raises(ConfigError, match="'record': expected 'KEY VALUE'"):
        build(RecordModifierTransform, record="lonely")
    with pytest.raises(ConfigError, match="'allowlist_key': remove_key and allowlist_key are exclusive"):
        build(RecordModifierTransform, remove_key="a", allowlist_key="b")
    with pytest.raises(ConfigError, match="'record': record_modifier needs"):
        build(RecordModifierTransform)
    with pytest.raises(ConfigError, match="'records': unknown property"):
        build(RecordModifierTransform, records="a b")


def test_classic_config_through_kubetrail_run(tmp_path: Path) -> None:
    config = tail_to_out_file(
        tmp_path,
        ['{"log":"a","stream":"stdout","time":"x"}', '{"log":"b","stream":"stderr"}'],
        """
[FILTER]
    Name        record_modifier
    Match       *
    Record      cluster  prod-eu
    Record      product Awesome Tool
    Remove_key  time
    Remove_key  stream
    Uuid_key    event_id
""",
    )
    result = run_config(config)
    assert result.returncode == 0, result.stderr
    bodies = [body for _, _, body in out_file_records(tmp_path / "out" / "out.txt")]
    assert [{k: v for k, v in b.items() if k != "event_id"} for b in bodies] == [
        {"log": "a", "cluster": "prod-eu", "product": "Awesome Tool"},
        {"log": "b", "cluster": "prod-eu", "product": "Awesome Tool"},
    ]
    assert len({b["event_id"] for b in bodies}) == 2
