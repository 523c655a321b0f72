"""The ``detect`` filter's fast path: the ``kubernetes_audit`` filter's native scan gives each
event a detection class (index key, user, impersonated user, namespace, decision, code) and
the filter decides a class once. Every test compares it with the event-by-event path on the
same block: the alerts must be byte for byte the same, in the same order."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubetrail.core.record import Batch, Record
from kubetrail.detect.fields import Light, class_of
from kubetrail.transforms import detect as detect_module
from kubetrail.transforms.detect import DetectTransform
from kubetrail.transforms.kubernetes_audit import KubernetesAuditTransform, NativeScanner, detect_classes
from tests.unit.helpers import build, write

try:
    from kubetrail_native import AlertWriter
except ImportError:  # pragma: no cover - depends on the installation
    AlertWriter = None
from tests.unit.test_detect import POD, audit

pytestmark = pytest.mark.skipif(NativeScanner is None, reason="kubetrail_native is not built")

FALCO = Path(__file__).resolve().parents[2] / "examples" / "history" / "rules" / "k8s_audit_rules.yaml"

# Rules that read fields of the class, fields beyond it, list-valued fields and missing ones.
RULES = """
- list: allowed_users
  items: [alice, "system:kube-scheduler"]
- list: sensitive
  items: [secrets, configmaps]
- macro: kevt
  condition: (jevt.value[/stage] in (ResponseComplete, ResponseStarted))
- rule: Unknown User
  desc: by class alone
  condition: kevt and not ka.user.name in (allowed_users)
  output: user=%ka.user.name verb=%ka.verb target=%ka.target.name/%ka.target.resource uri=%ka.uri code=%ka.response.code
  priority: WARNING
  source: k8s_audit
  tags: [users]
- rule: Anonymous Allowed
  desc: class, then the URI per event
  condition: >
    kevt and ka.user.name=system:anonymous and ka.auth.decision=allow
    and not ka.uri in (/healthz, /livez)
  output: anonymous uri=%ka.uri reason=%ka.auth.reason
  priority: CRITICAL
  source: k8s_audit
- rule: Sensitive Read
  desc: key and namespace
  condition: >
    kevt and ka.verb in (get, list) and ka.target.resource in (sensitive)
    and ka.target.namespace != kube-system
  output: read %ka.target.namespace/%ka.target.name by %ka.user.name (groups %ka.user.groups) as %ka.impuser.name
  priority: NOTICE
  source: k8s_audit
  exceptions:
    - name: scheduler
      fields: [ka.user.name]
      values: [["system:kube-scheduler"]]
- rule: Group Member
  desc: a list-valued field read per event
  condition: kevt and ka.user.groups intersects (admins, devs) and ka.verb != watch
  output: group member %ka.user.name %ka.user.groups from %ka.sourceips
  priority: INFORMATIONAL
  source: k8s_audit
- rule: Privileged
  desc: the request object, per event
  condition: kevt and ka.verb=create and ka.target.resource=pods and ka.req.pod.containers.privileged intersects (true)
  output: privileged %ka.req.pod.containers.image by %ka.user.name at %jevt.time code %jevt.value[/responseStatus/code]
  priority: ERROR
  source: k8s_audit
- rule: Failed Request
  desc: response code with a missing value
  condition: kevt and ka.response.code >= 400
  output: failed %ka.response.code %ka.response.reason %ka.useragent
  priority: DEBUG
  source: k8s_audit
"""


# Times the native alert writer takes (UTC, "Z") and ones it leaves to Python, all valid.
STAMPS = [
    "2026-12-05T03:{minute:02d}:{second:02d}.{micros:06d}Z",
    "2026-12-05T03:{minute:02d}:{second:02d}.{micros:06d}Z",
    "2026-12-05T03:{minute:02d}:{second:02d}Z",
    "2028-02-29T23:{minute:02d}:{second:02d}.1Z",
    "2026-12-05T03:{minute:02d}:{second:02d}.{micros:06d}987Z",
    "2026-12-05T03:{minute:02d}:{second:02d}.{micros:06d}+02:00",
    "2026-12-05T03:{minute:02d}:{second:02d}.{micros:06d}",
    "1970-01-01T00:00:00Z",
]


def varied(count: int, seed: int = 5) -> list[bytes]:
    """Audit events of many shapes: missing and null members, odd users, list values, escapes."""
    rng = random.Random(seed)
    users = ["alice", "bob", "system:anonymous", "system:kube-scheduler", 'eve "quoted"', "zoë", None]
    resources = ["pods", "secrets", "configmaps", "leases", None]
    out: list[bytes] = []
    for i in range(count):
        changes: dict[str, Any] = {
            "auditID": f"00000000-0000-4000-8000-{i:012d}",
            "verb": rng.choice(["get", "list", "create", "watch", "delete"]),
            "stage": rng.choice(["ResponseComplete", "ResponseComplete", "ResponseStarted", "RequestReceived"]),
            "requestURI": rng.choice(["/healthz", "/api/v1/pods", "/livez", "/api/v1/namespaces/a/secrets/x"]),
            "stageTimestamp": rng.choice(STAMPS).format(minute=i % 60, second=i % 59, micros=i % 1_000_000),
        }
        user = rng.choice(users)
        groups = rng.choice([["devs"], ["admins", "x"], [], None])
        changes["user"] = {"username": user, "groups": groups} if user is not None else rng.choice([None, {}])
        if rng.random() < 0.3:
            changes["impersonatedUser"] = None
        resource = rng.choice(resources)
        if resource is None:
            changes["objectRef"] = rng.choice([None, {"namespace": "shop"}])
        else:
            changes["objectRef"] = {
                "resource": resource,
                "namespace": rng.choice(["shop", "kube-system", None]),
                "name": f"o\\{i}" if i % 13 == 0 else f"obj-{i % 7}",
            }
            if rng.random() < 0.2:
                changes["objectRef"]["subresource"] = "exec"
        code = rng.choice([200, 201, 403, 404, None])
        changes["responseStatus"] = {"code": code, "reason": "Forbidden"} if code is not None else None
        if rng.random() < 0.2:
            changes["annotations"] = None
        elif rng.random() < 0.2:
            changes["annotations"] = {"authorization.k8s.io/decision": "forbid"}
        if changes["verb"] == "create" and resource == "pods" and rng.random() < 0.5:
            pod = orjson.loads(orjson.dumps(POD))
            pod["spec"]["containers"][0].setdefault("securityContext", {})["privileged"] = rng.random() < 0.5
            changes["requestObject"] = pod
        else:
            changes["requestObject"] = None
            changes["level"] = "Metadata"
        body = audit(**changes)
        if rng.random() < 0.15:
            body[rng.choice(["requestObject", "responseObject"])] = None  # null: as if there were none
        elif rng.random() < 0.15:
            body.pop("responseObject")
        for key, value in list(body.items()):
            if isinstance(value, dict):
                body[key] = {k: v for k, v in value.items() if v is not None or rng.random() < 0.5}
        out.append(orjson.dumps(body))
    return out


def lazy(lines: list[bytes]) -> Batch:
    """A tail's lazy batch of these lines."""
    block = b"".join(line + b"\n" for line in lines)
    return Batch(
        "audit",
        None,
        None,
        len(block),
        raw_block=block,
        materialize=lambda: [Record("audit", 1, None, line) for line in lines],
        count=len(lines),
    )


def plain(batch: Batch) -> Batch:
    """The same block without the scan's classes: the detect filter's event-by-event path."""
    block = batch.raw_block
    assert block is not None
    return Batch("audit", None, None, len(block), raw_block=block, materialize=lambda: batch.records, count=len(batch))


def alerts_of(flt: DetectTransform, batch: Batch) -> list[bytes]:
    _, emitted = flt.process_emitting(batch)
    return [line for out in emitted for line in (out.raw_block or b"").split(b"\n") if line]


def detect_filter(tmp_path: Path, rules: str | Path) -> DetectTransform:
    path = rules if isinstance(rules, Path) else write(tmp_path / "rules.yaml", rules)
    return build(DetectTransform, rules_file=str(path))


def both_ways(
    tmp_path: Path, lines: list[bytes], rules: str | Path, **audit_options: str
) -> tuple[list[bytes], list[bytes], int]:
    """Alerts by class and event by event, for the kubernetes_audit filter's output of ``lines``;
    and how many events were decided by their class."""
    audit_filter = build(KubernetesAuditTransform, dedupe="off", **audit_options)
    scanned = [audit_filter.process_batch(lazy(lines[i : i + 300])) for i in range(0, len(lines), 300)]
    assert all(detect_classes(batch) is not None for batch in scanned)
    fast, slow = detect_filter(tmp_path, rules), detect_filter(tmp_path, rules)
    by_class = [line for batch in scanned for line in alerts_of(fast, batch)]
    by_event = [line for batch in scanned for line in alerts_of(slow, plain(batch))]
    return by_class, by_event, _counter(fast)


def _counter(flt: DetectTransform) -> int:
    """Events the filter decided by their class."""
    labels = {"component": "detect.0", "kind": "test", "plugin": "detect"}
    return int(flt.metrics.registry.get_sample_value("kubetrail_detect_class_events_total", labels) or 0)


def test_native_classes_are_the_light_decoding(tmp_path: Path) -> None:
    lines = varied(600)
    scanner = NativeScanner([], [], True, [], True)
    scan = scanner.scan_block(b"".join(line + b"\n" for line in lines))
    ids = memoryview(scan.class_ids).cast("I")
    by_values: dict[tuple[Any, ...], int] = {}
    for line, class_id in zip(lines, ids, strict=True):
        assert class_id != detect_module.NO_CLASS, line
        values = class_of(_decode(line))
        assert scanner.class_values(class_id) == values
        # one id per distinct class, the same id for equal classes
        assert by_values.setdefault(values, class_id) == class_id
    assert len(set(by_values.values())) == len(by_values) == scanner.class_count
    assert scanner.class_values(10**6) is None


def _decode(line: bytes) -> Light:
    import msgspec

    return msgspec.json.decode(line, type=Light)


def test_lines_the_scan_does_not_finish_have_no_class() -> None:
    scanner = NativeScanner([], [], True, [], True)
    lines = [
        b'{"auditID":"a","stage":"ResponseComplete","verb":"get"}',
        b'{"stage":"ResponseComplete"}',  # PASS: no auditID
        b'{"auditID":"b","stage":"ResponseComplete","objectRef":{"resource":"secrets"},"level":"Request"}',  # SLOW
        b'{"auditID":"c","stage":"ResponseComplete","verb":5}',  # RETRY: a verb of another type
        b"not json",
    ]
    scan = scanner.scan_block(b"".join(line + b"\n" for line in lines))
    ids = list(memoryview(scan.class_ids).cast("I"))
    assert ids[0] != detect_module.NO_CLASS
    assert ids[1:] == [detect_module.NO_CLASS] * 4


@pytest.mark.parametrize("flatten", ["on", "off"])
def test_by_class_gives_the_alerts_event_by_event_gives(tmp_path: Path, flatten: str) -> None:
    by_class, by_event, counted = both_ways(tmp_path, varied(2000), RULES, flatten=flatten)
    assert by_class == by_event
    assert len(by_event) > 300
    fired = {orjson.loads(line)["rule"] for line in by_event}
    assert fired == {
        "Unknown User",
        "Anonymous Allowed",
        "Sensitive Read",
        "Group Member",
        "Privileged",
        "Failed Request",
    }
    assert counted > 1500  # most events were decided by their class (not all: SLOW secrets)


@pytest.mark.skipif(not FALCO.exists(), reason=f"Falco's rules file not found at {FALCO}")
def test_falco_rules_by_class_and_event_by_event(tmp_path: Path) -> None:
    lines = varied(1500, seed=9)
    # and the benchmark's kind of events: five users, nine resources, seven verbs
    rng = random.Random(3)
    for i in range(1500):
        user = rng.choice(["alice@example.com", "system:kube-scheduler", "system:node:worker-1"])
        changes: dict[str, Any] = {
            "auditID": f"10000000-0000-4000-8000-{i:012d}",
            "verb": rng.choice(["get", "list", "watch", "update", "patch", "create", "delete"]),
            "user": {"username": user, "groups": ["system:authenticated"]},
            "objectRef": {
                "resource": rng.choice(["pods", "configmaps", "secrets", "services", "deployments", "clusterroles"]),
                "namespace": rng.choice(["shop", "kube-system", "default"]),
                "name": f"obj-{i % 50}",
            },
            "level": "Metadata",
            "requestObject": None,
            "responseObject": None,
        }
        lines.append(orjson.dumps(audit(**changes)))
    by_class, by_event, counted = both_ways(tmp_path, lines, FALCO)
    assert by_class == by_event
    assert len(by_event) > 1000
    assert counted > 2000


def test_a_class_the_event_does_not_confirm_is_decided_event_by_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Safeguard: when the scan's class values differ from the event's own decoding (a bug
    there), the class's events are decided one by one: still the same alerts."""
    lines = varied(500, seed=11)
    audit_filter = build(KubernetesAuditTransform, dedupe="off")
    batch = audit_filter.process_batch(lazy(lines))
    found = detect_classes(batch)
    assert found is not None
    scanner, ids = found

    class Lying:
        def class_values(self, class_id: int) -> Any:
            values = scanner.class_values(class_id)
            return (*values[:4], "someone else", *values[5:])

    lying = Lying()
    monkeypatch.setattr(detect_module, "detect_classes", lambda b: (lying, ids) if b is batch else None)
    fast, slow = detect_filter(tmp_path, RULES), detect_filter(tmp_path, RULES)
    assert alerts_of(fast, batch) == alerts_of(slow, plain(batch))
    assert _counter(fast) == 0
    assert all(decision is None for decision in fast._classes[id(lying)][1].values())


def test_without_classes_the_filter_decodes_each_line(tmp_path: Path) -> None:
    """A batch the audit filter changed (a dropped or redacted line) carries no classes."""
    lines = varied(200, seed=2)
    audit_filter = build(KubernetesAuditTransform, dedupe="off", drop_stages="RequestReceived")
    batch = audit_filter.process_batch(lazy(lines))
    assert detect_classes(batch) is None
    flt = detect_filter(tmp_path, RULES)
    assert alerts_of(flt, batch)
    assert _counter(flt) == 0


def test_alert_records_are_the_same_either_way(tmp_path: Path) -> None:
    """Records built from the natively written alerts: same bytes, time and identity."""
    lines = varied(600, seed=4)
    audit_filter = build(KubernetesAuditTransform, dedupe="off")
    batch = audit_filter.process_batch(lazy(lines))
    fast, slow = detect_filter(tmp_path, RULES), detect_filter(tmp_path, RULES)
    (by_class,) = fast.process_emitting(batch)[1]
    (by_event,) = slow.process_emitting(plain(batch))[1]
    assert by_class.raw_block == by_event.raw_block
    assert [(r.time_ns, r.identity, r.raw) for r in by_class.records] == [
        (r.time_ns, r.identity, r.raw) for r in by_event.records
    ]
    assert len(by_class.records) > 50


def test_rate_limit_by_class(tmp_path: Path) -> None:
    lines = varied(800, seed=8)
    audit_filter = build(KubernetesAuditTransform, dedupe="off")
    batch = audit_filter.process_batch(lazy(lines))
    rules = write(tmp_path / "rules.yaml", RULES)
    fast = build(DetectTransform, rules_file=str(rules), rate_limit="3/1h")
    slow = build(DetectTransform, rules_file=str(rules), rate_limit="3/1h")
    by_class, by_event = alerts_of(fast, batch), alerts_of(slow, plain(batch))
    assert by_class == by_event
    assert len(by_event) == 3 * 6  # three of each rule


@pytest.mark.skipif(AlertWriter is None, reason="kubetrail_native has no AlertWriter")
def test_the_native_writer_leaves_odd_times_and_lines_to_python() -> None:
    writer = AlertWriter(
        [(b',"rule":"r","priority":"Notice","source":"k8s_audit","tags":[],"output":"', b": Notice ", [5], [])],
        b',"hostname":"h"',
    )
    good = '{"auditID":"a","stage":"ResponseComplete","user":{"username":"u"},"stageTimestamp":"%s"}'
    stamps = [
        "2026-12-05T03:00:00.123456Z",  # written
        "2026-02-30T03:00:00Z",  # no such day: Python's time is "now"
        "2026-12-05T24:00:00Z",
        "2026-12-05T03:00:00+00:00",  # forms fromisoformat takes: Python's
        "2026-12-05 03:00:00Z",
        "2026-12-05T03:00:00,5Z",
        "2026-12-05T03:00:00.Z",
        "1969-12-31T23:59:59Z",
    ]
    lines = [(good % stamp).encode() for stamp in stamps]
    lines.append(b'{"auditID":"a","stage":"ResponseComplete","verb":"get","verb":"list"}')  # repeated key
    block = b"".join(line + b"\n" for line in lines)
    written = writer.render(block, [(index, 0) for index in range(len(lines))], b'"t"')
    assert written[0] is not None and written[1:] == [None] * (len(lines) - 1)
    assert orjson.loads(written[0])["output"] == "03:00:00.123456000: Notice u"
    with pytest.raises(ValueError):
        writer.render(block, [(len(lines), 0)], b'"t"')


def test_fields_said_to_read_only_an_object_are_missing_without_it() -> None:
    """decide_class folds such fields to 'not available' for a class without the object."""
    from kubetrail.detect.fields import FIELDS, Event, field_ref, object_member

    members = {"requestObject": 0, "responseObject": 0}
    for name, spec in FIELDS.items():
        args = {"none": [None], "index": [None, "0"], "required": ["command", "/requestObject/spec", "/responseObject"]}
        for arg in args[spec.arg]:
            spelling = name if arg is None else f"{name}[{arg}]"
            member = object_member(spelling)
            if member is None:
                continue
            members[member] += 1
            ref = field_ref(name, arg)
            with_it = audit()  # a privileged pod create with both objects
            without = audit(**{member: None})
            nulled = {**audit(), member: None}
            assert Event.from_body(without).value(ref) is None, spelling
            assert Event.from_body(nulled).value(ref) is None, spelling
            if spelling in ("ka.req.pod.containers.image", "ka.resp.name", "jevt.value[/requestObject/spec]"):
                assert Event.from_body(with_it).value(ref) is not None, spelling
    assert members["requestObject"] > 40 and members["responseObject"] >= 3
    assert object_member("ka.req.configmap.name") is None  # the objectRef's name
    assert object_member("ka.req.binding.subject.has_name[x]") is None  # always true
    assert object_member("jevt.value[/requestObjects]") is None
    assert object_member("ka.user.name") is None


def test_lines_are_cut_out_as_asked() -> None:
    from kubetrail.detect.fields import Lines

    for block in (b"a\nbb\n\nccc\n", b"a\nbb\n\nccc"):
        lines = Lines(block)
        assert [lines.line(i) for i in (3, 0, 2, 1)] == [b"ccc", b"a", b"", b"bb"]
    with pytest.raises(IndexError):
        Lines(b"a\n").line(3)
    block = b'{"a":1}\n\n{"b":2}\nlast'
    assert Lines(block).many([2, 0, 3, 1, 2]) == [b'{"b":2}', b'{"a":1}', b"last", b"", b'{"b":2}']
    assert Lines(block).many([1]) == [b""] and Lines(block).many([]) == []
    with pytest.raises(IndexError):
        Lines(block).many([0, 4])


def test_native_class_counts_and_lines_of() -> None:
    from array import array

    from kubetrail_native import class_counts, lines_of

    ids = array("I", [5, 7, 5, detect_module.NO_CLASS, 300, 7, 5])
    assert class_counts(ids.tobytes()) == [(5, 3), (7, 2), (detect_module.NO_CLASS, 1), (300, 1)]
    assert lines_of(ids.tobytes(), [7, detect_module.NO_CLASS]) == [1, 3, 5]
    assert lines_of(ids.tobytes(), []) == [] and class_counts(b"") == []
    with pytest.raises(ValueError):
        class_counts(b"12345")


def test_past_the_class_table_events_are_decided_one_by_one(tmp_path: Path) -> None:
    """The scanner keeps at most 20,000 classes; events of a class past that have none and are
    decided event by event: the same alerts."""
    lines = [
        orjson.dumps(audit(auditID=f"20000000-0000-4000-8000-{i:012d}", user={"username": f"user-{i}"}, verb="get"))
        for i in range(20_100)
    ]
    audit_filter = build(KubernetesAuditTransform, dedupe="off")
    batch = audit_filter.process_batch(lazy(lines))
    found = detect_classes(batch)
    assert found is not None
    ids = memoryview(found[1]).cast("I")
    assert ids[19_999] != detect_module.NO_CLASS and ids[20_000] == detect_module.NO_CLASS
    rules = RULES.replace("items: [alice,", "items: [user-20050, alice,")
    fast, slow = detect_filter(tmp_path, rules), detect_filter(tmp_path, rules)
    by_class, by_event = alerts_of(fast, batch), alerts_of(slow, plain(batch))
    assert by_class == by_event and len(by_event) == 20_100 - 1
    assert _counter(fast) == 20_000
