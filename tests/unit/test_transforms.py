import pytest

from kubetrail.core.errors import ConfigError
from kubetrail.core.record import Record
from kubetrail.transforms.grep import GrepTransform
from kubetrail.transforms.modify import ModifyTransform
from tests.unit.helpers import build


def recs(*bodies: dict) -> list[Record]:  # type: ignore[type-arg]
    return [Record("t", 0, dict(b)) for b in bodies]


def test_grep_legacy_regex_and_exclude() -> None:
    grep = build(GrepTransform, regex=["log error", "$k8s['ns'] ^prod"], exclude="log ignore")
    kept = grep.process(
        recs(
            {"log": "an error", "k8s": {"ns": "prod-1"}},
            {"log": "an error, ignore it", "k8s": {"ns": "prod-1"}},
            {"log": "an error", "k8s": {"ns": "dev"}},
            {"log": "fine", "k8s": {"ns": "prod"}},
        )
    )
    assert [r.body["log"] for r in kept] == ["an error"]


def test_grep_or_and() -> None:
    anyof = build(GrepTransform, regex=["a x", "b y"], logical_op="or")
    assert len(anyof.process(recs({"a": "x"}, {"b": "y"}, {"a": "z"}))) == 2
    allof = build(GrepTransform, exclude=["a x", "b y"], logical_op="and")
    assert [r.body for r in allof.process(recs({"a": "x", "b": "y"}, {"a": "x"}))] == [{"a": "x"}]


def test_grep_numbers_and_missing_keys() -> None:
    grep = build(GrepTransform, regex="code ^5")
    assert [r.body for r in grep.process(recs({"code": 503}, {"code": 200}, {}))] == [{"code": 503}]


def test_grep_config_errors() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        build(GrepTransform)
    with pytest.raises(ConfigError, match="not both"):
        build(GrepTransform, regex="a b", exclude="c d", logical_op="and")
    with pytest.raises(ConfigError, match="KEY REGEX"):
        build(GrepTransform, regex="lonely")


def test_modify_rules_apply_in_written_order() -> None:
    modify = build(
        ModifyTransform,
        rename="a b",
        copy="b c",
        set="a new",
        add=["c nope", "d added value"],
        remove="x",
        hard_rename="c z",
    )
    record = recs({"a": 1, "x": 2})[0]
    record.raw = b'{"a":1,"x":2}'
    modify.process([record])
    assert record.body == {"b": 1, "a": "new", "d": "added value", "z": 1}
    assert record.raw is None  # a modified record is re-serialised, not written from stale bytes


def test_modify_conditions_all_must_hold() -> None:
    modify = build(ModifyTransform, set="flag yes", condition=["key_value_equals level error", "key_exists msg"])
    records = modify.process(recs({"level": "error", "msg": "m"}, {"level": "info", "msg": "m"}, {"level": "error"}))
    assert [r.body.get("flag") for r in records] == ["yes", None, None]


def test_modify_wildcards_and_regex_removal() -> None:
    modify = build(ModifyTransform, remove_wildcard="tmp_*", remove_regex="^x\\d$", condition="a_key_matches ^tmp_")
    records = modify.process(recs({"tmp_a": 1, "tmp_b": 2, "x1": 3, "keep": 4}, {"x1": 1}))
    assert records[0].body == {"keep": 4} and records[1].body == {"x1": 1}


def test_modify_bad_condition() -> None:
    with pytest.raises(ConfigError, match="unknown condition"):
        build(ModifyTransform, set="a b", condition="key_is_pretty a")
