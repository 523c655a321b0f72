"""The native audit scan (``kubetrail_native``) against the pure-Python scan it replaces.

Both must say the same of every line: code, dedupe key, identity and output bytes. The input
is real audit lines (the audit2rbac demo log in tests/fixtures/, the benchmark generator's events) plus lines made
to hit each edge: escapes, non-ASCII text, nulls, wrong types, unknown stages, not-JSON, lines
that are not object literals, Secrets and TokenRequests to redact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubetrail.core.record import Batch, Record
from kubetrail.transforms import kubernetes_audit
from kubetrail.transforms.kubernetes_audit import DONE, DROP, PASS, RETRY, SLOW, KubernetesAuditTransform, _PyScan
from tests import required
from tests.unit.helpers import build

SHARED_LOG = Path(__file__).resolve().parents[1] / "fixtures" / "audit2rbac" / "demo.log"  # tests/fixtures/NOTICE.md

native_only = pytest.mark.skipif(kubernetes_audit.NativeScanner is None, reason="kubetrail_native is not built")


def test_native_scan_is_installed_where_required() -> None:
    # scripts/setup builds it; CI sets the variable so that a failed build cannot hide as skips.
    if os.environ.get("KUBETRAIL_REQUIRE_NATIVE") == "1":
        assert kubernetes_audit.NativeScanner is not None, "kubetrail_native did not build (see scripts/setup)"


def base_event(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": "RequestResponse",
        "auditID": f"00000000-0000-0000-0000-{i:012d}",
        "stage": "ResponseComplete",
        "requestURI": f"/api/v1/namespaces/shop/pods/web-{i}",
        "verb": "get",
        "user": {"username": "alice", "uid": "u-1", "groups": ["devs", "system:authenticated"]},
        "sourceIPs": ["10.0.0.7", "10.0.0.1"],
        "userAgent": "kubectl/v1.36.0",
        "objectRef": {"resource": "pods", "namespace": "shop", "name": f"web-{i}", "apiVersion": "v1"},
        "responseStatus": {"metadata": {}, "code": 200},
        "stageTimestamp": "2026-11-28T12:00:00.000002Z",
        "annotations": {"authorization.k8s.io/decision": "allow", "authorization.k8s.io/reason": 'RBAC: "q"'},
        **extra,
    }


def edge_lines() -> list[bytes]:
    dumps = orjson.dumps
    secret = {"kind": "Secret", "apiVersion": "v1", "data": {"password": "aHVudGVyMg=="}}
    lines = [
        dumps(base_event(1)),
        dumps(base_event(2, stage="RequestReceived", level="Metadata")),
        dumps(base_event(3, stage="SomethingNew")),  # unknown stage: its whole name is in the key
        dumps(base_event(4, stage="2")),  # a stage spelled like a known stage's key code
        dumps(base_event(5, user={"username": "ünïcødé \u2603", "groups": []})),
        b'{"auditID":"esc\\u0041\\"d","stage":"Panic","userAgent":"tab\\there\\u0001\\u001f\\/x",'
        b'"sourceIPs":[],"user":{"username":null,"groups":null},"level":null}',
        dumps(base_event(6, responseStatus={"code": None})),
        dumps(base_event(7, responseStatus={"code": 2**63 - 1})),
        dumps(base_event(8, responseStatus={"code": -1})),
        dumps(base_event(9, responseStatus={"code": 200.0})),  # wrong type: not an event for either
        dumps(base_event(10, verb=7)),
        dumps(base_event(11, user="alice")),
        dumps(base_event(12, sourceIPs=["10.0.0.1", 5])),
        dumps(base_event(13, auditID=None)),
        dumps({k: v for k, v in base_event(14).items() if k != "stage"}),
        dumps({"log": "not an audit event", "stream": "stdout"}),
        b"not json at all",
        b"",
        b"[1, 2, 3]",
        b"   " + dumps(base_event(15)),  # not an object literal: finished the slow way
        b'{"auditID":"x","stage":"Panic"}',
        dumps(
            base_event(
                16,
                objectRef={"resource": "secrets", "namespace": "shop", "name": "db"},
                requestObject=secret,
                responseObject=secret,
            )
        ),
        dumps(base_event(17, level="Metadata", objectRef={"resource": "secrets", "name": "db"})),
        dumps(
            base_event(
                18,
                objectRef={"resource": "serviceaccounts", "subresource": "token", "name": "sa"},
                responseObject={"kind": "TokenRequest", "status": {"token": "eyJhbGci"}},
            )
        ),
        dumps(
            base_event(
                19,
                objectRef={"resource": "configmaps", "name": "c"},
                responseObject={"kind": "List", "items": [secret]},
            )
        ),
        dumps(base_event(20, annotations={"authorization.k8s.io/decision": "forbid", "other": {"x": [1]}})),
        dumps(base_event(21, impersonatedUser={"username": "bob", "groups": ["ops"]})),
        dumps(base_event(1)),  # a repeat of the first line
        b'{"auditID":"a","stage":"ResponseComplete","extra":{"deep":[{"a":"}{\\""}]}}  ',
        dumps(base_event(22, annotations=None, objectRef=None, user=None, responseStatus=None)),
        b'{"auditID":"\xff","stage":"Panic"}',  # invalid UTF-8 in a decoded field
        b'{"auditID":"u","stage":"Panic","x":"\xc3"}',  # ... and in a skipped one
        b'{"auditID":"a\\ud800","stage":"Panic","user":{"username":"\\udc00x"}}',  # lone surrogates
    ]
    return lines


def real_lines() -> list[bytes]:
    lines = [line for line in SHARED_LOG.read_bytes().split(b"\n") if line.strip()] if SHARED_LOG.exists() else []
    rng = random.Random(7)
    for i in range(300):
        ev = base_event(1000 + i, verb=rng.choice(["get", "list", "create", "patch"]))
        if i % 7 == 0:
            ev["level"] = "Metadata"
        lines.append(orjson.dumps(ev))
    return lines


SCANNERS = [
    {},
    {"drop_stages": "RequestReceived", "drop_levels": "None"},
    {"flatten": "off"},
    {"redact_secrets": "off"},
    {"redact": ["requestObject.spec.password", "responseObject.items.*.value"]},
    {"scan_threads": "1"},
    {"scan_threads": "3"},  # big batches cut in three uneven parts
]


def filtered(options: dict[str, Any], native: str, lines: list[bytes]) -> list[tuple[bytes, Any]]:
    """What a fresh filter makes of ``lines`` as records: the output bytes and identities."""
    flt = build(KubernetesAuditTransform, native=native, **options)
    records = [Record("audit", 1, None, line, ("file-uid", i)) for i, line in enumerate(lines)]
    return [(r.json_bytes(), r.identity) for r in flt.process(records)]


def compare(options: dict[str, Any], lines: list[bytes]) -> None:
    flt = build(KubernetesAuditTransform, **options)
    assert flt.native is not None
    raw = flt.native.scan_lines(lines)  # before the Python scan decides its RETRY lines
    scan = flt._scan_lines(lines)
    python = _PyScan(flt.scan_options, lines)
    assert scan.keys == python.keys
    assert scan.identities() == python.identities()
    for index, line in enumerate(lines):
        if raw.codes[index] == RETRY:  # decided by the Python scan; its events finished per record
            assert scan.codes[index] == (SLOW if python.codes[index] == DONE else python.codes[index])
        else:
            assert scan.codes[index] == python.codes[index], (index, line)
            assert raw.splice(index, line) == python.splice(index, line), (index, line)
    # What the filter delivers, record for record: the same bytes and identities either way.
    assert filtered(options, "on", lines) == filtered(options, "off", lines)
    if RETRY not in raw.codes:
        keep = bytes(i % 3 != 1 for i in range(len(lines)))
        replacements = {0: b'{"replaced":true}', 2: b""}
        assert raw.build(keep, replacements) == python.build(keep, replacements)
        assert flt.native.scan_lines(lines).build() == python.build()
    block = b"".join(line + b"\n" for line in lines)
    if block.count(b"\n") == len(lines):  # one line per document: what a tail block holds
        native_block = flt.native.scan_block(block)
        assert native_block.codes == raw.codes
        assert native_block.build() == flt.native.scan_lines(lines).build()


@native_only
@pytest.mark.parametrize("options", SCANNERS, ids=lambda o: ",".join(o) or "defaults")
def test_native_and_python_scans_agree(options: dict[str, Any]) -> None:
    compare(options, edge_lines())
    compare(options, real_lines())
    compare(options, real_lines() + edge_lines() + real_lines())  # edges inside a part, not at its ends


@native_only
def test_scan_threads_is_what_the_scanner_uses() -> None:
    assert build(KubernetesAuditTransform, scan_threads="3").native.threads == 3
    assert build(KubernetesAuditTransform, scan_threads="1").native.threads == 1
    auto = build(KubernetesAuditTransform).native.threads  # the CPUs this process may use but one, 1 to 4
    cpus = len(os.sched_getaffinity(0))
    assert 1 <= auto <= max(1, min(4, cpus - 1))  # fewer only under a cgroup CPU quota


@native_only
def test_the_scan_codes_say_what_happens_to_each_line() -> None:
    flt = build(KubernetesAuditTransform, drop_stages="RequestReceived")
    lines = edge_lines()
    scan = flt.native.scan_lines(lines)
    assert scan.codes[0] == DONE
    assert scan.codes[1] == DROP  # RequestReceived
    # a float status code, not JSON, empty: not decoded natively; the Python scan decides
    assert scan.codes[9] == scan.codes[16] == scan.codes[17] == RETRY
    decided = flt._scan_lines(lines)
    assert decided.codes[9] == decided.codes[16] == decided.codes[17] == PASS  # msgspec refuses them too
    assert decided.codes[15] == PASS  # no stage
    assert scan.codes[19] == SLOW  # leading blanks
    assert scan.codes[21] == SLOW and scan.codes[23] == SLOW and scan.codes[24] == SLOW  # redaction
    assert scan.codes[22] == DONE  # a Secret at level Metadata carries no body
    assert scan.keys[2] == "00000000-0000-0000-0000-000000000003SomethingNew"
    assert scan.identities()[3] == ("00000000-0000-0000-0000-000000000004", "2")


@native_only
def test_build_checks_its_mask_and_works_until_release() -> None:
    flt = build(KubernetesAuditTransform)
    block = orjson.dumps(base_event(1)) + b"\n" + orjson.dumps(base_event(2)) + b"\n"
    scan = flt.native.scan_block(block)
    with pytest.raises(ValueError, match="one byte per line"):
        scan.build(b"\x01")
    with pytest.raises(TypeError):
        scan.build(None, {0: "not bytes"})
    both = scan.build()
    second = scan.build(b"\x00\x01")  # built again with a mask: the filter's dedupe case
    assert both.split(b"\n")[1] + b"\n" == second == scan.splice(1) + b"\n"
    assert scan.build(None, {0: b"{}"}) == b"{}\n" + second
    scan.release()
    with pytest.raises(ValueError, match="released"):
        scan.build()
    with pytest.raises(ValueError, match="released"):
        scan.splice(0)
    assert scan.identities()[1] is not None  # what the lazy batch needs later stays


def is_json(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


def lazy_batch(lines: list[bytes]) -> Batch:
    block = b"".join(line + b"\n" for line in lines)

    def materialize() -> list[Record]:
        return [Record("audit", 1000 + i, None, line, ("file-uid", i)) for i, line in enumerate(lines)]

    return Batch("audit", None, None, len(block), raw_block=block, materialize=materialize, count=len(lines))


@pytest.mark.parametrize("native", ["on", "off"])
def test_a_lazy_batch_and_its_records_give_the_same_output(native: str) -> None:
    """process_batch (the block path) and process (the record path) agree, record for record."""
    if native == "on" and kubernetes_audit.NativeScanner is None:
        required.unavailable("kubetrail_native is not built", kind="native")
    # A lazy batch holds JSON lines the tail has validated.
    lines = [line for line in real_lines() + edge_lines() if line and b"\n" not in line and is_json(line)]
    by_block = build(KubernetesAuditTransform, native=native).process_batch(lazy_batch(lines))
    by_records = build(KubernetesAuditTransform, native=native).process(lazy_batch(lines).records)
    assert len(by_block) == len(by_records) < len(lines)  # the repeat of line 0 is removed
    block_records = by_block.records
    assert by_block.raw_block == b"".join(r.json_bytes() + b"\n" for r in block_records)
    for a, b in zip(block_records, by_records, strict=True):
        assert (a.time_ns, a.identity) == (b.time_ns, b.identity)
        assert orjson.loads(a.json_bytes()) == orjson.loads(b.json_bytes())
    secret_lines = [r.raw for r in block_records if r.raw and b'"secrets"' in r.raw]
    assert secret_lines and all(b"aHVudGVyMg==" not in raw for raw in secret_lines)
    # an audit event gets (auditID, stage); anything else keeps the tail's (uid, offset)
    assert any(r.identity and r.identity[0] == "file-uid" for r in block_records)
    assert all(r.identity and r.identity[0] != "file-uid" for r in block_records if b'"k8s.audit.id"' in (r.raw or b""))


@native_only
def test_key_set_keeps_uuid_keys_compact_and_others_as_text() -> None:
    seen = kubernetes_audit.NativeKeySet()
    uuid_key = "d23f0824-128b-2f33-0c5c-7fd0a6a3a450" + "2"
    others = [
        "D23F0824-128B-2F33-0C5C-7FD0A6A3A450" + "2",  # upper case: another string, kept as text
        "d23f0824-128b-2f33-0c5c-7fd0a6a3a450" + "9",  # not a known stage code
        "d23f0824-128b-2f33-0c5c-7fd0a6a3a450" + "SomethingNew",
        "d23f0824128b2f330c5c7fd0a6a3a4502",  # no hyphens
        "x",
        "",
    ]
    batch = seen.add([uuid_key, *others])
    assert len(seen) == len(batch) == 7
    assert uuid_key in seen and all(key in seen for key in others)
    assert "d23f0824-128b-2f33-0c5c-7fd0a6a3a450" + "1" not in seen  # another stage
    assert "e23f0824-128b-2f33-0c5c-7fd0a6a3a450" + "2" not in seen
    assert not seen.isdisjoint(["nope", uuid_key]) and seen.isdisjoint(["nope"])
    seen.forget(batch)
    assert len(seen) == 0 and uuid_key not in seen


@native_only
def test_key_set_takes_a_scan_only_when_all_its_keys_are_new() -> None:
    flt = build(KubernetesAuditTransform)
    seen = kubernetes_audit.NativeKeySet()
    first = [orjson.dumps(base_event(i)) for i in range(3)]
    batch = seen.add_scan_if_new(flt.native.scan_lines(first))
    assert batch is not None and len(batch) == len(seen) == 3
    again = [orjson.dumps(base_event(7)), orjson.dumps(base_event(1))]  # line 2 was seen
    assert seen.add_scan_if_new(flt.native.scan_lines(again)) is None
    assert len(seen) == 3  # nothing added
    repeated = [orjson.dumps(base_event(8)), orjson.dumps(base_event(8))]
    assert seen.add_scan_if_new(flt.native.scan_lines(repeated)) is None
    assert len(seen) == 3
    not_events = [b'{"log":"x"}', b"not json"]
    assert len(seen.add_scan_if_new(flt.native.scan_lines(not_events))) == 0
    seen.forget(batch)
    assert len(seen) == 0


def mutated_lines(count: int, seed: int = 11) -> list[bytes]:
    """Real-looking events with bytes flipped, cut or repeated: mostly broken in small ways."""
    rng = random.Random(seed)
    sources = [orjson.dumps(base_event(i, verb="patch")) for i in range(20)] + edge_lines()[:25]
    specials = b'"{}[],:\\ \x00\xff\xc3e0-tn'
    out = []
    for _ in range(count):
        line = bytearray(rng.choice(sources) or b"{}")
        for _ in range(rng.randint(1, 3)):
            op = rng.random()
            at = rng.randrange(len(line)) if line else 0
            if op < 0.5 and line:
                line[at] = rng.choice(specials)
            elif op < 0.7:
                del line[at:]
            else:
                line[at:at] = line[at : at + rng.randint(1, 12)]
        out.append(bytes(line).replace(b"\n", b" "))
    return out


@native_only
@pytest.mark.parametrize("options", [{}, {"drop_levels": "Metadata"}, {"flatten": "off"}], ids=str)
def test_native_and_python_scans_agree_on_broken_lines(options: dict[str, Any]) -> None:
    flt = build(KubernetesAuditTransform, **options)
    lines = mutated_lines(1500)
    codes = flt.native.scan_lines(lines).codes
    assert PASS in codes and DONE in codes and RETRY in codes  # the mutations left every kind
    compare(options, lines)


@pytest.mark.parametrize("native", ["on", "off"])
def test_a_block_that_is_not_one_line_per_record_goes_the_record_way(native: str) -> None:
    if native == "on" and kubernetes_audit.NativeScanner is None:
        required.unavailable("kubetrail_native is not built", kind="native")
    lines = [orjson.dumps(base_event(i)) for i in range(3)]
    for block in (b"\n".join(lines), b"".join(line + b"\n" for line in lines) + b"{}\n"):
        batch = lazy_batch(lines)
        batch.raw_block = block  # no final newline; one line more than records
        out = build(KubernetesAuditTransform, native=native).process_batch(batch)
        assert out.raw_block is None  # the records were filtered one by one
        assert [r.identity for r in out.records] == [
            (f"00000000-0000-0000-0000-{i:012d}", "ResponseComplete") for i in range(3)
        ]


@native_only
def test_escaped_strings_of_every_length_are_written_as_the_python_scan_writes_them() -> None:
    """The native writer passes over 16-byte chunks with nothing to escape: an escape (or a
    control character) at every position of strings of every length up to a few chunks."""
    specials = ['"', "\\", "\n", "\t", "\x01", "\x1f", "\x7f", "é", "\u2028"]
    lines = []
    for length in range(0, 50):
        for at in range(0, length, 3):
            special = specials[(length + at) % len(specials)]
            text = "a" * at + special + "b" * (length - at)
            lines.append(orjson.dumps(base_event(length * 100 + at, userAgent=text, requestURI=text * 2)))
    compare({}, lines)
