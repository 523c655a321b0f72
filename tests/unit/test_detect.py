"""The detect engine and filter: Falco's rules language on hand-written audit events.

Falco's own rules file is read from examples/history/rules/ (Apache-2.0, licence header kept) when
it is there, unchanged; those tests are skipped with the reason otherwise. The events of the
real API server are in tests/integration/test_detect.py.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubetrail.detect import Event, RulesError, RuleSet, compile_rules, load_rules
from kubetrail.detect.fields import FIELDS
from tests.unit.helpers import write

FALCO_RULES = Path(__file__).resolve().parents[2] / "examples" / "history" / "rules" / "k8s_audit_rules.yaml"
needs_falco = pytest.mark.skipif(not FALCO_RULES.exists(), reason=f"Falco's rules file not found at {FALCO_RULES}")

POD = {
    "kind": "Pod",
    "metadata": {"name": "web", "namespace": "shop"},
    "spec": {
        "hostNetwork": True,
        "hostPID": False,
        "securityContext": {"runAsUser": 1000, "fsGroup": 2000, "supplementalGroups": [3, 4]},
        "containers": [
            {
                "name": "app",
                "image": "registry.example/app:1.2@sha256:abc",
                "ports": [{"containerPort": 80}, {"containerPort": 81, "hostPort": 8081}],
                "securityContext": {
                    "privileged": True,
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "runAsGroup": 7,
                    "procMount": "Default",
                    "capabilities": {"add": ["NET_ADMIN", "SYS_TIME"]},
                },
            },
            {"name": "side", "image": "busybox", "securityContext": {"runAsUser": 5}},
        ],
        "initContainers": [{"name": "init", "image": "alpine:3", "securityContext": {"privileged": False}}],
        "volumes": [
            {"name": "proc", "hostPath": {"path": "/proc"}},
            {"name": "cfg", "configMap": {"name": "c"}},
            {"name": "flex", "flexVolume": {"driver": "example/driver"}},
        ],
    },
}


def audit(**changes: Any) -> dict[str, Any]:
    """A ResponseComplete pod create by alice, with ``changes`` merged in (None removes a key)."""
    event: dict[str, Any] = {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": "RequestResponse",
        "auditID": "0b7f2c3e-1111-4a4a-9c9c-000000000001",
        "stage": "ResponseComplete",
        "requestURI": "/api/v1/namespaces/shop/pods?fieldManager=kubectl&dryRun=All",
        "verb": "create",
        "user": {"username": "alice", "groups": ["devs", "system:authenticated"]},
        "impersonatedUser": {"username": "bob"},
        "sourceIPs": ["10.0.0.7", "192.168.1.1"],
        "userAgent": "kubectl/v1.36.3",
        "objectRef": {"resource": "pods", "namespace": "shop", "name": "web", "apiVersion": "v1"},
        "responseStatus": {"metadata": {}, "code": 201},
        "requestObject": copy.deepcopy(POD),
        "responseObject": {"kind": "Pod", "metadata": {"name": "web-resp"}},
        "requestReceivedTimestamp": "2026-12-05T03:00:00.000000Z",
        "stageTimestamp": "2026-12-05T03:00:00.123456Z",
        "annotations": {"authorization.k8s.io/decision": "allow", "authorization.k8s.io/reason": "RBAC: yes"},
    }
    for key, value in changes.items():
        if value is None:
            event.pop(key, None)
        else:
            event[key] = value
    return event


def engine_of(text: str, *more: str) -> Any:
    ruleset = RuleSet()
    ruleset.load_text(text, "base.yaml")
    for number, extra in enumerate(more, 1):
        ruleset.load_text(extra, f"override{number}.yaml")
    return compile_rules(ruleset)


def rule(condition: str, name: str = "r", priority: str = "WARNING", output: str = "out", **extra: Any) -> str:
    lines = [
        f"- rule: {name}",
        "  desc: test",
        f"  condition: {orjson.dumps(condition).decode()}",
        f"  output: {orjson.dumps(output).decode()}",
        f"  priority: {priority}",
        "  source: k8s_audit",
    ]
    lines += [f"  {key}: {orjson.dumps(value).decode()}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def fires(condition: str, event: dict[str, Any], lists: str = "") -> bool:
    engine = engine_of(lists + rule(condition))
    return [r.name for r in engine.match(Event.from_body(event))] == ["r"]


# -- every field ----------------------------------------------------------------------------

FIELD_VALUES: list[tuple[str, Any]] = [
    ("ka.auditid", "0b7f2c3e-1111-4a4a-9c9c-000000000001"),
    ("ka.stage", "ResponseComplete"),
    ("ka.auth.decision", "allow"),
    ("ka.auth.reason", "RBAC: yes"),
    ("ka.user.name", "alice"),
    ("ka.user.groups", ["devs", "system:authenticated"]),
    ("ka.impuser.name", "bob"),
    ("ka.verb", "create"),
    ("ka.uri", "/api/v1/namespaces/shop/pods?fieldManager=kubectl&dryRun=All"),
    ("ka.uri.param[dryRun]", "All"),
    ("ka.target.name", "web"),
    ("ka.target.namespace", "shop"),
    ("ka.target.resource", "pods"),
    ("ka.target.subresource", None),
    ("ka.req.binding.subjects", None),
    ("ka.req.binding.role", None),
    ("ka.req.binding.subject.has_name[x]", "true"),
    ("ka.req.configmap.name", "web"),
    ("ka.req.configmap.obj", None),
    ("ka.req.pod.containers.image", ["registry.example/app:1.2@sha256:abc", "busybox"]),
    ("ka.req.pod.containers.image[1]", ["busybox"]),
    ("ka.req.pod.containers.image.repository", ["registry.example/app", "busybox"]),
    ("ka.req.pod.initContainers.image", ["alpine:3"]),
    ("ka.req.pod.initContainers.image.repository", ["alpine"]),
    ("ka.req.pod.ephemeralContainers.image", None),
    ("ka.req.container.image", "registry.example/app:1.2@sha256:abc"),
    ("ka.req.container.image.repository", "registry.example/app"),
    ("ka.req.pod.host_ipc", None),
    ("ka.req.pod.host_network", "true"),
    ("ka.req.container.host_network", "true"),
    ("ka.req.pod.host_pid", "false"),
    ("ka.req.pod.containers.host_port", ["80", "8081"]),
    ("ka.req.pod.containers.privileged", ["true"]),
    ("ka.req.pod.initContainers.privileged", ["false"]),
    ("ka.req.container.privileged", "true"),
    ("ka.req.pod.containers.allow_privilege_escalation", ["false"]),
    ("ka.req.pod.containers.read_only_fs", ["true"]),
    ("ka.req.pod.run_as_user", "1000"),
    ("ka.req.pod.containers.run_as_user", ["5"]),
    ("ka.req.pod.containers.eff_run_as_user", ["1000", "5"]),
    ("ka.req.pod.run_as_group", None),
    ("ka.req.pod.containers.run_as_group", ["7"]),
    ("ka.req.pod.containers.eff_run_as_group", ["7", "0"]),
    ("ka.req.pod.containers.proc_mount", ["Default"]),
    ("ka.req.pod.containers.add_capabilities", ['["NET_ADMIN","SYS_TIME"]']),
    ("ka.req.pod.fs_group", "2000"),
    ("ka.req.pod.supplemental_groups", ["3", "4"]),
    ("ka.req.pod.volumes.hostpath", ["/proc"]),
    ("ka.req.volume.hostpath[/proc]", "true"),
    ("ka.req.volume.hostpath[/pr*]", "true"),
    ("ka.req.volume.hostpath[/etc]", "false"),
    ("ka.req.pod.volumes.flexvolume_driver", ["example/driver"]),
    ("ka.req.pod.volumes.volume_type", ["hostPath", "configMap", "flexVolume"]),
    ("ka.req.role.rules", None),
    ("ka.req.service.type", None),
    ("ka.req.service.ports", None),
    ("ka.resp.name", "web-resp"),
    ("ka.response.code", "201"),
    ("ka.response.reason", None),
    ("ka.useragent", "kubectl/v1.36.3"),
    ("ka.sourceips", ["10.0.0.7", "192.168.1.1"]),
    ("jevt.value[/objectRef/name]", "web"),
    ("jevt.value[/stage]", "ResponseComplete"),
    ("jevt.value[/responseStatus]", '{"metadata":{},"code":201}'),
    ("jevt.value[/annotations/authorization.k8s.io~1decision]", "allow"),
    ("jevt.value[/requestObject/spec/containers/1/name]", "side"),
    ("jevt.value[/nope]", None),
    ("jevt.time", "03:00:00.123456000"),
    ("jevt.time.iso8601", "2026-12-05T03:00:00.123456000Z"),
    ("jevt.rawtime", "1796439600123456000"),
]


@pytest.mark.parametrize(("text", "expected"), FIELD_VALUES, ids=[t for t, _ in FIELD_VALUES])
def test_field_values(text: str, expected: Any) -> None:
    from kubetrail.detect.condition import split_field
    from kubetrail.detect.fields import field_ref

    ref = field_ref(*split_field(text))
    assert Event.from_body(audit()).value(ref) == expected


def test_every_field_is_covered() -> None:
    named = {t.partition("[")[0] for t, _ in FIELD_VALUES}
    other = {
        "ka.req.pod.ephemeralContainers.image.repository",
        "jevt.obj",  # in test_role_binding_service_and_configmap_fields, as the role rules fields
        "ka.req.role.rules.apiGroups",
        "ka.req.role.rules.nonResourceURLs",
        "ka.req.role.rules.resources",
        "ka.req.role.rules.verbs",
    }
    missing = {
        name
        for name in FIELDS
        if name not in named
        and name not in other
        and not name.startswith("json.")
        and not name.startswith(("ka.req.pod.initContainers.", "ka.req.pod.ephemeralContainers."))
    }
    assert not missing, f"fields without a test value: {sorted(missing)}"


def test_role_binding_service_and_configmap_fields() -> None:
    from kubetrail.detect.fields import field_ref

    role = audit(
        objectRef={"resource": "clusterroles", "name": "r"},
        requestObject={"rules": [{"apiGroups": [""], "resources": ["pods", "pods/exec"], "verbs": ["*"]}]},
    )
    ev = Event.from_body(role)
    assert ev.value(field_ref("ka.req.role.rules.resources", None)) == ["pods", "pods/exec"]
    assert ev.value(field_ref("ka.req.role.rules.verbs", None)) == ["*"]
    assert ev.value(field_ref("ka.req.role.rules.apiGroups", None)) == [""]
    assert ev.value(field_ref("ka.req.role.rules.nonResourceURLs", None)) is None
    assert ev.value(field_ref("ka.req.role.rules", None)) == [
        '{"apiGroups":[""],"resources":["pods","pods/exec"],"verbs":["*"]}'
    ]
    binding = Event.from_body(
        audit(
            requestObject={
                "roleRef": {"kind": "ClusterRole", "name": "cluster-admin"},
                "subjects": [{"kind": "User", "name": "mallory"}],
            }
        )
    )
    assert binding.value(field_ref("ka.req.binding.role", None)) == "cluster-admin"
    assert binding.value(field_ref("ka.req.binding.subjects", None)) == ['{"kind":"User","name":"mallory"}']
    service = Event.from_body(audit(requestObject={"spec": {"type": "NodePort", "ports": [{"port": 80}]}}))
    assert service.value(field_ref("ka.req.service.type", None)) == "NodePort"
    assert service.value(field_ref("ka.req.service.ports", None)) == ['{"port":80}']
    cm = Event.from_body(audit(requestObject={"data": {"password": "x"}}))
    assert cm.value(field_ref("ka.req.configmap.obj", None)) == '{"password":"x"}'
    assert orjson.loads(cm.value(field_ref("jevt.obj", None)))["auditID"] == audit()["auditID"]


# -- every operator ---------------------------------------------------------------------------

OPERATORS = [
    ("ka.verb = create", True),
    ("ka.verb == create", True),
    ("ka.verb=create", True),
    ("ka.verb != create", False),
    ("ka.verb != get", True),
    ("ka.response.code < 300", True),
    ("ka.response.code <= 201", True),
    ("ka.response.code > 201", False),
    ("ka.response.code >= 200", True),
    ("ka.response.code >= 1000", False),  # numeric, not byte-wise
    ("ka.user.name < bob", True),  # strings compare as strings
    ("ka.uri contains namespaces/shop", True),
    ("ka.uri icontains NAMESPACES/SHOP", True),
    ("ka.uri bcontains fieldManager", True),
    ("ka.uri contains NAMESPACES", False),
    ("ka.uri startswith /api/v1", True),
    ("ka.uri bstartswith /apis", False),
    ("ka.uri endswith dryRun=All", True),
    ("ka.target.namespace glob 's*p'", True),
    ("ka.target.namespace glob 'S*'", False),
    ("ka.target.namespace iglob 'S*'", True),
    ("ka.useragent regex 'kubectl/v1\\.3[0-9]\\..*'", True),
    ("ka.useragent regex 'kubectl'", False),  # a full match, as Falco's
    ("ka.verb in (get, create)", True),
    ("ka.verb in (get, list)", False),
    ("ka.verb intersects (create)", True),
    ("ka.uri pmatch (/api/v1/namespaces)", True),  # a path below the prefix
    ("ka.uri pmatch (/api/v1/namespace)", False),  # not at a path boundary
    ("jevt.value[/objectRef/apiVersion] pmatch (v1)", True),
    ("ka.user.groups in (devs, system:authenticated, other)", True),  # every value in the set
    ("ka.user.groups in (devs)", False),
    ("ka.user.groups intersects (devs)", True),  # at least one
    ("ka.user.groups intersects (ops)", False),
    ("ka.req.pod.volumes.hostpath pmatch (/)", True),
    ("ka.req.pod.volumes.hostpath pmatch (/etc)", False),
    ("ka.target.subresource exists", False),
    ("not ka.target.subresource exists", True),
    ("ka.target.name exists", True),
    ("ka.verb = create and ka.target.resource = pods", True),
    ("ka.verb = get or ka.target.resource = pods", True),
    ("not ka.verb = get and not (ka.verb = list or ka.verb = watch)", True),
    ("ka.verb = get or ka.verb = create and ka.target.resource = nodes", False),  # and binds tighter
    ("(ka.verb = get or ka.verb = create) and ka.target.resource = pods", True),
    ('ka.auth.reason = "RBAC: yes"', True),
    ("ka.auth.reason = 'RBAC: yes'", True),
    ('ka.user.name in ("alice", "eve")', True),
    ("ka.req.pod.host_network intersects (true)", True),
    # Missing values make every check false, so their negation true.
    ("ka.response.reason = x", False),
    ("ka.response.reason != x", False),
    ("not ka.response.reason = x", True),
    ("ka.req.service.type in (NodePort)", False),
    ("jevt.value[/a/b/c] startswith x", False),
]


@pytest.mark.parametrize(("condition", "expected"), OPERATORS, ids=[c for c, _ in OPERATORS])
def test_operators(condition: str, expected: bool) -> None:
    assert fires(condition, audit()) is expected


def test_lists_inside_lists_and_quoted_names_are_values() -> None:
    lists = """
- list: inner
  items: [alice]
- list: outer
  items: [inner, "carol"]
"""
    assert fires("ka.user.name in (outer)", audit(), lists)
    assert not fires('ka.user.name in ("outer")', audit(), lists)  # quoted: the word itself
    assert fires("ka.user.name in (nobody, outer)", audit(), lists)


def test_events_that_are_not_audit_events_fire_nothing() -> None:
    engine = engine_of(rule("ka.verb exists or not ka.verb exists"))
    assert engine.match(Event.from_body({"message": "not audit"})) == []
    assert engine.match(Event(b"not json at all")) == []
    assert [r.name for r in engine.match(Event.from_body(audit()))] == ["r"]


def test_odd_shapes_are_not_errors() -> None:
    # Wrong types where rules look: no exception, the field is simply not there (or text).
    odd = audit(user="alice", objectRef=["x"], requestObject={"spec": {"containers": "none", "volumes": [1, None]}})
    engine = engine_of(
        rule("ka.user.name = alice or ka.req.pod.containers.privileged intersects (true)", name="a")
        + rule("ka.req.pod.volumes.hostpath exists", name="b")
        + rule("ka.verb = create", name="c")
    )
    assert [r.name for r in engine.match(Event.from_body(odd))] == ["c"]


def test_a_number_orjson_refuses_does_not_blind_a_rule() -> None:
    """The request body is logged as sent: ``1e999`` beside a privileged container. Audit lines
    are validated by msgspec, which reads it; orjson refuses it, so the event read as empty and
    no rule fired on it. The number is read as its text."""
    raw = orjson.dumps(audit()).replace(b'"runAsUser":1000', b'"runAsUser":1e999', 1)
    assert raw.count(b"1e999") == 1
    engine = engine_of(
        rule("ka.req.pod.containers.privileged intersects (true)", name="privileged")
        + rule("ka.req.pod.host_network = true", name="host network")
    )
    assert sorted(r.name for r in engine.match(Event(raw))) == ["host network", "privileged"]


# -- outputs -----------------------------------------------------------------------------------


def test_output_substitutes_fields_lists_and_missing_values() -> None:
    engine = engine_of(
        rule(
            "ka.verb = create",
            output="user=%ka.user.name groups=%ka.user.groups cmd=%ka.uri.param[dryRun] "
            "vol=%jevt.value[/requestObject/spec/volumes/0] reason=%ka.response.reason",
            priority="notice",
            tags=["k8s", "test"],
        )
    )
    ev = Event.from_body(audit())
    (fired,) = engine.match(ev)
    record = engine.alert_record(engine.alert(fired, ev), ev)
    assert record["output"] == (
        "03:00:00.123456000: Notice user=alice groups=(devs,system:authenticated) cmd=All "
        'vol={"name":"proc","hostPath":{"path":"/proc"}} reason=<NA>'
    )
    assert record["output_fields"] == {
        "ka.user.name": "alice",
        "ka.user.groups": "(devs,system:authenticated)",
        "ka.uri.param[dryRun]": "All",
        "jevt.value[/requestObject/spec/volumes/0]": '{"name":"proc","hostPath":{"path":"/proc"}}',
        "ka.response.reason": None,
    }
    assert record["priority"] == "Notice" and record["rule"] == "r" and record["source"] == "k8s_audit"
    assert record["tags"] == ["k8s", "test"] and record["time"] == "2026-12-05T03:00:00.123456000Z"
    assert record["k8s.audit.id"] == audit()["auditID"] and record["k8s.audit.stage"] == "ResponseComplete"
    assert record["hostname"]


# -- loading: append, override, exceptions, enabled, sources ---------------------------------------

BASE = """
- required_engine_version: 15
- required_plugin_versions:
    - name: k8saudit
      version: 0.18.0
- list: users
  items: [alice]
- macro: is_create
  condition: ka.verb = create
- rule: Create By User
  desc: d
  condition: is_create and ka.user.name in (users)
  output: created by %ka.user.name
  priority: WARNING
  source: k8s_audit
  tags: [k8s]
"""


def names(engine: Any, event: dict[str, Any]) -> list[str]:
    return [r.name for r in engine.match(Event.from_body(event))]


def test_base_rule_fires() -> None:
    assert names(engine_of(BASE), audit()) == ["Create By User"]
    assert names(engine_of(BASE), audit(user={"username": "carol"})) == []


def test_list_append_legacy_and_override() -> None:
    legacy = "- list: users\n  items: [carol]\n  append: true\n"
    override = "- list: users\n  items: [carol]\n  override:\n    items: append\n"
    replace = "- list: users\n  items: [carol]\n  override:\n    items: replace\n"
    carol = audit(user={"username": "carol"})
    assert names(engine_of(BASE, legacy), carol) == ["Create By User"]
    assert names(engine_of(BASE, override), carol) == ["Create By User"]
    assert names(engine_of(BASE, override), audit()) == ["Create By User"]
    assert names(engine_of(BASE, replace), audit()) == []  # alice is gone


def test_macro_append_and_replace() -> None:
    appended = "- macro: is_create\n  condition: or ka.verb = delete\n  append: true\n"
    replaced = "- macro: is_create\n  condition: ka.verb = delete\n  override:\n    condition: replace\n"
    delete = audit(verb="delete")
    assert names(engine_of(BASE, appended), delete) == ["Create By User"]
    assert names(engine_of(BASE, replaced), delete) == ["Create By User"]
    assert names(engine_of(BASE, replaced), audit()) == []


def test_rule_condition_append_and_override_of_keys() -> None:
    appended = "- rule: Create By User\n  condition: and ka.target.namespace = prod\n  append: true\n"
    assert names(engine_of(BASE, appended), audit()) == []
    override = """
- rule: Create By User
  condition: and ka.target.namespace = shop
  priority: ERROR
  output: changed %ka.target.name
  override:
    condition: append
    priority: replace
    output: replace
"""
    engine = engine_of(BASE, override)
    (fired,) = engine.match(Event.from_body(audit()))
    assert fired.priority_name == "Error"
    assert engine.alert(fired, Event.from_body(audit())).output == "changed web"


def test_redefinition_replaces_and_enabled_toggles() -> None:
    redefined = BASE.split("- rule:")[0].replace("- required_engine_version: 15", "") + (
        "- rule: Create By User\n  desc: again\n  condition: ka.verb = delete\n  output: o\n"
        "  priority: INFO\n  source: k8s_audit\n"
    )
    assert names(engine_of(BASE, redefined), audit()) == []
    off = "- rule: Create By User\n  enabled: false\n"
    assert names(engine_of(BASE, off), audit()) == []
    back = "- rule: Create By User\n  enabled: true\n  override:\n    enabled: replace\n"
    assert names(engine_of(BASE, off, back), audit()) == ["Create By User"]
    assert engine_of(BASE, off).disabled == 1


def test_exceptions_fields_comps_values_and_appending_values() -> None:
    with_exceptions = """
- rule: Pods
  desc: d
  condition: ka.target.resource = pods
  output: o
  priority: WARNING
  source: k8s_audit
  exceptions:
    - name: ns_and_user
      fields: [ka.target.namespace, ka.user.name]
      comps: [=, startswith]
      values:
        - [shop, ali]
    - name: images
      fields: ka.req.pod.containers.image.repository
      values: [nothing-here]
    - name: groups
      fields: [ka.user.groups]
      comps: [intersects]
      values:
        - [[ops, admins]]
"""
    assert names(engine_of(with_exceptions), audit()) == []  # shop + ali... matches the first
    assert names(engine_of(with_exceptions), audit(user={"username": "carol"})) == ["Pods"]
    assert names(engine_of(with_exceptions), audit(user={"username": "carol", "groups": ["ops"]})) == []
    more_values = """
- rule: Pods
  exceptions:
    - name: images
      values: [registry.example/app, busybox]
  override:
    exceptions: append
"""
    carol = audit(user={"username": "carol"})
    assert names(engine_of(with_exceptions, more_values), carol) == []  # every repository excepted
    new_exception = """
- rule: Pods
  exceptions:
    - name: by_verb
      fields: ka.verb
      comps: in
      values: [create]
  append: true
"""
    assert names(engine_of(with_exceptions, new_exception), carol) == []


def test_other_sources_are_skipped_and_counted() -> None:
    text = BASE + (
        "- rule: Shell\n  desc: d\n  condition: proc.name = bash\n  output: o\n  priority: WARNING\n"
        "- rule: Cloud\n  desc: d\n  condition: ct.name = x\n  output: o\n  priority: INFO\n  source: aws_cloudtrail\n"
    )
    engine = engine_of(text)
    assert [r.name for r in engine.rules] == ["Create By User"]
    assert engine.skipped_sources == {"syscall": 1, "aws_cloudtrail": 1}


def test_unused_macros_and_lists_and_list_like_values_are_warned() -> None:
    text = BASE + "- macro: spare\n  condition: ka.verb = get\n- list: spare_list\n  items: [a]\n"
    text += rule("ka.user.name in (allowed_userz)", name="typo")
    warnings = "\n".join(engine_of(text).warnings)
    assert "macro 'spare' is never used" in warnings
    assert "list 'spare_list' is never used" in warnings
    assert "'allowed_userz' is used as a value but reads like a list name" in warnings


# -- bad input: file, line and item named ---------------------------------------------------------

BAD = [
    (rule("ka.verb = create and (ka.user.name = x"), "override1.yaml:3: rule 'r': syntax error"),
    (rule("ka.nope = 1"), "override1.yaml:3: rule 'r': unknown field 'ka.nope'"),
    (rule("ka.verb ~= create"), "override1.yaml:3: rule 'r': syntax error near '~= create'"),
    (rule("ka.user.groups = devs"), "'=' is not supported on list field 'ka.user.groups'"),
    (rule("ka.verb in (a, b) and ka.uri.param = x"), "field 'ka.uri.param' needs an argument"),
    (rule("loop_a"), "rule 'r': macro 'loop_a' refers to itself (loop_a -> loop_b -> loop_a)"),
    (rule("not_defined_anywhere"), "rule 'r': undefined macro 'not_defined_anywhere'"),
    (rule("ka.verb = create", output="x=%ka.nope"), "override1.yaml:4: rule 'r': output: unknown field 'ka.nope'"),
    (rule("ka.verb = create", priority="LOUD"), "override1.yaml:1: rule 'r': unknown priority 'LOUD'"),
    ("- list: never_defined\n  items: [a]\n  append: true\n", "override1.yaml:1: list 'never_defined': appends"),
    ("- macro: nope\n  condition: and x\n  append: true\n", "override1.yaml:1: macro 'nope': appends to a macro"),
    (
        "- rule: Missing\n  condition: and x\n  override:\n    condition: append\n",
        "override1.yaml:1: rule 'Missing': appends to or overrides a rule that is not defined",
    ),
    ("- rule: Missing\n  enabled: false\n", "rule 'Missing': enables or disables a rule that is not defined"),
    ("- rule: x\n  desc: d\n  condition: ka.verb = get\n", "override1.yaml:1: rule 'x': a rule needs 'output'"),
    ("- rule: x\n  bogus: 1\n", "rule 'x': unknown key bogus"),
    ("- whatever: 1\n", "override1.yaml:1: unknown item"),
    ("- rule: [unclosed\n", "override1.yaml:2: not valid YAML"),
    ("rule: x\n", "a rules file is a YAML list"),
    (
        "- rule: Create By User\n  priority: ERROR\n  override:\n    priority: append\n",
        "'override: {priority: append}' is not allowed",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_rules_name_file_line_and_item(text: str, message: str) -> None:
    loops = "- macro: loop_a\n  condition: loop_b\n- macro: loop_b\n  condition: ka.verb = x and loop_a\n"
    with pytest.raises(RulesError) as caught:
        engine_of(BASE + loops, text)
    assert message in str(caught.value)


def test_a_macro_that_does_not_parse_fails_only_when_a_k8s_audit_rule_uses_it() -> None:
    syscall_macro = "- macro: shell_procs\n  condition: proc.name in (shell_binaries) and toupper(proc.name) = X\n"
    engine = engine_of(BASE + syscall_macro)
    assert any("macro 'shell_procs': syntax error" in w and "not used by k8s_audit" in w for w in engine.warnings)
    with pytest.raises(RulesError, match=r"base.yaml:18: macro 'shell_procs': syntax error near '\(proc.name\) = X'"):
        engine_of(BASE + syscall_macro + rule("shell_procs and ka.verb = get"))


def test_syntax_error_line_inside_a_multiline_condition() -> None:
    text = "- macro: m\n  condition: >\n    ka.verb = get and\n    (ka.user.name = x\n"
    text += rule("m")
    with pytest.raises(RulesError) as caught:
        engine_of(text)
    assert str(caught.value).startswith("base.yaml:3: macro 'm': syntax error")


# -- Falco's own rules file --------------------------------------------------------------------------


@needs_falco
def test_falco_rules_file_loads_unchanged() -> None:
    engine = load_rules([str(FALCO_RULES)])
    assert len(engine.rules) == 48
    assert not engine.warnings
    assert not engine.skipped_sources


@needs_falco
@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            audit(),
            ["Disallowed K8s User", "Create Privileged Pod", "Create Sensitive Mount Pod", "Create HostNetwork Pod"],
        ),
        (audit(user={"username": "kubernetes-admin"}, requestObject={"spec": {"containers": [{"image": "x"}]}}), []),
        (
            audit(
                user={"username": "system:admin"},
                stage="ResponseStarted",
                verb="create",
                requestURI="/api/v1/namespaces/shop/pods/web/exec?command=sh&container=app",
                objectRef={"resource": "pods", "subresource": "exec", "namespace": "shop", "name": "web"},
            ),
            ["Attach/Exec Pod"],
        ),
    ],
    ids=["privileged pod by alice", "harmless pod by an allowed user", "exec"],
)
def test_falco_rules_on_hand_written_events(event: dict[str, Any], expected: list[str]) -> None:
    engine = load_rules([str(FALCO_RULES)])
    assert names(engine, event) == expected


@needs_falco
def test_user_override_file_after_falco_rules(tmp_path: Path) -> None:
    override = write(
        tmp_path / "my_rules.yaml",
        "- list: allowed_k8s_users\n  items: [alice]\n  append: true\n"
        "- rule: Create Privileged Pod\n  enabled: false\n"
        "- macro: user_known_node_port_service\n  condition: ka.target.namespace = shop\n"
        "  override:\n    condition: replace\n",
    )
    engine = load_rules([str(FALCO_RULES), str(override)])
    assert names(engine, audit()) == ["Create Sensitive Mount Pod", "Create HostNetwork Pod"]
    nodeport = audit(
        objectRef={"resource": "services", "namespace": "shop", "name": "s"},
        requestObject={"spec": {"type": "NodePort"}},
    )
    assert "Create NodePort Service" not in names(engine, nodeport)
    assert "Create NodePort Service" in names(load_rules([str(FALCO_RULES)]), nodeport)


# -- the CLI --------------------------------------------------------------------------------------


def kubetrail(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetrail.cli.main", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_rules_check_reports_counts_warnings_and_errors(tmp_path: Path) -> None:
    good = write(tmp_path / "base.yaml", BASE + "- macro: spare\n  condition: ka.verb = get\n")
    done = kubetrail("rules", "check", str(good))
    assert done.returncode == 0, done.stderr
    assert "1 k8s_audit rules compiled (0 disabled), 2 macros, 1 lists" in done.stdout
    assert "macro 'spare' is never used" in done.stdout
    assert kubetrail("rules", "check", "--strict", str(good)).returncode == 1
    bad = write(tmp_path / "bad.yaml", rule("ka.verb = create and ka.nope exists", name="Bad One"))
    done = kubetrail("rules", "check", str(good), str(bad))
    assert done.returncode == 2
    assert f"{bad}:3: rule 'Bad One': unknown field 'ka.nope'" in done.stderr
    assert kubetrail("rules", "check", str(tmp_path / "none-*.yaml")).returncode == 2


def test_cli_rules_test_prints_alerts_and_reads_every_event_shape(tmp_path: Path) -> None:
    rules = write(tmp_path / "base.yaml", BASE)
    harmless = audit(verb="get", auditID="harmless")
    lines = write(
        tmp_path / "audit.log",
        orjson.dumps(audit()).decode() + "\nnot json\n" + orjson.dumps(harmless).decode() + "\n",
    )
    done = kubetrail("rules", "test", "--rules", str(rules), "--events", str(lines), "--json")
    assert done.returncode == 0, done.stderr
    (alert,) = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert alert["rule"] == "Create By User" and alert["k8s.audit.id"] == audit()["auditID"]
    assert alert["output"].endswith("Warning created by alice")
    assert "audit.log:2: not JSON, skipped" in done.stderr
    assert "2 events read, 1 alerts; 1 lines skipped" in done.stderr
    event_list = write(
        tmp_path / "list.json", orjson.dumps({"kind": "EventList", "items": [audit(), harmless]}).decode()
    )
    done = kubetrail("rules", "test", "--rules", str(rules), "--events", str(event_list))
    assert done.returncode == 0
    assert "Warning created by alice (rule 'Create By User'" in done.stdout
    array = write(tmp_path / "array.json", orjson.dumps([harmless]).decode())
    done = kubetrail("rules", "test", "--rules", str(rules), "--events", str(array))
    assert done.returncode == 0 and done.stdout == ""
    assert kubetrail("rules", "test", "--rules", str(rules), "--events", str(tmp_path / "gone")).returncode == 1
