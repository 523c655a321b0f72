"""``kubetrail history``, ``who`` and ``search`` on the embedded store, through the real command
line (click's runner): timelines, what changed, redaction, time bounds, JSON, and the answers to
bad input (unknown kind, no records, missing or corrupt store)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from kubetrail.core.record import Record
from kubetrail.history.model import REDACTED, redact_record
from tests.unit.history_helpers import cli, entries, fill
from tests.unit.history_story import SA_CI, SECRET_VALUE, UID_WEB, audit, story


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store") / "s.db"
    fill(path, story())
    return path


def test_history_merges_audit_and_events_oldest_first(store: Path) -> None:
    got = entries(store, "history", "deploy/shop/web")
    assert [(e["kind"], e.get("verb") or e.get("reason"), e.get("user")) for e in got] == [
        ("audit", "create", "alice"),  # RequestReceived + ResponseComplete: one entry
        ("event", "ScalingReplicaSet", None),
        ("audit", "update", "alice"),
        ("event", "ScalingReplicaSet", None),
        ("audit", "get", "alice"),
        ("audit", "patch", "bob"),
        ("event", "BackOff", None),  # on one of its pods (named after it): the workload's story
        ("audit", "delete", "mallory"),
        ("event", "ScalingReplicaSet", None),
    ]
    times = [e["time_ns"] for e in got]
    assert times == sorted(times)
    create, _, scale, _, _, patch, backoff, forbidden, last = got
    assert (backoff["type"], backoff["resource"], backoff["name"], backoff["count"]) == (
        "Warning",
        "pods",
        "web-6d4b8-x7k2p",
        4,
    )
    assert create["stage"] == "ResponseComplete" and create["code"] == 201
    assert {"op": "add", "path": "/spec/template/spec/containers/0/image", "new": "nginx:1.27"} in create["changes"]
    assert scale["subresource"] == "scale"
    assert scale["changes"] == [{"op": "replace", "path": "/spec/replicas", "old": 1, "new": 3}]
    # The patch: exactly the image, old and new (no resourceVersion/generation/status noise).
    assert patch["changes"] == [
        {"op": "replace", "path": "/spec/template/spec/containers/0/image", "old": "nginx:1.27", "new": "nginx:1.28"}
    ]
    assert forbidden["code"] == 403 and "forbidden" in forbidden["message"]
    assert "changes" not in forbidden
    assert last["count"] == 2 and last["source"] == "deployment-controller"
    assert create["source_ip"] == "10.1.2.3" and create["user_agent"].startswith("kubectl/")
    assert create["record"]["auditID"] == "a-create"  # the whole record, for --json and the UI


def test_text_output_says_who_what_and_what_changed(store: Path) -> None:
    result = cli(store, "history", "deployments/shop/web")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "# deployments/shop/web: 9 entries, oldest first"
    assert any("patch deployments/shop/web by bob from 10.1.2.3 (kubectl/v1.36.3) -> 200" in line for line in lines)
    assert "~ /spec/template/spec/containers/0/image: nginx:1.27 -> nginx:1.28" in result.stdout
    assert "~ /spec/replicas: 1 -> 3" in result.stdout
    assert "Scaled down replica set web-6d4b8 from 3 to 2 (x2) [deployment-controller]" in result.stdout


def test_logs_of_a_workloads_pods(store: Path) -> None:
    got = entries(store, "history", "deploy/shop/web", "--logs")
    logs = [e for e in got if e["kind"] == "log"]
    assert [(e["name"], e["message"]) for e in logs] == [
        ("web-6d4b8-x7k2p", "nginx started"),
        ("web-6d4b8-x7k2p", "GET / 200"),
    ]
    assert len(got) == 11
    pod = entries(store, "history", "pod/shop/web-6d4b8-x7k2p", "--logs")
    assert [e["kind"] for e in pod] == ["log", "log", "event", "audit"]
    assert pod[3]["user"] == "carol" and pod[3]["source_ip"] == "10.9.9.9"


def test_the_same_object_by_uid_kind_alias_or_without_namespace(store: Path) -> None:
    reference = entries(store, "history", "deploy/shop/web")
    for target in (UID_WEB, "Deployment/shop/web", "deployments.apps/shop/web", "deploy/web"):
        assert entries(store, "history", target) == reference, target


def test_since_and_until(store: Path) -> None:
    got = entries(
        store, "history", "deploy/shop/web", "--since", "2025-12-05T02:00:15Z", "--until", "2025-12-05T02:00:50.5Z"
    )
    assert [e.get("verb") or e.get("reason") for e in got] == ["patch", "BackOff", "delete"]
    result = cli(store, "history", "deploy/shop/web", "--since", "yesterday")
    assert result.exit_code == 2 and "expected a duration" in result.output


def test_who_and_search(store: Path) -> None:
    got = entries(store, "who", SA_CI)
    assert [(e["verb"], e["resource"], e["name"], e["code"]) for e in got] == [("get", "secrets", "db", 200)]
    assert [e["verb"] for e in entries(store, "who", "alice")] == ["create", "update", "get"]
    assert [e["verb"] for e in entries(store, "who", "alice", "--writes")] == ["create", "update"]
    denied = entries(store, "search", "--code", "403")
    assert [(e["user"], e["verb"], e["name"]) for e in denied] == [("mallory", "delete", "web")]
    events = entries(store, "search", "--kind", "event", "--reason", "ScalingReplicaSet")
    assert len(events) == 3
    assert {e["user"] for e in entries(store, "search", "--resource", "deploy", "--kind", "audit")} == {
        "alice",
        "bob",
        "mallory",
    }
    assert len(entries(store, "search", "--namespace", "shop")) == 14  # the create's two stages are one entry


def test_secret_values_never_leave(store: Path) -> None:
    outputs = [
        cli(store, "history", "secret/shop/db", "--json").stdout,
        cli(store, "history", "secret/shop/db").stdout,
        cli(store, "who", SA_CI, "--json").stdout,
        cli(store, "search", "--json").stdout,
    ]
    for out in outputs:
        assert out and SECRET_VALUE not in out
    read = orjson.loads(outputs[0].splitlines()[0])
    assert read["record"]["responseObject"]["data"] == {"password": REDACTED}  # the key stays: useful, not secret


def test_redaction_of_patches_lists_and_tokens() -> None:
    merge = {"objectRef": {"resource": "secrets"}, "requestObject": {"data": {"k": "djE="}, "stringData": {"s": "v"}}}
    assert redact_record(merge)["requestObject"] == {"data": {"k": REDACTED}, "stringData": {"s": REDACTED}}
    json_patch = {
        "objectRef": {"resource": "secrets"},
        "requestObject": [{"op": "add", "path": "/data/k", "value": "x"}],
    }
    assert redact_record(json_patch)["requestObject"] == [{"op": "add", "path": "/data/k", "value": REDACTED}]
    listed = {
        "objectRef": {"resource": "secrets"},
        "responseObject": {"kind": "SecretList", "items": [{"data": {"a": "b"}}]},
    }
    assert redact_record(listed)["responseObject"]["items"] == [{"data": {"a": REDACTED}}]
    token = {
        "objectRef": {"resource": "serviceaccounts", "subresource": "token"},
        "responseObject": {"kind": "TokenRequest", "status": {"token": "eyJhbGci", "expirationTimestamp": "x"}},
    }
    assert redact_record(token)["responseObject"]["status"] == {"token": REDACTED, "expirationTimestamp": "x"}
    plain = {"objectRef": {"resource": "configmaps"}, "requestObject": {"data": {"k": "v"}}}
    assert redact_record(plain) is plain


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("history", "deploymnt/shop/web"), "unknown kind 'deploymnt'; did you mean deployment"),
        (("history", "deploy/shop/webb"), "no records about deployments/shop/webb; deployments with records: shop/web"),
        (("history", "deploy/prod/web"), "no records about deployments/prod/web; deployments with records: shop/web"),
        (
            ("history", "configmap/shop/x"),
            "no records about configmaps/shop/x; no configmaps at all (kinds with records:",
        ),
        (
            ("history", "deploy/shop/web", "--until", "2020-01-01T00:00:00Z"),
            "no records about deployments/shop/web in that time range; its newest record is at 20",
        ),
        (
            ("history", "deploy/shop/webb", "--since", "2020-01-01T00:00:00Z"),
            "no records about deployments/shop/webb in that time range; deployments with records: shop/web",
        ),
        (("history", "00000000-0000-4000-8000-000000000000"), "no records carry uid"),
        (("history", "web"), "expected KIND/NAME, KIND/NAMESPACE/NAME or a uid, got 'web'"),
        (("who", "alise"), "no records of user 'alise'; users with records: alice"),
    ],
)
def test_bad_queries_say_what_and_suggest(store: Path, args: tuple[str, ...], message: str) -> None:
    result = cli(store, *args)
    assert result.exit_code == 1
    assert message in result.stderr


def test_missing_corrupt_or_newer_store(tmp_path: Path) -> None:
    result = cli(tmp_path / "none.db", "history", "deploy/shop/web")
    assert result.exit_code == 1 and "no store at" in result.stderr
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"not a database at all" * 100)
    before = corrupt.read_bytes()
    result = cli(corrupt, "who", "alice")
    assert result.exit_code == 1 and "is not a usable kubetrail store" in result.stderr
    assert corrupt.read_bytes() == before


def test_limit_keeps_the_newest_records_oldest_first(store: Path) -> None:
    result = cli(store, "history", "deploy/shop/web", "--limit", "3", "--json")
    assert result.exit_code == 0
    got = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [e.get("verb") or e.get("reason") for e in got] == ["BackOff", "delete", "ScalingReplicaSet"]
    assert "older records left out (the newest 3 shown)" in result.stderr
    assert [e["verb"] for e in entries(store, "who", "alice", "--limit", "2")] == ["update", "get"]


def test_a_stored_body_orjson_refuses_is_read_with_the_number_as_text(tmp_path: Path) -> None:
    """A body the store took (its writer reads numbers of any size) that orjson refuses, here
    ``1e999``: the object's timeline still reads, that record whole with the number as its text
    (before, ``history`` failed on the whole object)."""
    records = story()
    odd = audit(200, "a-huge", "patch", "mallory", "deployments", "web", request={"spec": {"replicas": 7}})
    raw = orjson.dumps(odd.body).replace(b'"replicas":7', b'"replicas":1e999')
    assert raw.count(b"1e999") == 1
    fill(tmp_path / "s.db", [*records, Record(odd.tag, odd.time_ns, None, raw, identity=odd.identity)])
    timeline = entries(tmp_path / "s.db", "history", "deploy/shop/web")
    assert len(timeline) == len(entries_of_web(tmp_path, records)) + 1
    last = timeline[-1]
    assert (last["kind"], last["user"], last["verb"], last["audit_id"]) == ("audit", "mallory", "patch", "a-huge")
    assert last["record"]["requestObject"] == {"spec": {"replicas": "1e999"}}


def entries_of_web(tmp_path: Path, records: list[Record]) -> list[dict[str, object]]:
    fill(tmp_path / "plain.db", records)
    return entries(tmp_path / "plain.db", "history", "deploy/shop/web")
