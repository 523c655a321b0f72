"""Fluent Bit config compatibility: YAML processors, content_modifier, rewrite_tag, external
plugins, unknown plugin names and options that have no effect here."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import generate_latest

from kubetrail.core.acks import AckToken
from kubetrail.core.config import load_config
from kubetrail.core.config.convert import to_classic, to_yaml
from kubetrail.core.errors import ConfigError
from kubetrail.core.record import Batch, Record
from kubetrail.runtime.pipeline import Pipeline
from kubetrail.transforms.content_modifier import ContentModifierTransform
from kubetrail.transforms.rewrite_tag import RewriteTagTransform, split_rule
from tests.files import written_json_lines
from tests.unit.helpers import build, file_output, file_output_yaml, run_pipeline, tail_input, tail_yaml, write


def jsonl(*docs: dict[str, Any]) -> str:
    return "".join(orjson.dumps(d).decode() + "\n" for d in docs)


def stored_offset(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT offset FROM in_tail_files").fetchall()
    return rows[0][0] if rows else -1


# -- YAML processors -------------------------------------------------------------------------


async def test_input_and_output_processors_run_where_they_are_declared(tmp_path: Path) -> None:
    log = write(tmp_path / "a.log", jsonl({"msg": "a", "level": "info"}, {"msg": "b", "level": "debug"}))
    config = tail_yaml(
        tmp_path,
        log,
        """      processors:
        logs:
          - name: content_modifier
            action: insert
            key: cluster
            value: east
          - name: grep
            exclude: level ^debug$""",
        "  outputs:\n"
        + file_output_yaml(
            tmp_path,
            "kube.*",
            "hashed.jsonl",
            """      processors:
        logs:
          - name: content_modifier
            action: hash
            key: msg""",
        )
        + file_output_yaml(tmp_path, "kube.*", "plain.jsonl"),
    )
    await run_pipeline(config)
    # The input's processors ran before routing: both outputs see the insert and the drop.
    assert written_json_lines(tmp_path / "out" / "plain.jsonl") == [{"msg": "a", "level": "info", "cluster": "east"}]
    # The output's processor changed only that output's copy.
    assert written_json_lines(tmp_path / "out" / "hashed.jsonl") == [
        {"msg": hashlib.sha256(b"a").hexdigest(), "level": "info", "cluster": "east"}
    ]
    # The record the processor dropped was acknowledged as filtered: the whole file is checkpointed.
    assert stored_offset(tmp_path / "tail.db") == log.stat().st_size


async def test_an_output_processor_dropping_everything_still_acknowledges(tmp_path: Path) -> None:
    log = write(tmp_path / "a.log", jsonl({"msg": "a"}, {"msg": "b"}))
    config = tail_yaml(
        tmp_path,
        log,
        rest="  outputs:\n"
        + file_output_yaml(
            tmp_path,
            "*",
            "none.jsonl",
            """      processors:
        logs:
          - name: grep
            regex: msg ^z$""",
        ),
    )
    pipeline = await run_pipeline(config)
    assert not (tmp_path / "out" / "none.jsonl").exists()
    assert stored_offset(tmp_path / "tail.db") == log.stat().st_size
    assert any("grep" in p.component_id for p in pipeline.processors["file.0"])


def test_metrics_and_traces_processors_are_accepted_and_noted(tmp_path: Path) -> None:
    log = write(tmp_path / "a.log", "")
    config = tail_yaml(
        tmp_path,
        log,
        """      processors:
        metrics:
          - name: labels
            insert: a b
        traces:
          - name: sampling""",
        "  outputs:\n    - name: stdout\n      match: '*'",
    )
    pipeline = Pipeline(load_config(config))
    assert not pipeline.processors["tail.0"]
    notes = " ".join(pipeline.describe()["notes"])
    assert "processors.metrics ignored" in notes and "processors.traces ignored" in notes


@pytest.mark.parametrize(
    ("processors", "message"),
    [
        ("        logs:\n          - name: nope", "unknown processor plugin 'nope'"),
        ("        logs:\n          - name: content_modifier\n            action: explode", "'action'"),
        ("        logs: {name: grep}", "processors.logs must be a list"),
        ("        events:\n          - name: grep", "unknown key 'events' under processors"),
        (
            "        logs:\n          - name: grep\n            regex: a b\n"
            "            condition:\n              op: xor\n              rules: []",
            "condition op must be and or or",
        ),
        (
            "        logs:\n          - name: grep\n            regex: a b\n            condition:\n"
            "              rules:\n                - {field: $a, op: in, value: x}",
            "condition rule 1: op in needs a list value",
        ),
        (
            "        logs:\n          - name: grep\n            regex: a b\n            condition:\n"
            "              rules:\n                - {field: $a, op: like, value: x}",
            "unknown op 'like'",
        ),
        (
            "        logs:\n          - name: grep\n            regex: a b\n            condition:\n"
            "              rules:\n                - {field: $a, op: gt, value: many}",
            "op gt needs a number",
        ),
        (
            "        logs:\n          - name: rewrite_tag\n            rule: $a . b false\n            condition:\n"
            "              rules:\n                - {field: $a, op: eq, value: x}",
            "a condition on a rewrite_tag processor is not supported",
        ),
    ],
)
def test_bad_processors_are_clear_errors(tmp_path: Path, processors: str, message: str) -> None:
    log = write(tmp_path / "a.log", "")
    config = tail_yaml(
        tmp_path, log, "      processors:\n" + processors, "  outputs:\n    - name: stdout\n      match: '*'"
    )
    with pytest.raises(ConfigError) as info:
        Pipeline(load_config(config))
    assert message in str(info.value)
    assert str(config) in str(info.value)


def test_processors_on_a_filter_are_refused(tmp_path: Path) -> None:
    log = write(tmp_path / "a.log", "")
    config = tail_yaml(
        tmp_path,
        log,
        rest="  filters:\n    - name: grep\n      match: '*'\n      regex: a b\n      processors:\n"
        "        logs: []\n  outputs:\n    - name: stdout\n      match: '*'",
    )
    with pytest.raises(ConfigError, match="processors belong to inputs and outputs, not filters"):
        load_config(config)


def test_processors_survive_conversion_to_yaml_and_refuse_classic(tmp_path: Path) -> None:
    log = write(tmp_path / "a.log", "")
    config = tail_yaml(
        tmp_path,
        log,
        "      processors:\n        logs:\n          - name: content_modifier\n            action: delete\n"
        "            key: x",
        "  outputs:\n    - name: stdout\n      match: '*'",
    )
    text = to_yaml(load_config(config))
    again = write(tmp_path / "again.yaml", text)
    reloaded = load_config(again)
    [section] = reloaded.processors_of(reloaded.inputs[0])
    assert section.get("action") == "delete"
    with pytest.raises(ConfigError, match="processors exist only in the YAML format"):
        to_classic(reloaded)
    from click.testing import CliRunner

    from kubetrail.cli.main import main

    result = CliRunner().invoke(main, ["convert", str(again), "--to", "classic"])
    assert result.exit_code == 2 and "processors exist only in the YAML format" in result.output


# -- external plugins and unknown names ----------------------------------------------------


def test_yaml_plugins_are_refused_by_name(tmp_path: Path) -> None:
    config = write(
        tmp_path / "p.yaml",
        "plugins:\n  - /usr/lib/fluent-bit/out_gstdout.so\npipeline:\n  inputs:\n    - name: dummy\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert "external plugin '/usr/lib/fluent-bit/out_gstdout.so' (a .so) cannot run in kubetrail" in str(info.value)
    assert f"{config}:2" in str(info.value)


def test_plugins_file_is_read_and_its_plugins_refused(tmp_path: Path) -> None:
    write(tmp_path / "plugins.conf", "[PLUGINS]\n    Path /opt/fluent-bit/plugins/in_custom.so\n")
    write(tmp_path / "empty.conf", "[PLUGINS]\n# nothing loaded yet\n")
    log = write(tmp_path / "a.log", "")
    body = f"[INPUT]\n    name tail\n    path {log}\n[OUTPUT]\n    name stdout\n    match *\n"
    refused = write(tmp_path / "a.conf", "[SERVICE]\n    plugins_file plugins.conf\n" + body)
    with pytest.raises(ConfigError) as info:
        load_config(refused)
    assert "external plugin '/opt/fluent-bit/plugins/in_custom.so' (a .so) cannot run in kubetrail" in str(info.value)
    assert "plugins.conf:2" in str(info.value)
    fine = write(tmp_path / "b.conf", "[SERVICE]\n    plugins_file empty.conf\n" + body)
    Pipeline(load_config(fine))
    missing = write(tmp_path / "c.conf", "[SERVICE]\n    plugins_file nowhere.conf\n" + body)
    with pytest.raises(ConfigError, match="plugins file not found"):
        load_config(missing)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("[FILTER]\n    name kubernets\n    match *\n", "did you mean 'kubernetes'?"),
        ("[FILTER]\n    name ecs\n    match *\n", "'ecs' is a Fluent Bit filter plugin that kubetrail does not have"),
        ("[FILTER]\n    name my_filter\n    match *\n", "not one of Fluent Bit's own plugins either"),
        ("[OUTPUT]\n    name datadog\n    match *\n", "'datadog' is a Fluent Bit output plugin"),
    ],
)
def test_unknown_plugins_name_the_closest_and_whose_name_it_is(tmp_path: Path, section: str, message: str) -> None:
    log = write(tmp_path / "a.log", "")
    config = write(
        tmp_path / "a.conf",
        f"[INPUT]\n    name tail\n    path {log}\n{section}[OUTPUT]\n    name stdout\n    match *\n",
    )
    with pytest.raises(ConfigError) as info:
        Pipeline(load_config(config))
    assert message in str(info.value)


def test_options_with_no_effect_are_accepted_and_noted_once(tmp_path: Path) -> None:
    log = write(tmp_path / "a.log", "")
    config = write(
        tmp_path / "a.conf",
        f"""[SERVICE]
    hot_reload on
    config_watch on
    log_file /var/log/fluent-bit.log
[INPUT]
    name tail
    path {log}
    docker_mode_parser first_line
    db.compare_filename on
[INPUT]
    name tail
    path {log}
    db.compare_filename on
[FILTER]
    name kubernetes
    match *
    use_journal off
    cache_use_docker_id on
    dummy_meta off
[OUTPUT]
    name stdout
    match *
""",
    )
    notes = Pipeline(load_config(config)).describe()["notes"]
    text = "\n".join(notes)
    for option in ("hot_reload", "config_watch", "log_file", "docker_mode_parser", "use_journal", "dummy_meta"):
        assert f"option '{option}'" in text
    assert text.count("'db.compare_filename'") == 1, "noted once per plugin and option"
    assert f"{config}:2:" in text  # where the user wrote it


# -- content_modifier ----------------------------------------------------------------------


def modify(body: dict[str, Any], meta: dict[str, Any] | None = None, **props: Any) -> Record:
    transform = build(ContentModifierTransform, **props)
    record = Record("t", 1, None, orjson.dumps(body), meta=meta)
    transform.process([record])
    return record


@pytest.mark.parametrize(
    ("props", "before", "after"),
    [
        ({"action": "insert", "key": "a", "value": "x"}, {"b": 1}, {"b": 1, "a": "x"}),
        ({"action": "insert", "key": "a", "value": "x"}, {"a": 1}, {"a": 1}),
        ({"action": "upsert", "key": "a", "value": "x"}, {"a": 1}, {"a": "x"}),
        ({"action": "delete", "key": "a"}, {"a": 1, "b": 2}, {"b": 2}),
        ({"action": "rename", "key": "a", "value": "c"}, {"a": 1, "b": 2}, {"c": 1, "b": 2}),
        ({"action": "rename", "key": "a", "value": "b"}, {"a": 1, "b": 2}, {"b": 1}),
        ({"action": "hash", "key": "a"}, {"a": 42}, {"a": hashlib.sha256(b"42").hexdigest()}),
        (
            {"action": "extract", "key": "a", "pattern": r"^(?<verb>\w+) (?<path>/\S*)"},
            {"a": "GET /x HTTP/1.1"},
            {"a": "GET /x HTTP/1.1", "verb": "GET", "path": "/x"},
        ),
        ({"action": "convert", "key": "a", "converted_type": "int"}, {"a": "17"}, {"a": 17}),
        ({"action": "convert", "key": "a", "converted_type": "double"}, {"a": "1.5"}, {"a": 1.5}),
        ({"action": "convert", "key": "a", "converted_type": "boolean"}, {"a": "true"}, {"a": True}),
        ({"action": "convert", "key": "a", "converted_type": "string"}, {"a": 3}, {"a": "3"}),
        ({"action": "convert", "key": "a", "converted_type": "int"}, {"a": "x"}, {"a": "x"}),
        (
            {"action": "upsert", "key": "$kubernetes['labels']['team']", "value": "core"},
            {"kubernetes": {"labels": {"app": "a"}}},
            {"kubernetes": {"labels": {"app": "a", "team": "core"}}},
        ),
        ({"action": "delete", "key": "$k['missing']"}, {"k": {"a": 1}}, {"k": {"a": 1}}),
    ],
)
def test_content_modifier_actions(props: dict[str, str], before: dict[str, Any], after: dict[str, Any]) -> None:
    record = modify(before, **props)
    assert record.body == after
    # A record nothing changed keeps its original bytes (sinks write them as they are).
    assert (record.raw is not None) == (before == after)


def test_content_modifier_attributes_context_acts_on_metadata() -> None:
    record = modify({"a": 1}, {"x": "1"}, action="upsert", key="source", value="node", context="attributes")
    assert record.body == {"a": 1} and record.meta == {"x": "1", "source": "node"}


@pytest.mark.parametrize(
    ("props", "message"),
    [
        ({"action": "insert", "key": "a"}, "needs a 'value'"),
        ({"action": "insert", "value": "a"}, "needs a 'key'"),
        ({"action": "extract", "key": "a", "pattern": "(x)"}, "no named group"),
        ({"action": "convert", "key": "a"}, "converted_type"),
        ({"action": "upsert", "key": "a", "value": "b", "context": "otel_resource_attributes"}, "OpenTelemetry"),
        ({"action": "upsert", "key": "a", "value": "b", "context": "nowhere"}, "bad context"),
    ],
)
def test_content_modifier_config_errors(props: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(ContentModifierTransform, **props)


# -- rewrite_tag ---------------------------------------------------------------------------


def rewrite(body: dict[str, Any], *rules: str, tag: str = "kube.var.log.app") -> tuple[list[Record], list[Batch]]:
    transform = build(RewriteTagTransform, rule=list(rules))
    done: list[bool] = []
    batch = Batch(tag, [Record(tag, 5, body, identity=("f", 0))], AckToken(done.append))
    out, copies = transform.process_emitting(batch)
    return out.records, copies


@pytest.mark.parametrize(
    ("rule", "tag"),
    [
        ("$level ^(error|warn)$ alert.$1 false", "alert.error"),
        ("$level ^error$ $TAG.errors false", "kube.var.log.app.errors"),
        ("$level ^error$ ns.$TAG[3] false", "ns.app"),
        ("$level ^error$ x.$TAG[9] false", "x."),
        ("$level ^e(rr)(or)$ $0.$2.$1 false", "error.or.rr"),
        (
            "$kubernetes['namespace_name'] ^(shop)$ ns.$kubernetes['namespace_name'].$kubernetes['pod'] false",
            "ns.shop.web-1",
        ),
        ('$msg "^disk (\\w+) full$" disk.$1 false', "disk.sda"),
    ],
)
def test_rewrite_tag_new_tags(rule: str, tag: str) -> None:
    body = {"level": "error", "msg": "disk sda full", "kubernetes": {"namespace_name": "shop", "pod": "web-1"}}
    kept, copies = rewrite(body, rule)
    assert kept == []
    [copy] = copies
    assert copy.tag == tag and [r.tag for r in copy.records] == [tag]
    assert copy.records[0].body == body and copy.records[0].time_ns == 5
    assert copy.records[0].identity == ("f", 0, "rewrite_tag", tag)


def test_rewrite_tag_keep_first_match_and_no_match() -> None:
    body = {"level": "error"}
    kept, copies = rewrite(body, "$level ^error$ first true", "$level ^error$ second false")
    assert [r.body for r in kept] == [body] and [c.tag for c in copies] == ["first"]
    kept, copies = rewrite(body, "$missing . x false", "$level ^info$ y false")
    assert [r.body for r in kept] == [body] and copies == []


def test_rewrite_tag_copy_holds_the_original_token() -> None:
    transform = build(RewriteTagTransform, rule="$a ^1$ copy true")
    done: list[bool] = []
    token = AckToken(done.append)
    batch = Batch("t", [Record("t", 1, {"a": "1"}), Record("t", 2, {"a": "1"})], token)
    out, [copy] = transform.process_emitting(batch)
    assert len(out) == 2 and len(copy) == 2
    token.seal()  # routing of the original finished and it was delivered...
    assert done == [], "the copy is not delivered yet"
    assert copy.ack is not None
    copy.ack.seal()
    assert done == [True]


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("$a ^x$ y", "4 parts"),
        ("$a ^(x$ y true", "bad rule"),
        ("$a ^x$ y maybe", "bad rule"),
    ],
)
def test_rewrite_tag_bad_rules(rule: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(RewriteTagTransform, rule=rule)


def test_rule_tokens_keep_quoted_spaces() -> None:
    assert split_rule('$log "^a b (c)$" new.$1 false') == ["$log", "^a b (c)$", "new.$1", "false"]


def rewrite_pipeline(tmp_path: Path, log: Path, filters: str, outputs: str) -> Path:
    return tail_yaml(tmp_path, log, rest=f"  filters:\n{filters}\n  outputs:\n{outputs}")


async def test_rewritten_records_are_routed_again_and_checkpointed_after_delivery(tmp_path: Path) -> None:
    log = write(tmp_path / "a.log", jsonl({"n": 0, "level": "info"}, {"n": 1, "level": "error"}, {"n": 2}))
    config = rewrite_pipeline(
        tmp_path,
        log,
        """    - name: rewrite_tag
      match: kube.*
      rule: $level ^error$ alerts.$TAG[1] false
      emitter_name: alerts_emitter
    - name: modify
      match: alerts.*
      add: routed yes""",
        file_output_yaml(tmp_path, "kube.*", "kube.jsonl") + file_output_yaml(tmp_path, "alerts.*", "alerts.jsonl"),
    )
    pipeline = Pipeline(load_config(config))
    alerts = pipeline.runners[1]
    gate = asyncio.Event()
    real_write = alerts.sink.write

    async def gated(batch: Batch) -> None:
        await gate.wait()
        await real_write(batch)

    alerts.sink.write = gated  # type: ignore[method-assign]
    task = asyncio.create_task(pipeline.run())
    for _ in range(100):
        if written_json_lines(tmp_path / "out" / "kube.jsonl"):
            break
        await asyncio.sleep(0.05)
    assert [r["n"] for r in written_json_lines(tmp_path / "out" / "kube.jsonl")] == [0, 2]
    await asyncio.sleep(0.2)
    assert stored_offset(tmp_path / "tail.db") <= 0, "checkpoint moved before the copy was delivered"
    gate.set()
    assert await asyncio.wait_for(task, 20) == 0
    # The copy went through the filters of its new tag (modify) and reached its own output.
    assert written_json_lines(tmp_path / "out" / "alerts.jsonl") == [{"n": 1, "level": "error", "routed": "yes"}]
    assert stored_offset(tmp_path / "tail.db") == log.stat().st_size
    text = generate_latest(pipeline.metrics.registry).decode()
    assert 'kubetrail_records_out_total{component="alerts_emitter",kind="source",plugin="emitter"} 1.0' in text


def test_rewrite_tag_filters_feeding_each_other_are_refused(tmp_path: Path) -> None:
    log = write(tmp_path / "a.log", "")
    config = rewrite_pipeline(
        tmp_path,
        log,
        """    - name: rewrite_tag
      match: a.*
      rule: $x . b.loop false
    - name: rewrite_tag
      match: b.*
      rule: $x . a.loop false""",
        "    - name: stdout\n      match: '*'",
    )
    with pytest.raises(ConfigError) as info:
        Pipeline(load_config(config))
    assert (
        "rewrite_tag filters re-emit into each other in a loop (rewrite_tag.0 -> rewrite_tag.1 -> rewrite_tag.0)"
        in str(info.value)
    )


async def test_a_new_tag_matching_its_own_filter_does_not_loop(tmp_path: Path) -> None:
    log = write(tmp_path / "a.log", jsonl({"n": 0, "level": "error"}))
    config = rewrite_pipeline(
        tmp_path,
        log,
        """    - name: rewrite_tag
      match: kube.*
      rule: $level ^error$ kube.errors true""",
        file_output_yaml(tmp_path, "*", "all.jsonl"),
    )
    pipeline = await run_pipeline(config)
    records = written_json_lines(tmp_path / "out" / "all.jsonl")
    assert records == [{"n": 0, "level": "error"}, {"n": 0, "level": "error"}]  # original + one copy
    assert any("matches the filter's own match" in note for note in pipeline.notes)


async def test_dynamic_tags_that_would_loop_at_run_time_stop(tmp_path: Path) -> None:
    """Tags built from the record cannot be checked when the config is read: two filters that
    send a record back and forth stop after each has seen it once (a copy never passes a
    filter it came out of)."""
    log = write(tmp_path / "a.log", jsonl({"n": 0, "to": "x"}))
    config = rewrite_pipeline(
        tmp_path,
        log,
        """    - name: rewrite_tag
      match: kube.*
      rule: $to ^(.*)$ hop.$to false
    - name: rewrite_tag
      match: hop.*
      rule: $to ^(.*)$ kube.$to false""",
        file_output_yaml(tmp_path, "*", "all.jsonl"),
    )
    await run_pipeline(config)
    assert written_json_lines(tmp_path / "out" / "all.jsonl") == [{"n": 0, "to": "x"}]


# -- options that change behaviour -----------------------------------------------------------


async def test_tail_docker_mode_joins_docker_split_lines(tmp_path: Path) -> None:
    log = write(
        tmp_path / "c.log",
        jsonl(
            {"log": "first half, ", "stream": "stdout", "time": "2024-05-01T10:00:00.000000001Z"},
            {"log": "one line\n", "stream": "stderr", "time": "2024-05-01T10:00:00.000000002Z"},
            {"log": "second half\n", "stream": "stdout", "time": "2024-05-01T10:00:00.000000003Z"},
        ),
    )
    docker = "    docker_mode on\n    docker_mode_flush 4"
    source = tail_input(log, tag="kube.*", parser="docker", extra=docker)
    config = write(tmp_path / "p.conf", f"[SERVICE]\n    grace 2\n{source}{file_output(tmp_path / 'out')}")
    pipeline = await run_pipeline(config)
    assert [(r["stream"], r["log"]) for r in written_json_lines(tmp_path / "out" / "out.jsonl")] == [
        ("stderr", "one line\n"),
        ("stdout", "first half, second half\n"),
    ]
    assert pipeline.sources[0].instance.multiline == ("docker",)
    assert pipeline.sources[0].instance.flush_seconds == 4.0


TAG_REGEX = r"(?<pod_name>[a-z0-9][-a-z0-9.]*)_(?<namespace_name>[^_]+)_(?<container_name>.+)-[a-z0-9]{64}\.log$"


async def test_tail_tag_regex_names_parts_of_the_path(tmp_path: Path) -> None:
    # Fluent Bit searches the whole path, as kubelet's /var/log/containers has no "_" before the
    # file name; pytest's directory names have some, so the files go to a plain directory.
    logs = Path("/tmp") / uuid.uuid4().hex / "containers"
    name = "web-1_shop_app-" + "a" * 64 + ".log"
    write(logs / name, jsonl({"n": 1}))
    source = tail_input(f"{logs}/*.log", tag="kube.<namespace_name>.<pod_name>.<container_name>", parser=None)
    output = file_output(tmp_path / "out", match="kube.shop.web-1.app")
    config = write(tmp_path / "p.conf", f"[SERVICE]\n    grace 2\n{source}    tag_regex {TAG_REGEX}\n{output}")
    try:
        await run_pipeline(config)
    finally:
        shutil.rmtree(logs.parent)
    assert len(written_json_lines(tmp_path / "out" / "out.jsonl")) == 1


def test_kubernetes_merge_log_trim_and_merge_parser() -> None:
    from kubetrail.transforms.kubernetes import KubernetesTransform

    tag = "kube.var.log.containers.web-1_shop_app-" + "c" * 64 + ".log"
    body = '{"msg":"done\\r\\n","n":1}'
    trimmed = build(KubernetesTransform, kube_url="http://127.0.0.1:1", merge_log="on")
    assert trimmed.process([Record(tag, 1, {"log": body})])[0].body["msg"] == "done"
    kept = build(KubernetesTransform, kube_url="http://127.0.0.1:1", merge_log="on", merge_log_trim="off")
    assert kept.process([Record(tag, 1, {"log": body})])[0].body["msg"] == "done\r\n"
    klog = build(KubernetesTransform, kube_url="http://127.0.0.1:1", merge_log="on", merge_parser="klog")
    line = 'I0501 10:00:00.000000       1 main.go:10] "started" port=8080'
    merged = klog.process([Record(tag, 1, {"log": line})])[0].body
    assert merged["msg"] == "started" and merged["port"] == "8080"
    with pytest.raises(ConfigError, match="unknown parser 'nope'"):
        build(KubernetesTransform, kube_url="http://127.0.0.1:1", merge_log="on", merge_parser="nope")


# -- processor conditions ----------------------------------------------------------------------


async def test_conditional_processors_as_in_fluent_bits_docs(tmp_path: Path) -> None:
    """The docs' "multiple processors with conditions" example: each processor acts only on the
    records that meet its condition; the others pass it unchanged and keep their order."""
    log = write(
        tmp_path / "a.log",
        jsonl(
            {"log": "Error: Connection refused", "level": "error", "service": "api-gateway"},
            {"log": "ok", "level": "info", "service": "api-gateway"},
            {"log": "read timeout", "level": "error", "service": "web"},
            {"log": "crash", "level": "fatal", "service": "database", "request": {"status_code": 503}},
        ),
    )
    config = tail_yaml(
        tmp_path,
        log,
        """      processors:
        logs:
          - name: content_modifier
            action: insert
            key: alert
            value: true
            condition:
              op: and
              rules:
                - field: "$level"
                  op: eq
                  value: "error"
                - field: "$service"
                  op: in
                  value: ["api-gateway", "authentication", "database"]
          - name: content_modifier
            action: insert
            key: paging_required
            value: true
            condition:
              op: and
              rules:
                - field: "$log"
                  op: regex
                  value: "(?i)(connection refused|timeout|crash)"
                - field: "$level"
                  op: in
                  value: ["error", "fatal"]
          - name: grep
            exclude: service ^database$
            condition:
              op: or
              rules:
                - field: "$request['status_code']"
                  op: gte
                  value: 500""",
        "  outputs:\n" + file_output_yaml(tmp_path, "*", "out.jsonl"),
    )
    await run_pipeline(config)
    assert written_json_lines(tmp_path / "out" / "out.jsonl") == [
        {
            "log": "Error: Connection refused",
            "level": "error",
            "service": "api-gateway",
            "alert": "true",
            "paging_required": "true",
        },
        {"log": "ok", "level": "info", "service": "api-gateway"},
        {"log": "read timeout", "level": "error", "service": "web", "paging_required": "true"},
    ]
    converted = load_config(write(tmp_path / "again.yaml", to_yaml(load_config(config))))
    assert len(converted.conditions) == 3


@pytest.mark.parametrize(
    ("rule", "body", "holds"),
    [
        ({"field": "$status", "op": "eq", "value": 200}, {"status": 200}, True),
        ({"field": "$status", "op": "eq", "value": 200}, {"status": 200.0}, True),
        ({"field": "$status", "op": "eq", "value": 200}, {"status": "200"}, False),
        ({"field": "$status", "op": "neq", "value": 200}, {}, False),
        ({"field": "$status", "op": "not_in", "value": [200]}, {}, False),
        ({"field": "$status", "op": "neq", "value": 200}, {"status": 404}, True),
        ({"field": "$t", "op": "gt", "value": 100}, {"t": "150"}, True),
        ({"field": "$t", "op": "lte", "value": 100}, {"t": "fast"}, False),
        ({"field": "$a['b']", "op": "regex", "value": "^x"}, {"a": {"b": "xy"}}, True),
        ({"field": "$a['b']", "op": "not_regex", "value": "^x"}, {"a": {"b": "xy"}}, False),
        ({"field": "$flag", "op": "eq", "value": True}, {"flag": True}, True),
        ({"field": "$flag", "op": "eq", "value": True}, {"flag": 1}, False),
    ],
)
def test_condition_rules(rule: dict[str, Any], body: dict[str, Any], holds: bool) -> None:
    from kubetrail.core.config.condition import parse_condition
    from kubetrail.core.errors import Location

    condition = parse_condition({"op": "and", "rules": [rule]}, Location("<test>", 1))
    assert condition.holds(body) is holds


# -- es: Elastic Cloud, target_index, aws_auth -------------------------------------------------


def test_es_cloud_id_cloud_auth_target_index_and_aws_auth() -> None:
    import base64

    from kubetrail.sinks.es import EsSink, cloud_settings

    encoded = base64.b64encode(b"us-central1.gcp.cloud.es.io$abc123$kib456").decode().rstrip("=")
    assert cloud_settings(f"my-deployment:{encoded}", "elastic:s3cret") == {
        "host": "abc123.us-central1.gcp.cloud.es.io",
        "port": 443,
        "tls": True,
        "http_user": "elastic",
        "http_passwd": "s3cret",
    }
    with_port = base64.b64encode(b"eu-west-1.aws.found.io:9243$es1$kb1").decode()
    assert cloud_settings(f"x:{with_port}", None)["port"] == 9243
    with pytest.raises(ConfigError, match="does not decode"):
        cloud_settings("x:" + base64.b64encode(b"nothing").decode(), None)

    sink = build(EsSink, common=(), cloud_id=f"my-deployment:{encoded}", cloud_auth="elastic:s3cret")
    assert (sink.http.settings.host, sink.http.settings.port) == ("abc123.us-central1.gcp.cloud.es.io", 443)
    assert sink.http.settings.ssl_context is not None
    assert any(name == "Authorization" and value.startswith("Basic ") for name, value in sink.http.settings.headers)

    targeted = build(EsSink, index="fallback", target_index="fluent-$kubernetes['namespace_name']")
    assert targeted._index_for(Record("t", 0, {"kubernetes": {"namespace_name": "shop"}})) == "fluent-shop"
    assert targeted._index_for(Record("t", 0, {"other": 1})) == "fallback"
    with pytest.raises(ConfigError, match="aws_auth on"):
        build(EsSink, aws_auth="on", aws_region="us-west-2")
    assert {"aws_region", "aws_profile", "target_index"} <= {o.name for o in EsSink.options}


def test_loki_label_map_path_and_structured_metadata(tmp_path: Path) -> None:
    from kubetrail.sinks.loki import LokiSink

    label_map = write(tmp_path / "map.json", '{"sub": {"stream": "stream"}, "kubernetes": {"pod_name": "pod"}}')
    sink = build(
        LokiSink,
        labels="job=fluentbit",
        label_map_path=str(label_map),
        structured_metadata="trace_id=$trace['id'],source=node",
        structured_metadata_map_keys="$extra",
    )
    body = {
        "log": "hi",
        "sub": {"stream": "stdout", "id": "x"},
        "kubernetes": {"pod_name": "web-1"},
        "trace": {"id": "abc"},
        "extra": {"a": 1},
    }
    push = orjson.loads(sink._push_body([(0, Record("t", 5, body))]))
    [stream] = push["streams"]
    assert stream["stream"] == {"job": "fluentbit", "stream": "stdout", "pod": "web-1"}
    [[ts, line, metadata]] = stream["values"]
    assert ts == "5" and metadata == {"source": "node", "trace_id": "abc", "a": "1"}
    assert "stream" not in orjson.loads(line)["sub"]  # a key that became a label leaves the line
    with pytest.raises(ConfigError, match="cannot read the label map"):
        build(LokiSink, label_map_path=str(tmp_path / "missing.json"))
    plain = build(LokiSink)
    [[_, _]] = orjson.loads(plain._push_body([(0, Record("t", 5, {"log": "x"}))]))["streams"][0]["values"]


def test_http_output_fluent_bit_options() -> None:
    from kubetrail.sinks.http import HttpOutputSink

    sink = build(HttpOutputSink, **{"http__response_timeout": "5s", "oauth2__client_id": "x", "aws_region": "r"})
    assert sink.http.settings.io_timeout == 5.0
    for key, value, message in (
        ("aws_auth", "on", "AWS SigV4 signing is not supported"),
        ("oauth2__enable", "on", "OAuth 2.0 client credentials are not supported"),
        ("proxy", "http://proxy:3128", "an HTTP proxy is not supported"),
        ("body_key", "$log", "one request per record is not supported"),
    ):
        with pytest.raises(ConfigError, match=message):
            build(HttpOutputSink, **{key: value})


async def test_multiline_as_an_input_processor_joins_within_each_batch(tmp_path: Path) -> None:
    trace = ["Traceback (most recent call last):", '  File "a.py", line 1, in <module>', "ValueError: x"]
    log = write(tmp_path / "a.log", jsonl(*({"log": line} for line in ["start", *trace])))
    config = tail_yaml(
        tmp_path,
        log,
        """      processors:
        logs:
          - name: multiline
            multiline.parser: python""",
        "  outputs:\n" + file_output_yaml(tmp_path, "*", "out.jsonl"),
    )
    pipeline = await run_pipeline(config)
    assert written_json_lines(tmp_path / "out" / "out.jsonl") == [{"log": "start"}, {"log": "\n".join(trace)}]
    assert any("buffer has no effect in a processor" in note for note in pipeline.notes)


def test_stdout_filter_prints_and_passes_records_unchanged() -> None:
    import io

    from kubetrail.transforms.stdout import StdoutTransform

    transform = build(StdoutTransform)
    transform.stream = io.BytesIO()
    records = [Record("app", 1_500_000_000_000_000_000, None, b'{"a":1}'), Record("app", 0, {"b": 2})]
    out = transform.process(records)
    assert out == records and records[0].raw == b'{"a":1}'  # untouched: its bytes still valid
    assert transform.stream.getvalue() == (
        b'[0] app: [1500000000.000000000, {"a":1}]\n[1] app: [0.000000000, {"b":2}]\n'
    )


def test_service_storage_inherit_memrb_and_yaml_grouped_keys(tmp_path: Path) -> None:
    log = write(tmp_path / "a.log", "")
    config = write(
        tmp_path / "p.yaml",
        f"""
service:
  storage:
    path: {tmp_path / "buffers"}
    type: filesystem
    inherit: on
    backlog:
      mem_limit: 10M
pipeline:
  inputs:
    - name: tail
      path: {log}
    - name: tail
      path: {log}
      storage.type: memory
    - name: tail
      path: {log}
      storage.type: memrb
  outputs:
    - name: stdout
      match: '*'
""",
    )
    pipeline = Pipeline(load_config(config))
    assert pipeline.service["storage.path"] == str(tmp_path / "buffers")
    assert pipeline.service["storage.backlog.mem_limit"] == 10 * 1024 * 1024
    assert [s.config["storage.type"] for s in pipeline.sources] == ["filesystem", "memory", "memory"]
    assert any("storage.type memrb is memory here" in note for note in pipeline.notes)
