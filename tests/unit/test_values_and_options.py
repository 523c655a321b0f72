import re

import pytest

from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option, resolve_options, ruby_to_python_regex
from kubetrail.core.values import parse_bool, parse_duration, parse_size, split_list
from tests.unit.helpers import section


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512", 512),
        ("32k", 32768),
        ("32K", 32768),
        ("5MB", 5 * 1024**2),
        ("5M", 5 * 1024**2),
        ("1G", 1024**3),
        ("1.5k", 1536),
        ("2KiB", 2048),
    ],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30", 30.0), ("10s", 10.0), ("10m", 600.0), ("1h", 3600.0), ("500ms", 0.5), ("1d", 86400.0), ("0.5", 0.5)],
)
def test_durations(text: str, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("word", ["on", "On", "true", "YES", "1"])
def test_true_words(word: str) -> None:
    assert parse_bool(word) is True


@pytest.mark.parametrize("word", ["off", "false", "No", "0"])
def test_false_words(word: str) -> None:
    assert parse_bool(word) is False


@pytest.mark.parametrize(("fn", "text"), [(parse_bool, "maybe"), (parse_size, "12 parsecs"), (parse_duration, "10y")])
def test_bad_values(fn, text: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=re.escape(text)):
        fn(text)


def test_split_list() -> None:
    assert split_list(" a, b ,,c ") == ["a", "b", "c"]


OPTIONS = (
    Option("path", required=True),
    Option("size", "size", 1024),
    Option("flag", "bool", False),
    Option("mode", "choice", "a", choices=("a", "b")),
    Option("rule", multiple=True),
)


def test_resolve_fills_defaults_and_parses() -> None:
    values = resolve_options(section("input", name="x", path="/p", flag="on", rule=["r1", "r2"]), OPTIONS, "t")
    assert values == {"path": "/p", "size": 1024, "flag": True, "mode": "a", "rule": ["r1", "r2"]}


def test_unknown_property_names_key_line_and_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_options(section("input", path="/p", colour="red"), OPTIONS, "input plugin 'x'")
    message = str(info.value)
    assert "<test>:2" in message and "'colour'" in message and "allowed: flag, mode, path, rule, size" in message


def test_bad_value_names_expected_kind() -> None:
    with pytest.raises(ConfigError, match="expected a size"):
        resolve_options(section("input", path="/p", size="lots"), OPTIONS, "t")
    with pytest.raises(ConfigError, match="one of a, b"):
        resolve_options(section("input", path="/p", mode="c"), OPTIONS, "t")


def test_missing_required_and_duplicates() -> None:
    with pytest.raises(ConfigError, match="required"):
        resolve_options(section("input"), OPTIONS, "t")
    with pytest.raises(ConfigError, match="set twice"):
        resolve_options(section("input", path=["/a", "/b"]), OPTIONS, "t")


def test_onigmo_named_groups() -> None:
    assert re.compile(ruby_to_python_regex("/^(?<a>\\d+) (?<b>.*)$/")).match("12 x").groupdict() == {
        "a": "12",
        "b": "x",
    }
