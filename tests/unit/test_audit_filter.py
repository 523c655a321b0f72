"""The ``kubernetes_audit`` filter: flattening, redaction, stage/level drops, deduplication."""

from __future__ import annotations

import base64
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import generate_latest

from kubetrail.core.acks import AckToken, OrderedAcks
from kubetrail.core.config import load_config
from kubetrail.core.errors import ConfigError
from kubetrail.core.record import Batch, Record
from kubetrail.runtime.pipeline import Pipeline
from kubetrail.transforms import kubernetes_audit
from kubetrail.transforms.kubernetes_audit import REDACTED, KubernetesAuditTransform
from tests import required
from tests.unit.helpers import build, tail_file_config

SECRET_PLAIN = "hunter2-plain"
SECRET_B64 = base64.b64encode(b"hunter2-b64").decode()


@pytest.fixture(autouse=True, params=["native scan", "python scan"])
def scan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with each scan (see test_audit_scan.py for the two compared)."""
    if request.param == "python scan":
        monkeypatch.setattr(kubernetes_audit, "NativeScanner", None)
    elif kubernetes_audit.NativeScanner is None:
        required.unavailable("kubetrail_native is not built", kind="native")
    return str(request.param)


def event(audit_id: str = "id-1", stage: str = "ResponseComplete", **extra: Any) -> dict[str, Any]:
    return {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": "RequestResponse",
        "auditID": audit_id,
        "stage": stage,
        "requestURI": "/api/v1/namespaces/shop/pods/web?timeout=30s",
        "verb": "create",
        "user": {"username": "alice", "uid": "u-1", "groups": ["devs", "system:authenticated"]},
        "impersonatedUser": {"username": "bob", "groups": ["ops"]},
        "sourceIPs": ["10.0.0.7", "10.0.0.1"],
        "userAgent": "kubectl/v1.36.0",
        "objectRef": {"resource": "pods", "subresource": "exec", "namespace": "shop", "name": "web", "apiGroup": ""},
        "responseStatus": {"metadata": {}, "code": 201},
        "requestReceivedTimestamp": "2026-11-28T12:00:00.000001Z",
        "stageTimestamp": "2026-11-28T12:00:00.000002Z",
        "annotations": {"authorization.k8s.io/decision": "allow", "authorization.k8s.io/reason": "RBAC: yes"},
        **extra,
    }


def rec(ev: dict[str, Any], meta: dict[str, Any] | None = None) -> Record:
    return Record("audit", 1, None, orjson.dumps(ev), (ev.get("auditID"), ev.get("stage")), meta)


def run(flt: KubernetesAuditTransform, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [orjson.loads(r.json_bytes()) for r in flt.process([rec(e) for e in events])]


def test_flattens_with_the_original_kept() -> None:
    ev = event()
    (out,) = run(build(KubernetesAuditTransform), [ev])
    assert {k: out[k] for k in out if k not in ev} == {
        "time": "2026-11-28T12:00:00.000002Z",
        "k8s.audit.id": "id-1",
        "k8s.audit.stage": "ResponseComplete",
        "k8s.audit.level": "RequestResponse",
        "user.name": "alice",
        "user.id": "u-1",
        "user.groups": ["devs", "system:authenticated"],
        "k8s.audit.impersonated_user.name": "bob",
        "k8s.audit.impersonated_user.groups": ["ops"],
        "k8s.audit.verb": "create",
        "k8s.audit.resource": "pods",
        "k8s.audit.subresource": "exec",
        "k8s.namespace.name": "shop",
        "k8s.audit.object.name": "web",
        "k8s.audit.api_group": "",
        "client.address": "10.0.0.7",
        "k8s.audit.source_ips": ["10.0.0.7", "10.0.0.1"],
        "user_agent.original": "kubectl/v1.36.0",
        "url.original": "/api/v1/namespaces/shop/pods/web?timeout=30s",
        "http.response.status_code": 201,
        "k8s.audit.authz.decision": "allow",
        "k8s.audit.authz.reason": "RBAC: yes",
    }
    assert {k: out[k] for k in ev} == ev


def test_absent_fields_are_omitted_and_other_records_pass_untouched() -> None:
    minimal = {"auditID": "m", "stage": "Panic"}
    other = Record("audit", 1, {"log": "not an audit event"})
    flt = build(KubernetesAuditTransform)
    out = flt.process([rec(minimal), other])
    assert orjson.loads(out[0].json_bytes()) == {"k8s.audit.id": "m", "k8s.audit.stage": "Panic", **minimal}
    assert out[1] is other and out[1].body == {"log": "not an audit event"}


def test_flatten_off_leaves_bytes_alone() -> None:
    ev = event()
    out = build(KubernetesAuditTransform, flatten="off").process([rec(ev)])
    assert out[0].raw == orjson.dumps(ev)


def secret(**extra: Any) -> dict[str, Any]:
    return {
        "kind": "Secret",
        "apiVersion": "v1",
        "metadata": {
            "name": "db",
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": '{"stringData":{"pw":"' + SECRET_PLAIN + '"}}',
                "team": "shop",
            },
        },
        "data": {"pw": SECRET_B64},
        "stringData": {"pw2": SECRET_PLAIN},
        **extra,
    }


SECRET_REF = {"resource": "secrets", "namespace": "shop", "name": "db", "apiVersion": "v1"}


@pytest.mark.parametrize(
    "ev",
    [
        event(objectRef=SECRET_REF, requestObject=secret(), responseObject=secret()),
        event(
            objectRef={"resource": "secrets", "namespace": "shop"},
            verb="list",
            responseObject={"kind": "SecretList", "apiVersion": "v1", "items": [secret(), secret()]},
        ),
        event(
            objectRef=SECRET_REF,
            verb="patch",
            requestObject=[{"op": "replace", "path": "/data/pw", "value": SECRET_B64}],
            responseObject=secret(),
        ),
        event(objectRef=SECRET_REF, verb="patch", requestObject={"stringData": {"pw": SECRET_PLAIN}}),
        # a Secret where the objectRef does not say so (e.g. inside a generic List)
        event(objectRef={"resource": "things"}, responseObject={"kind": "List", "items": [secret()]}),
        event(
            objectRef={"resource": "serviceaccounts", "subresource": "token", "namespace": "shop", "name": "sa"},
            responseObject={
                "kind": "TokenRequest",
                "apiVersion": "authentication.k8s.io/v1",
                "status": {"token": SECRET_PLAIN},
            },
        ),
    ],
    ids=["secret", "secretlist", "jsonpatch", "mergepatch", "generic-list", "tokenrequest"],
)
def test_secrets_are_redacted_by_default(ev: dict[str, Any]) -> None:
    (out,) = run(build(KubernetesAuditTransform), [ev])
    text = orjson.dumps(out).decode()
    assert SECRET_PLAIN not in text and SECRET_B64 not in text
    assert out["k8s.audit.redacted"] is True
    assert REDACTED in text


def test_a_number_orjson_refuses_does_not_skip_the_redaction() -> None:
    """A patch's body is logged as sent, so a user can put ``1e999`` beside a Secret's value.
    msgspec (the scan) reads it, orjson refuses it: the filter failed, and its whole batch went
    on unfiltered, every Secret in it unredacted. The number is kept as its text now."""
    ev = event(objectRef=SECRET_REF, verb="patch", requestObject={"stringData": {"pw": SECRET_PLAIN}, "x": 7})
    raw = orjson.dumps(ev).replace(b'"x":7', b'"x":1e999')
    others = [event(f"id-{i}", objectRef=SECRET_REF, requestObject=secret()) for i in range(2, 5)]
    records = [Record("audit", 1, None, raw, ("id-1", "ResponseComplete")), *[rec(e) for e in others]]
    out = build(KubernetesAuditTransform).process(records)
    assert len(out) == 4
    text = b"".join(r.json_bytes() for r in out)
    assert SECRET_PLAIN.encode() not in text and SECRET_B64.encode() not in text
    first = orjson.loads(out[0].json_bytes())
    assert first["requestObject"] == {"stringData": {"pw": REDACTED}, "x": "1e999"}
    assert first["k8s.audit.redacted"] is True and first["k8s.audit.verb"] == "patch"


def test_redaction_keeps_keys_and_other_fields() -> None:
    ev = event(objectRef=SECRET_REF, requestObject=secret())
    (out,) = run(build(KubernetesAuditTransform), [ev])
    obj = out["requestObject"]
    assert obj["data"] == {"pw": REDACTED} and obj["stringData"] == {"pw2": REDACTED}
    assert obj["metadata"]["annotations"]["team"] == "shop"


def test_redact_secrets_off_and_configured_paths() -> None:
    ev = event(
        objectRef=SECRET_REF,
        requestObject=secret(),
        requestObject2={"spec": {"password": "p", "items": [{"password": "q"}]}},
    )
    (out,) = run(build(KubernetesAuditTransform, redact_secrets="off"), [ev])
    assert out["requestObject"]["data"]["pw"] == SECRET_B64 and "k8s.audit.redacted" not in out
    flt = build(
        KubernetesAuditTransform, redact=["requestObject2.spec.password", "requestObject2.spec.items.*.password"]
    )
    (out,) = run(flt, [ev])
    assert out["requestObject2"] == {"spec": {"password": REDACTED, "items": [{"password": REDACTED}]}}
    assert out["k8s.audit.redacted"] is True


def test_ordinary_events_are_not_reparsed() -> None:
    ev = event()
    record = rec(ev)
    original = record.raw
    assert original is not None
    build(KubernetesAuditTransform).process([record])
    assert record.raw is not None and record.raw.endswith(original[1:])  # the original bytes, spliced


def test_drop_stages_and_levels() -> None:
    events = [event("a", "RequestReceived"), event("b"), event("c", level="Metadata"), event("d", level="None")]
    flt = build(KubernetesAuditTransform, drop_stages="RequestReceived", drop_levels="None")
    assert [o["auditID"] for o in run(flt, events)] == ["b", "c"]
    assert sample(flt, "kubetrail_audit_dropped_by_rule_total") == 2
    with pytest.raises(ConfigError, match="allowed"):
        build(KubernetesAuditTransform, drop_stages="Done")


def test_dedupe_without_delivery_hook_is_in_memory() -> None:
    flt = build(KubernetesAuditTransform)
    first = run(flt, [event("a", "RequestReceived"), event("a"), event("a")])
    assert [(o["auditID"], o["stage"]) for o in first] == [("a", "RequestReceived"), ("a", "ResponseComplete")]
    assert run(flt, [event("a"), event("b")])[0]["auditID"] == "b"
    assert sample(flt, "kubetrail_audit_duplicates_removed_total") == 2


def sample(flt: KubernetesAuditTransform, name: str) -> float:
    """The filter's one sample of ``name``, labelled with its component id."""
    text = generate_latest(flt.metrics._parent.registry).decode()
    (line,) = [x for x in text.splitlines() if x.startswith(name + "{")]
    assert 'component="kubernetes_audit.0"' in line
    return float(line.rsplit(" ", 1)[1])


def hooked(events: list[dict[str, Any]]) -> tuple[Batch, AckToken, list[bool]]:
    """A batch as the webhook input makes it: its records and its token (``results`` gets what
    the token's callback, the webhook's answer, was told)."""
    results: list[bool] = []
    token = AckToken(results.append)
    return Batch("audit.webhook", [rec(e) for e in events], token), token, results


def tailed(events: list[dict[str, Any]], acks: OrderedAcks[int], end: int) -> tuple[Batch, AckToken]:
    """A batch as the tail makes it: a lazy block of the lines, with a token of its in-order
    checkpoint (``end``: the offset the checkpoint moves to once it and all before it are done)."""
    block = b"".join(orjson.dumps(e) + b"\n" for e in events)
    token = acks.token(end)
    batch = Batch(
        "audit.file",
        None,
        token,
        len(block),
        raw_block=block,
        materialize=lambda: [rec(e) for e in events],
        count=len(events),
    )
    return batch, token


def ids(batch: Batch) -> list[str]:
    return [orjson.loads(r.json_bytes())["auditID"] for r in batch.records]


def delivered(token: AckToken) -> None:
    """The router's part (one sink) and the sink's: routed, then delivered."""
    token.retain()
    token.seal()
    token.release(True)


def db_keys(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT keys FROM audit_dedupe_batches").fetchall()
    return sorted(key for (keys,) in rows for key in orjson.loads(keys))


def test_keys_a_db_of_an_earlier_version_holds_are_still_loaded(tmp_path: Path) -> None:
    """Earlier versions stored a row per key in audit_dedupe: a restart onto this one keeps them."""
    db = tmp_path / "dedupe.db"
    build(KubernetesAuditTransform, db=str(db))  # creates the tables
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO audit_dedupe VALUES ('a2', ?)", (time.time(),))
        conn.execute("INSERT INTO audit_dedupe VALUES ('old2', ?)", (time.time() - 3600,))  # past the window
    flt = build(KubernetesAuditTransform, db=str(db))
    batch, _, _ = hooked([event("a"), event("old"), event("b")])
    assert ids(flt.process_batch(batch)) == ["old", "b"]


def test_dedupe_records_keys_in_db_only_when_delivered(tmp_path: Path) -> None:
    db = tmp_path / "dedupe.db"
    flt = build(KubernetesAuditTransform, db=str(db))
    batch, token, _ = hooked([event("a"), event("b")])
    assert len(flt.process_batch(batch)) == 2
    assert db_keys(db) == [], "keys written before delivery: a crash now would lose the retry"
    token.seal()  # delivered by every sink
    assert db_keys(db) == ["a2", "b2"]
    # a new process (kill -9 and restart) still drops the API server's retry
    again = build(KubernetesAuditTransform, db=str(db))
    batch, token, _ = hooked([event("a"), event("c")])
    assert [r.identity for r in again.process_batch(batch).records] == [("c", "ResponseComplete")]


def test_dedupe_forgets_keys_of_a_dropped_batch(tmp_path: Path) -> None:
    flt = build(KubernetesAuditTransform, db=str(tmp_path / "d.db"))
    batch, token, _ = hooked([event("a")])
    flt.process_batch(batch)
    token.retain()
    token.release(False)  # a sink dropped it
    token.seal()
    batch, _, _ = hooked([event("a")])
    assert len(flt.process_batch(batch)) == 1, "the retry of an undelivered batch must pass"


def test_retry_of_an_in_flight_batch_waits_for_its_twin(tmp_path: Path) -> None:
    flt = build(KubernetesAuditTransform, db=str(tmp_path / "d.db"))
    first, first_token, first_results = hooked([event("a"), event("b")])
    flt.process_batch(first)
    first_token.retain()  # routed to a sink that has not delivered yet
    first_token.seal()
    retry, retry_token, retry_results = hooked([event("a"), event("b"), event("c")])
    assert ids(flt.process_batch(retry)) == ["c"]
    retry_token.seal()  # "c" needs no sink in this test
    assert retry_results == [], "the retry completed while its twin was still in flight"
    first_token.release(True)
    assert first_results == [True] and retry_results == [True]


# -- both paths (webhook and tail) into one filter: the races of issue 16 ----------------------


def test_keys_the_tail_delivered_are_in_db_before_its_checkpoint_moves(tmp_path: Path) -> None:
    """Race 1 (the one seen on a real API server): the tail delivered a key, kubetrail was
    SIGKILLed before the API server had the webhook's 2xx for the batch with the same event;
    after the restart the API server re-sends that batch. Tail keys were kept in memory only,
    so the re-sent copy went out again. Now they are in db before the checkpoint moves."""
    db = tmp_path / "dedupe.db"
    flt = build(KubernetesAuditTransform, db=str(db))
    in_db_at_checkpoint: list[list[str]] = []
    acks: OrderedAcks[int] = OrderedAcks(lambda offset: in_db_at_checkpoint.append(db_keys(db)))
    batch, token = tailed([event("a"), event("b")], acks, 100)
    assert ids(flt.process_batch(batch)) == ["a", "b"]
    assert db_keys(db) == [], "stored before delivery: a kill now would lose the tail's replay"
    delivered(token)
    assert in_db_at_checkpoint == [["a2", "b2"]]
    # kill -9, restart: the API server re-sends the webhook batch that was never answered
    again = build(KubernetesAuditTransform, db=str(db))
    retry, retry_token, results = hooked([event("a"), event("b"), event("c")])
    assert ids(again.process_batch(retry)) == ["c"]
    delivered(retry_token)
    assert results == [True] and db_keys(db) == ["a2", "b2", "c2"]


def test_keys_the_webhook_delivered_are_not_read_again_by_the_tail_after_a_restart(tmp_path: Path) -> None:
    """The reverse: the webhook delivered (and answered), the tail's checkpoint was behind."""
    db = tmp_path / "dedupe.db"
    flt = build(KubernetesAuditTransform, db=str(db))
    batch, token, results = hooked([event("a"), event("b")])
    flt.process_batch(batch)
    delivered(token)
    assert results == [True]
    again = build(KubernetesAuditTransform, db=str(db))
    replay, _ = tailed([event("a"), event("b"), event("c")], OrderedAcks(lambda _: None), 9)
    assert ids(again.process_batch(replay)) == ["c"]


def test_a_tailed_copy_of_an_in_flight_webhook_key_holds_the_tail_checkpoint(tmp_path: Path) -> None:
    """Race 2: the tail's copy is removed while the webhook's is still in flight. Its batch
    must not complete (the checkpoint would move past the event) before the twin is delivered:
    a kill -9 meanwhile loses nothing (the tail reads it again; the API server re-sends)."""
    flt = build(KubernetesAuditTransform, db=str(tmp_path / "d.db"))
    hook_batch, hook_token, hook_results = hooked([event("a")])
    flt.process_batch(hook_batch)
    hook_token.retain()  # at a sink
    hook_token.seal()
    checkpoints: list[int] = []
    acks: OrderedAcks[int] = OrderedAcks(checkpoints.append)
    batch, token = tailed([event("a"), event("b")], acks, 50)
    assert ids(flt.process_batch(batch)) == ["b"]
    delivered(token)  # "b" is delivered
    assert checkpoints == [], "the tail's checkpoint moved past 'a' while its twin was in flight"
    hook_token.release(True)
    assert hook_results == [True] and checkpoints == [50]


def test_a_webhook_copy_of_an_in_flight_tailed_key_is_answered_once_the_tail_delivered(tmp_path: Path) -> None:
    """Race 3: the webhook's copy is removed while the tail's is in flight. The 2xx waits for
    the tail's delivery; if that fails the answer is not 2xx, so the API server's retry brings
    the event (whose key was forgotten)."""
    db = tmp_path / "d.db"
    flt = build(KubernetesAuditTransform, db=str(db))
    checkpoints: list[int] = []
    acks: OrderedAcks[int] = OrderedAcks(checkpoints.append)
    batch, token = tailed([event("a")], acks, 10)
    flt.process_batch(batch)
    token.retain()
    token.seal()
    hook_batch, hook_token, results = hooked([event("a")])
    assert ids(flt.process_batch(hook_batch)) == []
    hook_token.seal()
    assert results == [], "answered 2xx while the only copy delivered so far was still in flight"
    token.release(True)
    assert results == [True] and checkpoints == [10] and db_keys(db) == ["a2"]
    # and when the tail's copy is dropped by its sink instead:
    batch, token = tailed([event("x")], acks, 20)
    flt.process_batch(batch)
    token.retain()
    token.seal()
    hook_batch, hook_token, results = hooked([event("x")])
    assert ids(flt.process_batch(hook_batch)) == []
    hook_token.seal()
    token.release(False)
    assert results == [False], "a 2xx here loses the event: its only copy was dropped"
    retry, _, results = hooked([event("x")])
    assert ids(flt.process_batch(retry)) == ["x"], "the API server's retry must go through"


def test_a_held_batch_counts_its_own_keys_as_delivered_at_once(tmp_path: Path) -> None:
    """Race 4 (seen on the real API server with an earlier version that retained the token for
    the wait): a tail batch with a new key and a copy whose twin is in flight was written by
    the sink but, waiting for the twin, not yet counted as delivered; a SIGKILL then, and the
    tail's replay wrote the new key again. Its own keys are stored when it is delivered; only
    its source (the checkpoint) waits for the twin."""
    db = tmp_path / "d.db"
    flt = build(KubernetesAuditTransform, db=str(db))
    hook_batch, hook_token, _ = hooked([event("a")])
    flt.process_batch(hook_batch)
    hook_token.retain()  # the webhook's copy of "a" at a sink
    hook_token.seal()
    checkpoints: list[int] = []
    batch, token = tailed([event("a"), event("b")], OrderedAcks(checkpoints.append), 70)
    assert ids(flt.process_batch(batch)) == ["b"]
    delivered(token)
    assert db_keys(db) == ["b2"] and checkpoints == []
    # SIGKILL now; after the restart the tail reads both lines again, the API server re-sends "a"
    again = build(KubernetesAuditTransform, db=str(db))
    replay, _ = tailed([event("a"), event("b")], OrderedAcks(checkpoints.append), 70)
    assert ids(again.process_batch(replay)) == ["a"]


def test_without_db_keys_are_still_in_flight_until_delivered() -> None:
    """No db (memory only): the same waits within one process, and the fast path for batches
    without a repeated key (one native call) keeps working around them."""
    flt = build(KubernetesAuditTransform)
    acks: OrderedAcks[int] = OrderedAcks(lambda _: None)
    first, first_token = tailed([event(f"id-{i}") for i in range(100)], acks, 1)
    assert len(flt.process_batch(first)) == 100
    first_token.retain()
    first_token.seal()
    hook_batch, hook_token, results = hooked([event("id-7"), event("new")])
    assert ids(flt.process_batch(hook_batch)) == ["new"]
    hook_token.seal()
    assert results == []
    first_token.release(True)
    assert results == [True]
    assert not flt.flying


def test_a_db_that_cannot_be_written_is_logged_and_the_batch_still_answered(tmp_path: Path) -> None:
    """The keys cannot be stored (disk full, file removed): counted and logged, the source is
    still told (a restart may then repeat those keys; nothing is lost), and the filter goes on."""
    flt = build(KubernetesAuditTransform, db=str(tmp_path / "d.db"))
    assert flt.db is not None
    flt.db.conn.close()
    batch, token, results = hooked([event("a")])
    assert ids(flt.process_batch(batch)) == ["a"]
    delivered(token)
    assert results == [True]
    text = generate_latest(flt.metrics._parent.registry).decode()
    (line,) = [x for x in text.splitlines() if x.startswith("kubetrail_errors_total{") and 'type="db"' in x]
    assert float(line.rsplit(" ", 1)[1]) >= 1  # the store (and the prune before it) failed
    batch, token, results = hooked([event("a"), event("b")])
    assert ids(flt.process_batch(batch)) == ["b"], "still deduplicated in memory"


def test_dedupe_window_expires(tmp_path: Path) -> None:
    flt = build(KubernetesAuditTransform, dedupe_window="0.05")
    run(flt, [event("a")])

    time.sleep(0.1)
    assert len(run(flt, [event("a")])) == 1


def test_dedupe_max_keys_evicts_oldest() -> None:
    flt = build(KubernetesAuditTransform, dedupe_max_keys="2")
    run(flt, [event("a")])
    run(flt, [event("b")])
    run(flt, [event("c")])
    run(flt, [event("d")])  # expiry runs before each batch: a is forgotten
    assert len(run(flt, [event("a")])) == 1


async def test_a_tailed_log_comes_out_in_its_order_with_each_event_once(tmp_path: Path) -> None:
    """The tail hands a batch to the router before the last one is routed, and the native scan
    runs in the filter's own thread: the output still has the file's order and each event once,
    also around batches the filter empties (runs of dropped stages longer than a batch)."""
    ids = [f"{i:08d}-0000-0000-0000-000000000000" for i in range(3000)]
    dropped = {i for i in range(3000) if (i // 200) % 2 == 0}
    log = tmp_path / "audit.log"
    log.write_bytes(
        b"".join(
            orjson.dumps(event(id_, "RequestReceived" if i in dropped else "ResponseComplete", level="Metadata"))
            + b"\n"
            for i, id_ in enumerate(ids)
        )
    )
    config = tail_file_config(
        tmp_path,
        log,
        input_extra="    parser k8s_audit\n    batch_size 4k\n    buffer_chunk_size 4k\n",
        filters="[FILTER]\n    name kubernetes_audit\n    match *\n    drop_stages RequestReceived\n",
    )
    assert await Pipeline(load_config(config)).run() == 0
    out = [orjson.loads(line) for line in (tmp_path / "out" / "out.jsonl").read_bytes().splitlines()]
    assert [o["auditID"] for o in out] == [id_ for i, id_ in enumerate(ids) if i not in dropped]
    assert all(o["k8s.audit.id"] == o["auditID"] for o in out)
