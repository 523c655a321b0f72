"""Alerts in the timeline: the real ``detect`` filter (Falco's k8s_audit rules, unchanged) on the
story's audit records, its alerts kept by the real ``sqlite`` output, and ``kubetrail history``,
``who`` and ``search`` through the real command line: each alert right after the record that
fired it (also when it was stored first, or without its record), idempotent by (auditID, stage,
rule), simple filters, redaction, retention, and a store of the previous schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubetrail.core.record import Record, identity_key
from kubetrail.sinks.sqlite import StoreWriter, alert_ident, row_of
from tests.unit.helpers import write
from tests.unit.history_helpers import V2_SCHEMA, cli, entries, fill
from tests.unit.history_story import SA_CI, SECRET_VALUE, T0, alerts, audit, story


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The alerts arrive first (their batch is committed before their records'), then the story."""
    path = tmp_path_factory.mktemp("alerts") / "s.db"
    records = story()
    fill(path, alerts(records), records)
    return path


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


def test_the_store_keeps_alerts_with_their_columns_and_link(store: Path) -> None:
    got = rows(
        store,
        "SELECT r.kind, r.user, r.verb, r.resource, r.namespace, r.name, r.code, a.audit_id, a.stage, a.rule,"
        " a.priority, a.level, a.tags FROM records r JOIN alerts a ON a.id = r.id ORDER BY r.time_ns, a.rule",
    )
    assert len(got) == 9
    assert ("alert", "mallory", "delete", "deployments", "shop", "web", 403, "a-forbid", "ResponseComplete",
            "K8s Request Forbidden", "Warning", 4, '["k8s","kubetrail-example"]') in got  # fmt: skip
    # K8s Secret Get Successfully prints user, secret, ns and resource (not the verb).
    assert (
        "alert", SA_CI, None, "secrets", "shop", "db", 200, "a-secret", "ResponseComplete",
        "K8s Secret Get Successfully", "Error", 3, '["k8s"]',
    ) in got  # fmt: skip
    # The link: the audit record is found by its own identity (auditID, stage).
    ident = bytes.fromhex(identity_key(Record("", 0, None, b"{}", ("a-forbid", "ResponseComplete"))) or "")
    assert rows(store, f"SELECT kind, user FROM records WHERE ident = x'{ident.hex()}'") == [("audit", "mallory")]


def test_an_alert_is_stored_once_by_auditid_stage_rule(tmp_path: Path) -> None:
    records = story()
    fired = alerts(records)
    # The store's identity of an alert is the filter's, with or without the record's identity.
    for alert in fired:
        assert row_of(alert)[0] == bytes.fromhex(identity_key(alert) or "")
        bare = Record("from.a.file", alert.time_ns + 5, None, alert.json_bytes())
        assert row_of(bare)[0] == row_of(alert)[0] == alert_ident(*alert.identity[:2], alert.identity[3])  # type: ignore[index]
    path = tmp_path / "s.db"
    fill(path, records + fired)
    before = rows(path, "SELECT count(*), (SELECT count(*) FROM alerts) FROM records")
    # The same alerts again (a replay), and read back from a file without their identity.
    fill(path, fired, [Record("from.a.file", a.time_ns, None, a.json_bytes()) for a in fired], alerts(records))
    assert rows(path, "SELECT count(*), (SELECT count(*) FROM alerts) FROM records") == before
    # A different rule on the same request is another alert.
    assert before[0][1] == 9


def test_history_shows_each_alert_right_after_its_record(store: Path) -> None:
    got = entries(store, "history", "deploy/shop/web")
    kinds = [(e["kind"], e.get("verb") or e.get("reason"), e.get("user"), e.get("rule")) for e in got]
    assert kinds == [
        ("audit", "create", "alice", None),
        ("alert", "create", "alice", "Disallowed K8s User"),
        ("alert", "create", "alice", "K8s Deployment Created"),
        ("event", "ScalingReplicaSet", None, None),
        ("audit", "update", "alice", None),
        ("alert", "update", "alice", "Disallowed K8s User"),
        ("event", "ScalingReplicaSet", None, None),
        ("audit", "get", "alice", None),
        ("alert", "get", "alice", "Disallowed K8s User"),
        ("audit", "patch", "bob", None),
        ("alert", "patch", "bob", "Disallowed K8s User"),
        ("event", "BackOff", None, None),
        ("audit", "delete", "mallory", None),
        ("alert", "delete", "mallory", "Disallowed K8s User"),
        ("alert", "delete", "mallory", "K8s Request Forbidden"),
        ("event", "ScalingReplicaSet", None, None),
    ]
    create, first, second = got[:3]
    assert first["trigger_id"] == second["trigger_id"] == create["id"]
    assert (first["audit_id"], first["stage"]) == ("a-create", "ResponseComplete")
    assert first["priority"] == "Warning" and first["tags"] == ["k8s"]
    assert first["record"]["output_fields"]["ka.user.name"] == "alice"
    assert first["message"].startswith("K8s Operation performed by user not in allowed list of users (user=alice")
    assert first["output"].endswith(first["message"]) and first["output"] != first["message"]  # Falco's time prefix
    # The scale request: the rule printed target web/deployments, the subresource comes from the record.
    text = cli(store, "history", "deploy/shop/web").output.splitlines()
    refused = next(i for i, line in enumerate(text) if "delete deployments/shop/web by mallory" in line)
    assert text[refused + 1].split("  ", 2)[1:] == [
        "ALERT",
        "Warning Disallowed K8s User: K8s Operation performed by user not in allowed list of users (user=mallory"
        " target=web/deployments verb=delete uri=/apis/apps/v1/namespaces/shop/deployments/web resp=403)",
    ]
    assert text[refused + 2].split("  ", 2)[2].startswith("Warning K8s Request Forbidden: K8s request forbidden")


def test_who_and_the_secret_read(store: Path) -> None:
    got = entries(store, "who", SA_CI)
    assert [(e["kind"], e["verb"], e["resource"], e["name"], e.get("rule")) for e in got] == [
        ("audit", "get", "secrets", "db", None),
        ("alert", "get", "secrets", "db", "K8s Secret Get Successfully"),
    ]
    assert got[1]["priority"] == "Error" and got[1]["trigger_id"] == got[0]["id"]
    writes = entries(store, "who", "alice", "--writes")
    assert [(e["kind"], e["verb"]) for e in writes] == [
        ("audit", "create"),
        ("alert", "create"),
        ("alert", "create"),
        ("audit", "update"),
        ("alert", "update"),
    ]
    assert SECRET_VALUE not in orjson.dumps(entries(store, "history", "secrets/shop/db")).decode()


def test_search_alerts_by_priority_and_rule(store: Path) -> None:
    severe = entries(store, "search", "--kind", "alert", "--priority", "error")
    assert [(e["rule"], e["user"]) for e in severe] == [("K8s Secret Get Successfully", SA_CI)]
    # Away from its record, an alert names it.
    trigger = severe[0]["trigger"]
    assert (trigger["verb"], trigger["resource"], trigger["name"], trigger["stage"]) == (
        "get",
        "secrets",
        "db",
        "ResponseComplete",
    )
    assert trigger["summary"].startswith(f"get secrets/shop/db by {SA_CI}")
    text = cli(store, "search", "--priority", "error").output
    assert f"fired by 2025-12-05T02:00:40.000Z get secrets/shop/db by {SA_CI}" in text
    warnings = entries(store, "search", "--priority", "WARNING")  # --priority alone means alerts
    assert len(warnings) == 8 and {e["priority"] for e in warnings} == {"Warning", "Error"}
    by_rule = entries(store, "search", "--rule", "K8s Request Forbidden")
    assert [(e["user"], e["code"] if "code" in e else e["record"]["output_fields"]["ka.response.code"])
            for e in by_rule] == [("mallory", "403")]  # fmt: skip
    assert [e["user"] for e in entries(store, "search", "--kind", "alert", "--user", "bob")] == ["bob"]
    # Without --kind, records and alerts that match: the refused request and its two alerts.
    assert [e["kind"] for e in entries(store, "search", "--code", "403")] == ["audit", "alert", "alert"]
    assert entries(store, "search", "--kind", "audit", "--code", "403")[0]["kind"] == "audit"
    # Nothing found is an empty answer, not an error.
    assert entries(store, "search", "--rule", "No Such Rule") == []


def test_bad_alert_filters(store: Path) -> None:
    result = cli(store, "search", "--priority", "loud")
    assert result.exit_code == 2 and "unknown priority 'loud'; allowed: emergency, alert, critical" in result.output
    result = cli(store, "search", "--kind", "event", "--rule", "x")
    assert result.exit_code == 2 and "--priority and --rule select alerts, not event records" in result.output


def test_an_alert_without_its_record(tmp_path: Path) -> None:
    """The audit record went elsewhere (or is not there yet): the alert stands at its own time,
    found by the object and user its rule's output printed."""
    records = story()
    path = tmp_path / "s.db"
    fill(path, [r for r in records if r.body.get("auditID") != "a-forbid"], alerts(records))
    got = entries(path, "history", "deploy/web")
    loose = [e for e in got if e.get("audit_id") == "a-forbid"]
    assert [(e["kind"], e["rule"], e["user"], e["verb"]) for e in loose] == [
        ("alert", "Disallowed K8s User", "mallory", "delete"),
        ("alert", "K8s Request Forbidden", "mallory", "delete"),
    ]
    # Disallowed K8s User prints no namespace: with one asked for, only the rule that prints it.
    in_shop = [e["rule"] for e in entries(path, "history", "deploy/shop/web") if e.get("audit_id") == "a-forbid"]
    assert in_shop == ["K8s Request Forbidden"]
    assert all("trigger_id" not in e and "trigger" not in e for e in loose)
    assert got.index(loose[0]) == len(got) - 3  # by its time: before the last Event
    # Its record arrives later: now both are shown right after it.
    fill(path, [r for r in records if r.body.get("auditID") == "a-forbid"])
    got = entries(path, "history", "deploy/shop/web")
    at = next(i for i, e in enumerate(got) if e["kind"] == "audit" and e["audit_id"] == "a-forbid")
    assert [e.get("trigger_id") for e in got[at + 1 : at + 3]] == [got[at]["id"]] * 2


def test_a_secret_an_output_printed_is_redacted(tmp_path: Path) -> None:
    """Falco's 'All K8s Audit Events' (switched on by a user's override, as Falco documents)
    prints %jevt.obj: for a Secret write that is the Secret. The alert shows it redacted."""
    override = write(
        tmp_path / "all.yaml",
        "- macro: consider_all_events\n  condition: (k8s_audit_always_true)\n  override:\n    condition: replace\n",
    )
    secret = {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "db"}, "data": {"password": SECRET_VALUE}}
    create = audit(60, "a-mksecret", "create", "alice", "secrets", "db", code=201, request=secret)
    fired = alerts([create], override)
    everything = [a for a in fired if a.body["rule"] == "All K8s Audit Events"]
    assert everything and SECRET_VALUE in everything[0].json_bytes().decode()  # as the filter emits it
    path = tmp_path / "s.db"
    fill(path, [create, *fired])
    for args in (("history", "secrets/shop/db"), ("search", "--kind", "alert"), ("who", "alice")):
        result = cli(path, *args, "--json")
        assert result.exit_code == 0 and "All K8s Audit Events" in result.output
        assert SECRET_VALUE not in result.output and "[REDACTED]" in result.output
    assert SECRET_VALUE not in cli(path, "search", "--kind", "alert").output


def test_retention_removes_an_alert_with_its_row(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    records = story()
    fill(path, records + alerts(records))
    writer = StoreWriter(path, retention_time=1.0)
    writer.open()
    try:
        # Keep what is newer than the secret read (T0+40s): the older alerts go, rows and links.
        writer.apply_retention(now_ns=T0 + 41 * 10**9)
    finally:
        writer.close()
    assert rows(path, "SELECT a.rule FROM alerts a LEFT JOIN records r ON r.id = a.id WHERE r.id IS NULL") == []
    assert sorted(r[0] for r in rows(path, "SELECT audit_id FROM alerts")) == ["a-forbid", "a-forbid", "a-secret"]


def test_a_schema_1_store_gets_the_alerts_table(tmp_path: Path) -> None:
    """A store written before alerts existed: readers find no alerts; the next writer adds the
    table (empty) and stores alerts from then on; nothing else changes."""
    from kubetrail.sinks import sqlite as store_module

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA application_id={store_module.APPLICATION_ID}")
    conn.execute("PRAGMA user_version=1")
    conn.executescript(V2_SCHEMA)
    conn.executemany(store_module.INSERT, [row_of(r) for r in story()])
    conn.commit()
    conn.close()
    assert entries(path, "search", "--kind", "alert") == []
    assert len(entries(path, "history", "deploy/shop/web")) == 9
    records = story()
    fill(path, alerts(records))
    assert rows(path, "PRAGMA user_version") == [(store_module.SCHEMA_VERSION,)]
    assert len(entries(path, "history", "deploy/shop/web")) == 16
