"""The ``detect`` filter in real pipelines: ``kubetrail run`` on a tailed audit log, and the audit
webhook with retries and a restart (alerts once per (auditID, stage, rule))."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.unit.helpers import write
from tests.unit.run_helpers import run_config
from tests.unit.test_audit_webhook import Pki, certs, event_list, start  # noqa: F401 - fixtures
from tests.unit.test_detect import BASE, audit

RULES = (
    BASE
    + """
- rule: Secret Read
  desc: d
  condition: ka.verb = get and ka.target.resource = secrets
  output: secret %ka.target.name read by %ka.user.name
  priority: NOTICE
  source: k8s_audit
"""
)


def events() -> list[dict[str, Any]]:
    """Two creates by alice, a harmless get, a secret read, a create's RequestReceived."""
    return [
        audit(auditID="create-1"),
        audit(auditID="create-2", user={"username": "alice"}, objectRef={"resource": "configmaps", "name": "c"}),
        audit(auditID="get-1", verb="get"),
        audit(auditID="secret-1", verb="get", objectRef={"resource": "secrets", "namespace": "shop", "name": "db"}),
        audit(auditID="create-1", stage="RequestReceived"),
    ]


def pipeline(tmp_path: Path, detect: str, lines: list[dict[str, Any]] | None = None) -> Path:
    write(tmp_path / "rules" / "base.yaml", RULES)
    log = write(tmp_path / "audit.log", "".join(orjson.dumps(e).decode() + "\n" for e in (lines or events())))
    return write(
        tmp_path / "p.conf",
        f"""
[SERVICE]
    grace 2
    log_level warn
[INPUT]
    name tail
    path {log}
    tag audit
    parser k8s_audit
    read_from_head on
    exit_on_eof on
    db {tmp_path / "tail.db"}
[FILTER]
    name kubernetes_audit
    match audit
[FILTER]
    name detect
    match audit
    rules_file rules/*.yaml
{detect}
[OUTPUT]
    name file
    match audit
    path {tmp_path / "out"}
    file audit.jsonl
    format plain
    mkdir on
[OUTPUT]
    name file
    match alert*
    path {tmp_path / "out"}
    file alerts.jsonl
    format plain
    mkdir on
""",
    )


def read(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_records_pass_unchanged_and_alerts_follow_falco_output(tmp_path: Path) -> None:
    done = run_config(pipeline(tmp_path, ""))
    assert done.returncode == 0, done.stderr
    records = read(tmp_path / "out" / "audit.jsonl")
    assert [(r["auditID"], r["stage"]) for r in records] == [(e["auditID"], e["stage"]) for e in events()]
    assert all("k8s.audit.id" in r for r in records)  # the kubernetes_audit filter's keys, nothing of detect's
    alerts = read(tmp_path / "out" / "alerts.jsonl")
    assert sorted((a["rule"], a["k8s.audit.id"], a["k8s.audit.stage"]) for a in alerts) == [
        ("Create By User", "create-1", "RequestReceived"),  # the rule names no stage
        ("Create By User", "create-1", "ResponseComplete"),
        ("Create By User", "create-2", "ResponseComplete"),
        ("Secret Read", "secret-1", "ResponseComplete"),
    ]
    secret = next(a for a in alerts if a["rule"] == "Secret Read")
    assert set(secret) == {
        "time",
        "rule",
        "priority",
        "source",
        "tags",
        "output",
        "output_fields",
        "hostname",
        "k8s.audit.id",
        "k8s.audit.stage",
        "trigger_tag",
    }
    assert secret["priority"] == "Notice" and secret["source"] == "k8s_audit" and secret["trigger_tag"] == "audit"
    assert secret["output"] == "03:00:00.123456000: Notice secret db read by alice"
    assert secret["output_fields"] == {"ka.target.name": "db", "ka.user.name": "alice"}
    assert secret["time"] == "2026-12-05T03:00:00.123456000Z"


def test_drop_matched_min_priority_and_rate_limit(tmp_path: Path) -> None:
    done = run_config(pipeline(tmp_path / "a", "    drop_matched on"))
    assert done.returncode == 0, done.stderr
    kept = [r["auditID"] for r in read(tmp_path / "a" / "out" / "audit.jsonl")]
    assert kept == ["get-1"]  # the four that fired a rule are gone; their alerts are not
    assert len(read(tmp_path / "a" / "out" / "alerts.jsonl")) == 4
    done = run_config(pipeline(tmp_path / "b", "    min_priority warning"))
    assert done.returncode == 0, done.stderr
    assert {a["rule"] for a in read(tmp_path / "b" / "out" / "alerts.jsonl")} == {"Create By User"}
    many = [audit(auditID=f"c{i}") for i in range(10)]
    done = run_config(pipeline(tmp_path / "c", "    rate_limit 3/1h", many))
    assert done.returncode == 0, done.stderr
    assert [a["k8s.audit.id"] for a in read(tmp_path / "c" / "out" / "alerts.jsonl")] == ["c0", "c1", "c2"]
    assert len(read(tmp_path / "c" / "out" / "audit.jsonl")) == 10


def test_bad_rules_file_stops_the_start_naming_file_line_and_rule(tmp_path: Path) -> None:
    config = pipeline(tmp_path, "")
    write(tmp_path / "rules" / "zz_mine.yaml", "- rule: Create By User\n  condition: and (\n  append: true\n")
    done = run_config(config)
    assert done.returncode == 2
    assert f"{tmp_path / 'rules' / 'zz_mine.yaml'}:2: rule 'Create By User': syntax error" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing started
    write(tmp_path / "rules" / "zz_mine.yaml", "- rule: Not There\n  enabled: false\n")
    done = run_config(config)
    assert done.returncode == 2 and "rule 'Not There': enables or disables a rule that is not defined" in done.stderr


async def test_webhook_retries_and_a_restart_give_each_alert_once(start: Any, tmp_path: Path, certs: Pki) -> None:  # noqa: F811
    rules = write(tmp_path / "rules.yaml", RULES)
    filters = f"""
[FILTER]
    name kubernetes_audit
    match audit
    db {tmp_path / "audit.db"}
[FILTER]
    name detect
    match audit
    rules_file {rules}
"""
    body = event_list([audit(auditID="w1"), audit(auditID="w1", stage="RequestReceived"), audit(auditID="w2")])
    receiver = await start(extra="    ack_timeout 0.5", filters=filters)
    receiver.sink.gate = asyncio.Event()
    assert (await receiver.post(body))[0] == 503  # not delivered in time: the API server retries
    retry = asyncio.create_task(receiver.post(body))
    await asyncio.sleep(0.3)
    assert not retry.done(), "the retry was answered before the alerts of its twin were delivered"
    receiver.sink.gate.set()
    assert (await asyncio.wait_for(retry, 5))[0] == 200
    assert (await receiver.post(body))[0] == 200  # late duplicate
    expected = [
        ("w1", "RequestReceived"),
        ("w1", "RequestReceived", "detect", "Create By User"),  # the rule names no stage
        ("w1", "ResponseComplete"),
        ("w1", "ResponseComplete", "detect", "Create By User"),
        ("w2", "ResponseComplete"),
        ("w2", "ResponseComplete", "detect", "Create By User"),
    ]
    assert sorted(receiver.sink.identities()) == expected
    receiver.pipeline.request_stop()
    assert await asyncio.wait_for(receiver.task, 30) == 0
    # A restart: the dedupe keys were stored once the alerts were delivered too.
    again = await start(filters=filters)
    assert (await again.post(body))[0] == 200
    assert again.sink.identities() == []
    fresh = event_list([audit(auditID="w3")])
    assert (await again.post(fresh))[0] == 200
    assert sorted(again.sink.identities()) == [
        ("w3", "ResponseComplete"),
        ("w3", "ResponseComplete", "detect", "Create By User"),
    ]


@pytest.mark.parametrize("option", ["    min_priority loud", "    rate_limit many", "    alert_tag"])
def test_bad_options(tmp_path: Path, option: str) -> None:
    done = run_config(pipeline(tmp_path, option))
    assert done.returncode == 2, done.stderr
