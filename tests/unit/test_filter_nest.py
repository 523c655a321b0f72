"""The ``nest`` filter against Fluent Bit's documentation examples and ``filter_nest/nest.c``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetrail.core.errors import ConfigError
from kubetrail.core.record import Record
from kubetrail.transforms.nest import NestTransform
from tests.unit.helpers import build, file_output_yaml, tail_yaml
from tests.unit.run_helpers import out_file_records, run_config, tail_to_out_file

MEM = {
    "Mem.total": 1016024,
    "Mem.used": 716672,
    "Mem.free": 299352,
    "Swap.total": 2064380,
    "Swap.used": 0,
    "Swap.free": 2064380,
}


def run(body: dict[str, Any], **options: Any) -> dict[str, Any]:
    record = Record("t", 1, body)
    (out,) = build(NestTransform, **options).process([record])
    return out.body


def test_docs_example_nest_wildcard() -> None:
    # docs (filters/nest, "Example #1 - nest"): Wildcard Mem.*, Nest_under Memstats; the new map
    # comes after the keys that stayed.
    out = run(dict(MEM), operation="nest", wildcard="Mem.*", nest_under="Memstats")
    assert list(out) == ["Swap.total", "Swap.used", "Swap.free", "Memstats"]
    assert out["Memstats"] == {"Mem.total": 1016024, "Mem.used": 716672, "Mem.free": 299352}


def test_docs_example_lift_and_round_trip_with_prefixes() -> None:
    # docs ("Example #2 - nest and lift undo"): nest Mem.* under Memstats, then lift it again.
    nested = run(dict(MEM), operation="nest", wildcard="Mem.*", nest_under="Memstats")
    assert run(nested, operation="lift", nested_under="Memstats") == MEM
    # docs ("Example #3 - nest 3 levels deep" / prefixes): remove_prefix on nest, add_prefix on lift.
    short = run(dict(MEM), operation="nest", wildcard="Mem.*", nest_under="Memstats", remove_prefix="Mem.")
    assert short["Memstats"] == {"total": 1016024, "used": 716672, "free": 299352}
    lifted = run(short, operation="lift", nested_under="Memstats", add_prefix="Memstats.")
    assert lifted == {**{k: v for k, v in MEM.items() if k.startswith("Swap")}, **{
        "Memstats.total": 1016024, "Memstats.used": 716672, "Memstats.free": 299352}}  # fmt: skip


def test_kubernetes_lift_and_renest_like_the_operator_configs() -> None:
    # The common Kubernetes pattern: lift kubernetes with Add_prefix kubernetes_, then nest
    # kubernetes_* back with Remove_prefix kubernetes_.
    body = {"log": "x", "kubernetes": {"pod_name": "p", "labels": {"app": "a"}}}
    flat = run(dict(body), operation="lift", nested_under="kubernetes", add_prefix="kubernetes_")
    assert flat == {"log": "x", "kubernetes_pod_name": "p", "kubernetes_labels": {"app": "a"}}
    again = run(flat, operation="nest", wildcard="kubernetes_*", nest_under="kubernetes", remove_prefix="kubernetes_")
    assert again == body


def test_wildcards_exact_prefix_repeated_and_star_alone() -> None:
    body = {"a": 1, "ab": 2, "b*c": 3, "x": 4}
    # nest.c: only a trailing * is a wildcard; "b*c" matches itself only; several wildcard keys.
    assert run(dict(body), operation="nest", wildcard=["a", "b*c"], nest_under="n") == {
        "ab": 2,
        "x": 4,
        "n": {"a": 1, "b*c": 3},
    }
    assert run(dict(body), operation="nest", wildcard="*", nest_under="all") == {"all": body}


def test_records_left_alone() -> None:
    # No key matches: no empty map is added (apply_nesting_rules returns 0).
    assert run({"a": 1}, operation="nest", wildcard="z*", nest_under="n") == {"a": 1}
    # Lift of a missing key, or of a value that is not a map ("is not a map").
    assert run({"a": 1}, operation="lift", nested_under="n") == {"a": 1}
    assert run({"n": "text", "a": 1}, operation="lift", nested_under="n") == {"n": "text", "a": 1}
    assert run({"n": [1, 2]}, operation="lift", nested_under="n") == {"n": [1, 2]}
    # remove_prefix leaves keys without the prefix as they are.
    assert run({"Mem.a": 1, "Memb": 2}, operation="nest", wildcard="Mem*", nest_under="m", remove_prefix="Mem.") == {
        "m": {"a": 1, "Memb": 2}
    }


def test_clashing_keys_take_the_later_value() -> None:
    # Fluent Bit writes both keys; the later one is what outputs show.
    assert run({"a": 1, "n": {"a": 2}}, operation="lift", nested_under="n") == {"a": 2}
    assert run({"n": "old", "x": 1}, operation="nest", wildcard="x", nest_under="n") == {"n": {"x": 1}}


def test_lazy_records_keep_their_bytes_unless_changed() -> None:
    untouched = Record("t", 1, None, b'{"a":1}')
    changed = Record("t", 1, None, b'{"x.a":1,"b":2}')
    build(NestTransform, operation="nest", wildcard="x.*", nest_under="x").process([untouched, changed])
    assert untouched.raw == b'{"a":1}'
    assert changed.raw is None and changed.json_bytes() == b'{"b":2,"x":{"x.a":1}}'


def test_bad_options_name_the_key() -> None:
    with pytest.raises(ConfigError, match="'operation'"):
        build(NestTransform, wildcard="a*", nest_under="n")
    with pytest.raises(ConfigError, match="'operation'"):
        build(NestTransform, operation="flatten", nest_under="n")
    with pytest.raises(ConfigError, match="'nest_under'"):
        build(NestTransform, operation="nest", wildcard="a*")
    with pytest.raises(ConfigError, match="'wildcard'"):
        build(NestTransform, operation="nest", nest_under="n")
    with pytest.raises(ConfigError, match="'nested_under'"):
        build(NestTransform, operation="lift")
    with pytest.raises(ConfigError, match="'remove_prefix': add_prefix and remove_prefix are exclusive"):
        build(NestTransform, operation="lift", nested_under="n", add_prefix="a", remove_prefix="b")
    with pytest.raises(ConfigError, match="'wildcards': unknown property"):
        build(NestTransform, operation="nest", nest_under="n", wildcards="a")


def test_classic_config_through_kubetrail_run(tmp_path: Path) -> None:
    lines = ['{"log":"hi","kubernetes":{"pod_name":"web","namespace_name":"default"}}', '{"log":"plain"}']
    config = tail_to_out_file(
        tmp_path,
        lines,
        """
[FILTER]
    Name          nest
    Match         app
    Operation     lift
    Nested_under  kubernetes
    Add_prefix    k8s_
[FILTER]
    Name          nest
    Match         *
    Operation     nest
    Wildcard      k8s_*
    Wildcard      log
    Nest_under    data
""",
    )
    result = run_config(config)
    assert result.returncode == 0, result.stderr
    bodies = [body for _, _, body in out_file_records(tmp_path / "out" / "out.txt")]
    assert bodies == [
        {"data": {"log": "hi", "k8s_pod_name": "web", "k8s_namespace_name": "default"}},
        {"data": {"log": "plain"}},
    ]


def test_yaml_config_with_a_wildcard_list_through_kubetrail_run(tmp_path: Path) -> None:
    # Fluent Bit's YAML format: a list value is the key repeated (wildcard: [a*, b]).
    log = tmp_path / "in.log"
    log.write_text('{"a1":1,"a2":2,"b":3,"c":4}\n')
    filters = """  filters:
    - name: nest
      match: '*'
      operation: nest
      wildcard: ['a*', 'b']
      nest_under: grouped
      remove_prefix: a
"""
    config = tail_yaml(
        tmp_path, log, tag="app", rest=filters + "  outputs:\n" + file_output_yaml(tmp_path, "*", "out.txt", fmt=None)
    )
    result = run_config(config)
    assert result.returncode == 0, result.stderr
    assert [body for _, _, body in out_file_records(tmp_path / "out" / "out.txt")] == [
        {"c": 4, "grouped": {"1": 1, "2": 2, "b": 3}}
    ]
