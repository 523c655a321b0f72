"""Falco's k8s_audit rules, unchanged, on what a real API server logs for scripted actions.

A control plane of its own (no controllers) whose audit policy logs request and response bodies
(Secrets only at Metadata), since Falco's pod, role, binding and configmap rules read
``requestObject``. For every one of the 48 rules of Falco's k8s_audit_rules.yaml (examples/history/rules/)
a scripted action makes the API server log an event that fires it, and a harmless twin of that
action logs one that does not. Rules Falco ships switched off by a macro (``Create Disallowed
Pod``, ``Full K8s Administrative Access``, ``All K8s Audit Events``, the two node rules) are
switched on by a user override file loaded after Falco's, as a Falco user does.

Every event of the API server's log is evaluated by the engine, and the same log goes through
``kubetrail run`` (tail -> kubernetes_audit -> detect -> file): both give the same alerts.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubetrail.detect import Event, load_rules
from tests import required

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "cluster"))

from localcluster import KubeAPI, LocalCluster  # noqa: E402

pytestmark = pytest.mark.cluster

FALCO_RULES = ROOT / "examples" / "history" / "rules" / "k8s_audit_rules.yaml"  # Falco's, unchanged

POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
rules:
  - level: Metadata
    resources:
      - group: ""
        resources: ["secrets", "serviceaccounts/token"]
      - group: "authentication.k8s.io"
        resources: ["tokenreviews"]
  - level: None
    resources:
      - group: "coordination.k8s.io"
        resources: ["leases"]
  - level: RequestResponse
"""

OVERRIDES = """\
- macro: allowed_k8s_containers
  condition: (ka.req.pod.containers.image.repository in (registry.k8s.io/pause))
  override:
    condition: replace
- macro: allowed_full_admin_users
  condition: (k8s_audit_never_true)
  override:
    condition: replace
- macro: consider_all_events
  condition: (k8s_audit_always_true)
  override:
    condition: replace
- macro: allow_all_k8s_nodes
  condition: (k8s_audit_never_true)
  override:
    condition: replace
- list: allowed_k8s_nodes
  items: [{trusted_node}]
  append: true
"""


@dataclass
class Ctx:
    admin: KubeAPI
    collector: KubeAPI
    anonymous: KubeAPI
    ns: str


def _pod(name: str, image: str = "busybox", **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "c", "image": image}
    if "securityContext" in spec:
        container["securityContext"] = spec.pop("securityContext")
    return {"metadata": {"name": name}, "spec": {"containers": [container], **spec}}


def _ok(response: Any, *codes: int) -> None:
    assert response.status in (codes or (200, 201)), (response.status, response.body[:300])


def create(api: KubeAPI, path: str, body: dict[str, Any], *codes: int) -> None:
    _ok(api.post(path, body), *codes)


def role(name: str, verbs: list[str], resources: list[str]) -> dict[str, Any]:
    return {"metadata": {"name": name}, "rules": [{"apiGroups": [""], "resources": resources, "verbs": verbs}]}


def binding(name: str, role_name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
        "subjects": [{"kind": "User", "name": "mallory", "apiGroup": "rbac.authorization.k8s.io"}],
    }


RBAC = "/apis/rbac.authorization.k8s.io/v1"
Action = Callable[[Ctx, str], None]


def pod_action(**spec: Any) -> Action:
    return lambda c, m: create(c.admin, f"/api/v1/namespaces/{c.ns}/pods", _pod(m, **spec))


def created_and_deleted(path: Callable[[Ctx], str], body: Callable[[str], dict[str, Any]]) -> tuple[Action, Action]:
    """(create it, an invalid create that fails: the 'Created' rules need a successful response)."""

    def act(c: Ctx, m: str) -> None:
        create(c.admin, path(c), body(m))

    def twin(c: Ctx, m: str) -> None:
        create(c.admin, path(c), body(m + "/x"), 422)  # '/' is in no valid name

    return act, twin


def deleted(path: Callable[[Ctx], str], body: Callable[[str], dict[str, Any]]) -> tuple[Action, Action]:
    """(delete an existing object, delete one that does not exist: 404)."""

    def act(c: Ctx, m: str) -> None:
        create(c.admin, path(c), body(m))
        _ok(c.admin.delete(f"{path(c)}/{m}"), 200, 202)

    def twin(c: Ctx, m: str) -> None:
        _ok(c.admin.delete(f"{path(c)}/{m}"), 404)

    return act, twin


def exec_pod(c: Ctx, m: str) -> None:
    create(c.admin, f"/api/v1/namespaces/{c.ns}/pods", _pod(m))
    # No node runs it: the API server answers 400, but it logs the attempt (ResponseStarted too).
    c.admin.request("POST", f"/api/v1/namespaces/{c.ns}/pods/{m}/exec", None, params={"command": "sh"})


def port_forward(c: Ctx, m: str) -> None:
    create(c.admin, f"/api/v1/namespaces/{c.ns}/pods", _pod(m))
    c.admin.request("POST", f"/api/v1/namespaces/{c.ns}/pods/{m}/portforward", None, params={"ports": "80"})


def pod_log(c: Ctx, m: str) -> None:
    create(c.admin, f"/api/v1/namespaces/{c.ns}/pods", _pod(m))
    c.admin.get(f"/api/v1/namespaces/{c.ns}/pods/{m}/log")


def ephemeral(c: Ctx, m: str) -> None:
    create(c.admin, f"/api/v1/namespaces/{c.ns}/pods", _pod(m))
    patch = {"spec": {"ephemeralContainers": [{"name": "dbg", "image": "busybox", "targetContainerName": "c"}]}}
    _ok(
        c.admin.request(
            "PATCH",
            f"/api/v1/namespaces/{c.ns}/pods/{m}/ephemeralcontainers",
            patch,
            content_type="application/strategic-merge-patch+json",
        ),
        200,
    )


def status_patch(c: Ctx, m: str) -> None:
    create(c.admin, f"/api/v1/namespaces/{c.ns}/pods", _pod(m))
    _ok(
        c.admin.request(
            "PATCH",
            f"/api/v1/namespaces/{c.ns}/pods/{m}/status",
            {"status": {"message": "hello"}},
            content_type="application/strategic-merge-patch+json",
        ),
        200,
    )


def secret_get(existing: bool) -> Action:
    def act(c: Ctx, m: str) -> None:
        if existing:
            create(c.admin, f"/api/v1/namespaces/{c.ns}/secrets", {"metadata": {"name": m}, "stringData": {"k": "v"}})
        _ok(c.admin.get(f"/api/v1/namespaces/{c.ns}/secrets/{m}"), 200 if existing else 404)

    return act


def ingress(tls: bool) -> Action:
    def act(c: Ctx, m: str) -> None:
        spec: dict[str, Any] = {
            "rules": [
                {
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "pathType": "Prefix",
                                "backend": {"service": {"name": "web", "port": {"number": 80}}},
                            }
                        ]
                    }
                }
            ]
        }
        if tls:
            spec["tls"] = [{"hosts": ["example.test"], "secretName": "tls"}]
        create(
            c.admin, f"/apis/networking.k8s.io/v1/namespaces/{c.ns}/ingresses", {"metadata": {"name": m}, "spec": spec}
        )

    return act


def node(valid: bool) -> Action:
    def act(c: Ctx, m: str) -> None:
        name = m if valid else m + "/x"
        create(c.admin, "/api/v1/nodes", {"metadata": {"name": name}}, *((201,) if valid else (422,)))

    return act


TRUSTED_NODE = f"trusted-node-{secrets.token_hex(3)}"


def trusted_node(c: Ctx, m: str) -> None:
    create(c.admin, "/api/v1/nodes", {"metadata": {"name": TRUSTED_NODE, "labels": {"case": m}}})


@dataclass
class Case:
    rule: str
    act: Action
    twin: Action
    # Which logged events belong to the action: by default those that mention its marker.
    act_events: Callable[[dict[str, Any], str, bytes], bool] | None = None
    twin_events: Callable[[dict[str, Any], str, bytes], bool] | None = None


def _ns(c: Ctx) -> str:
    return f"/api/v1/namespaces/{c.ns}"


CASES: list[Case] = [
    Case(
        "Disallowed K8s User",
        lambda c, m: c.collector.get(f"{_ns(c)}/configmaps/{m}"),
        lambda c, m: c.admin.get(f"{_ns(c)}/configmaps/{m}"),
    ),
    Case("Create Disallowed Pod", pod_action(), pod_action(image="registry.k8s.io/pause:3.10")),
    Case("Create Privileged Pod", pod_action(securityContext={"privileged": True}), pod_action()),
    Case(
        "Create Sensitive Mount Pod",
        pod_action(volumes=[{"name": "v", "hostPath": {"path": "/etc"}}]),
        pod_action(volumes=[{"name": "v", "hostPath": {"path": "/srv/data"}}]),
    ),
    Case("Create HostNetwork Pod", pod_action(hostNetwork=True), pod_action(hostNetwork=False)),
    Case("Create HostPid Pod", pod_action(hostPID=True), pod_action(hostPID=False)),
    Case("Create HostIPC Pod", pod_action(hostIPC=True), pod_action(hostIPC=False)),
    Case(
        "Create NodePort Service",
        lambda c, m: create(
            c.admin,
            f"{_ns(c)}/services",
            {"metadata": {"name": m}, "spec": {"type": "NodePort", "ports": [{"port": 80}]}},
        ),
        lambda c, m: create(
            c.admin, f"{_ns(c)}/services", {"metadata": {"name": m}, "spec": {"ports": [{"port": 80}]}}
        ),
    ),
    Case(
        "Create/Modify Configmap With Private Credentials",
        lambda c, m: create(c.admin, f"{_ns(c)}/configmaps", {"metadata": {"name": m}, "data": {"db_password": "x"}}),
        lambda c, m: create(c.admin, f"{_ns(c)}/configmaps", {"metadata": {"name": m}, "data": {"color": "blue"}}),
    ),
    Case(
        "Anonymous Request Allowed",
        lambda c, m: c.anonymous.get("/version", m=m),
        lambda c, m: c.anonymous.get("/healthz", m=m),
    ),
    Case("Attach/Exec Pod", exec_pod, pod_log),
    Case("port-forward", port_forward, pod_log),
    Case("EphemeralContainers Created", ephemeral, status_patch),
    Case(
        "Create Disallowed Namespace",
        lambda c, m: create(c.admin, "/api/v1/namespaces", {"metadata": {"name": m}}),
        lambda c, m: create(c.admin, "/api/v1/namespaces", {"metadata": {"name": "default", "labels": {"m": m}}}, 409),
    ),
    Case(
        "Pod Created in Kube Namespace",
        lambda c, m: create(c.admin, "/api/v1/namespaces/kube-system/pods", _pod(m)),
        pod_action(),
    ),
    Case(
        "Service Account Created in Kube Namespace",
        lambda c, m: create(c.admin, "/api/v1/namespaces/kube-system/serviceaccounts", {"metadata": {"name": m}}),
        lambda c, m: create(
            c.admin,
            "/api/v1/namespaces/kube-system/serviceaccounts",
            {"metadata": {"name": "coredns", "labels": {"m": m}}},
        ),
    ),
    Case(
        "System ClusterRole Modified/Deleted",
        lambda c, m: create(c.admin, f"{RBAC}/clusterroles", role(f"system:{m}", ["get"], ["pods"])),
        lambda c, m: create(c.admin, f"{RBAC}/clusterroles", role(m, ["get"], ["pods"])),
    ),
    Case(
        "Attach to cluster-admin Role",
        lambda c, m: create(c.admin, f"{RBAC}/clusterrolebindings", binding(m, "cluster-admin")),
        lambda c, m: create(c.admin, f"{RBAC}/clusterrolebindings", binding(m, "view")),
    ),
    Case(
        "ClusterRole With Wildcard Created",
        lambda c, m: create(c.admin, f"{RBAC}/clusterroles", role(m, ["*"], ["pods"])),
        lambda c, m: create(c.admin, f"{RBAC}/clusterroles", role(m, ["get"], ["pods"])),
    ),
    Case(
        "ClusterRole With Write Privileges Created",
        lambda c, m: create(c.admin, f"{RBAC}/clusterroles", role(m, ["get", "delete"], ["pods"])),
        lambda c, m: create(c.admin, f"{RBAC}/clusterroles", role(m, ["get", "list"], ["pods"])),
    ),
    Case(
        "ClusterRole With Pod Exec Created",
        lambda c, m: create(c.admin, f"{RBAC}/clusterroles", role(m, ["get"], ["pods/exec"])),
        lambda c, m: create(c.admin, f"{RBAC}/clusterroles", role(m, ["get"], ["pods"])),
    ),
    Case(
        "K8s Secret Get Successfully",
        secret_get(True),
        secret_get(False),
    ),
    Case(
        "K8s Secret Get Unsuccessfully Tried",
        secret_get(False),
        secret_get(True),
    ),
    Case(
        "All K8s Audit Events",
        lambda c, m: c.admin.get(f"{_ns(c)}/configmaps/{m}"),
        lambda c, m: c.admin.get(f"{_ns(c)}/configmaps/{m}"),
        act_events=lambda e, m, raw: m in e["requestURI"] and e["stage"] == "ResponseComplete",
        twin_events=lambda e, m, raw: m in e["requestURI"] and e["stage"] == "RequestReceived",
    ),
    Case(
        "Full K8s Administrative Access",
        lambda c, m: c.admin.get(f"{_ns(c)}/configmaps/{m}"),
        lambda c, m: c.collector.get(f"{_ns(c)}/configmaps/{m}"),
    ),
    Case("Ingress Object without TLS Certificate Created", ingress(False), ingress(True)),
    Case("Untrusted Node Successfully Joined the Cluster", node(True), trusted_node),
    Case("Untrusted Node Unsuccessfully Tried to Join the Cluster", node(False), node(True)),
]

# The 22 "K8s <Kind> Created/Deleted" activity rules: create / invalid create, delete / missing delete.
KINDS: list[tuple[str, Callable[[Ctx], str], Callable[[str], dict[str, Any]]]] = [
    ("Deployment", lambda c: f"/apis/apps/v1/namespaces/{c.ns}/deployments", lambda m: _deployment(m)),
    ("Service", lambda c: f"{_ns(c)}/services", lambda m: {"metadata": {"name": m}, "spec": {"ports": [{"port": 80}]}}),
    ("ConfigMap", lambda c: f"{_ns(c)}/configmaps", lambda m: {"metadata": {"name": m}}),
    ("Namespace", lambda c: "/api/v1/namespaces", lambda m: {"metadata": {"name": m}}),
    ("Serviceaccount", lambda c: f"{_ns(c)}/serviceaccounts", lambda m: {"metadata": {"name": m}}),
    ("Role", lambda c: f"{RBAC}/namespaces/{c.ns}/roles", lambda m: role(m, ["get"], ["pods"])),
    ("ClusterRole", lambda c: f"{RBAC}/clusterroles", lambda m: role(m, ["get"], ["pods"])),
    ("RoleBinding", lambda c: f"{RBAC}/namespaces/{c.ns}/rolebindings", lambda m: binding(m, "view")),
    ("ClusterRoleBinding", lambda c: f"{RBAC}/clusterrolebindings", lambda m: binding(m, "view")),
    ("Secret", lambda c: f"{_ns(c)}/secrets", lambda m: {"metadata": {"name": m}, "stringData": {"k": "v"}}),
]


def _service(name: str, kind: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"type": kind, "ports": [{"port": 80}]}}


def _deployment(name: str) -> dict[str, Any]:
    labels = {"app": "web"}
    return {
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}},
        },
    }


for _kind, _path, _body in KINDS:
    CASES.append(Case(f"K8s {_kind} Created", *created_and_deleted(_path, _body)))
    CASES.append(Case(f"K8s {_kind} Deleted", *deleted(_path, _body)))


def _mentions(event: dict[str, Any], marker: str, raw: bytes) -> bool:
    return marker.encode() in raw


@pytest.fixture(scope="module")
def detect_cluster(control_plane_binaries: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    directory = tmp_path_factory.mktemp("detect-cluster")
    policy = directory / "detect-policy.yaml"
    policy.write_text(POLICY)
    # The last --audit-policy-file wins: this cluster logs bodies, the shared one does not.
    cluster = LocalCluster.up(
        directory / "cluster",
        bin_dir=control_plane_binaries,
        apiserver_extra_args=[f"--audit-policy-file={policy}", "--allow-privileged=true"],
    )
    try:
        yield cluster
    finally:
        cluster.down()


@dataclass
class Scripted:
    events: list[tuple[dict[str, Any], bytes]]
    markers: dict[tuple[str, str], str]  # (rule, act|twin) -> marker
    log: Path
    rules: list[str]


@pytest.fixture(scope="module")
def scripted(detect_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Scripted:
    if not FALCO_RULES.exists():
        required.unavailable(f"Falco's rules file not found at {FALCO_RULES}")
    admin = detect_cluster.client("admin")
    ctx = Ctx(admin, detect_cluster.client("collector"), KubeAPI(detect_cluster.url, detect_cluster.ca_file), "")
    ctx.ns = f"detect-{secrets.token_hex(3)}"
    create(admin, "/api/v1/namespaces", {"metadata": {"name": ctx.ns}})
    markers: dict[tuple[str, str], str] = {}
    for number, case in enumerate(CASES):
        for side, action in (("act", case.act), ("twin", case.twin)):
            marker = f"k{number}{side[0]}-{secrets.token_hex(3)}"
            markers[(case.rule, side)] = marker
            action(ctx, marker)
    work = tmp_path_factory.mktemp("detect-run")
    log = work / "audit.log"
    shutil.copyfile(detect_cluster.audit_log_path, log)  # a snapshot: the API server writes on
    overrides = work / "overrides.yaml"
    overrides.write_text(OVERRIDES.format(trusted_node=TRUSTED_NODE))
    events = [(json.loads(line), line) for line in log.read_bytes().splitlines() if line.strip()]
    return Scripted(events, markers, log, [str(FALCO_RULES), str(overrides)])


def _alerts(scripted: Scripted) -> list[tuple[dict[str, Any], bytes, list[str]]]:
    engine = load_rules(scripted.rules)
    out = []
    for event, raw in scripted.events:
        fired = [r.name for r in engine.match(Event(raw, _light(raw)))]
        out.append((event, raw, fired))
    return out


def _light(raw: bytes) -> Any:
    from kubetrail.detect.fields import _light as light

    return light(raw)


def test_every_falco_rule_has_a_case() -> None:
    if not FALCO_RULES.exists():
        required.unavailable(f"Falco's rules file not found at {FALCO_RULES}")
    names = [rule.name for rule in load_rules([str(FALCO_RULES)]).rules]
    assert sorted(names) == sorted(case.rule for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.rule for c in CASES])
def test_rule_fires_on_the_action_and_not_on_its_twin(scripted: Scripted, case: Case) -> None:
    alerts = _alerts_cached(scripted)
    act_marker, twin_marker = scripted.markers[(case.rule, "act")], scripted.markers[(case.rule, "twin")]
    act_match = case.act_events or _mentions
    twin_match = case.twin_events or _mentions
    acted = [(e, fired) for e, raw, fired in alerts if act_match(e, act_marker, raw)]
    twinned = [(e, fired) for e, raw, fired in alerts if twin_match(e, twin_marker, raw)]
    assert acted, f"the API server logged nothing for the action of {case.rule!r}"
    assert twinned, f"the API server logged nothing for the twin of {case.rule!r}"
    assert any(case.rule in fired for _, fired in acted), [
        (e["stage"], e["verb"], e["requestURI"], fired) for e, fired in acted
    ]
    assert not any(case.rule in fired for _, fired in twinned), [
        (e["stage"], e["verb"], e["requestURI"], fired) for e, fired in twinned if case.rule in fired
    ]


_CACHE: dict[int, list[tuple[dict[str, Any], bytes, list[str]]]] = {}


def _alerts_cached(scripted: Scripted) -> list[tuple[dict[str, Any], bytes, list[str]]]:
    key = id(scripted)
    if key not in _CACHE:
        _CACHE[key] = _alerts(scripted)
    return _CACHE[key]


def test_kubetrail_run_gives_the_same_alerts(scripted: Scripted, tmp_path: Path) -> None:
    expected = sorted((e["auditID"], e["stage"], name) for e, _, fired in _alerts_cached(scripted) for name in fired)
    assert len(expected) > 100
    config = tmp_path / "detect.conf"
    rules = "\n".join(f"    rules_file {path}" for path in scripted.rules)
    config.write_text(
        f"""
[SERVICE]
    grace 5
    log_level warn
[INPUT]
    name tail
    path {scripted.log}
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
{rules}
[OUTPUT]
    name file
    match alert
    path {tmp_path}
    file alerts.jsonl
    format plain
"""
    )
    done = subprocess.run(
        [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    alerts = [orjson.loads(line) for line in (tmp_path / "alerts.jsonl").read_bytes().splitlines()]
    got = sorted((a["k8s.audit.id"], a["k8s.audit.stage"], a["rule"]) for a in alerts)
    assert got == expected
    with contextlib.suppress(StopIteration):
        privileged = next(a for a in alerts if a["rule"] == "Create Privileged Pod")
        assert privileged["output"].split(": ", 1)[1].startswith("Warning Pod started with privileged container")
        assert privileged["output_fields"]["ka.req.pod.containers.image"] == "(busybox)"
