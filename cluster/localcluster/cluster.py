"""The local control plane: etcd + kube-apiserver (+ kube-controller-manager, kube-scheduler).

Why these flags (the non-obvious ones):

* ``--advertise-address=127.0.0.1`` and ``--endpoint-reconciler-type=none``: without the
  first, the apiserver derives an address from the default route (and fails on hosts
  without one); a loopback address is invalid for the ``kubernetes`` Service endpoints, hence
  the second.
* ``--token-auth-file``: static bearer tokens, one per identity (see ``config``).
* ``--disable-admission-plugins=ServiceAccount`` only when the controller manager is not
  started: nothing would create the ``default`` ServiceAccount the plugin waits for.
* Audit: JSON log with lumberjack rotation (``--audit-log-maxsize`` etc.) and, when asked,
  the webhook backend in batch mode with a 1 s max wait and a 1 s initial backoff, so tests
  see batches and retries within seconds instead of the default 30 s / 10 s.
* ``--watch-cache-sizes=events#0,events.events.k8s.io#0`` (``no_watch_cache_for_events``):
  watches and lists of Events then go to etcd, so compaction yields a deterministic 410
  instead of depending on the watch cache's window.
* kube-controller-manager and kube-scheduler run with ``--leader-elect=false``: a restart
  must not wait for an old lease to expire.  kcm uses ``--use-service-account-credentials``
  so every controller acts (and is audited) under its own service account, as in kubeadm.

Everything a second process needs to manage the cluster (pids, ports, argv, log paths) is
in ``state.json``; ``LocalCluster.attach(dir)`` rebuilds the object from it.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import config, pki, rbac
from .build import BuildError, ensure_binaries
from .gotools import ensure_node_binaries, ensure_tools
from .kubeapi import KubeAPI
from .node import Node, NodeError, NodeOptions, node_ip, node_name, preflight
from .process import Component, ComponentError, free_port, http_call, port_is_free, probe

STATE_FILE = "state.json"
COMPONENT_ORDER = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
_GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$|^0$")


class ClusterError(RuntimeError):
    """The cluster could not be started/stopped; the message says why."""


@dataclass
class ClusterOptions:
    """Everything ``up`` can vary.  Durations use Go syntax (``90s``, ``2m``, ``1h``)."""

    controllers: bool = False
    webhook_url: str | None = None
    webhook_ca: str | None = None
    webhook_token_file: str | None = None
    webhook_client_cert: str | None = None
    webhook_client_key: str | None = None
    event_ttl: str | None = None  # apiserver default 1h
    compaction_interval: str | None = None  # apiserver default 5m; "0" disables
    no_watch_cache_for_events: bool = False
    audit_log_maxsize: int = 100  # MB, as the apiserver default
    audit_log_maxbackup: int = 10
    audit_log_compress: bool = False
    apiserver_extra_args: list[str] = field(default_factory=list)
    api_port: int | None = None  # None: pick a free port
    etcd_port: int | None = None
    ready_timeout: float = 120.0
    # A real node (containerd, kubelet, kube-proxy); see ``node``.  One per machine.
    nodes: int = 0
    container_log_max_size: str = "10Mi"
    container_log_max_files: int = 5
    container_log_monitor_interval: str = "10s"
    images: list[str] = field(default_factory=list)  # extra OCI image archives for the node
    pod_cidr: str = "10.244.0.0/24"  # the node's pods (CNI bridge + host-local)

    def node_options(self) -> NodeOptions:
        return NodeOptions(
            container_log_max_size=self.container_log_max_size,
            container_log_max_files=self.container_log_max_files,
            container_log_monitor_interval=self.container_log_monitor_interval,
            images=[str(Path(i).resolve()) for i in self.images],
            pod_cidr=self.pod_cidr,
        )

    def validate(self) -> None:
        if self.nodes not in (0, 1):
            raise ClusterError(
                f"--nodes {self.nodes}: only 0 or 1 is supported (the kubelet's /var/log/pods, "
                "/var/log/containers and port 10250 are fixed, so one node per machine)"
            )
        if self.nodes and not self.controllers:
            raise ClusterError("--nodes needs --controllers (the scheduler places pods, kcm makes service accounts)")
        if not self.nodes and self.images:
            raise ClusterError("--image needs --nodes 1 (images are imported into the node's containerd)")
        if self.nodes:
            try:
                self.node_options().validate()
            except NodeError as exc:
                raise ClusterError(str(exc)) from exc
        for name in ("event_ttl", "compaction_interval"):
            value = getattr(self, name)
            if value is not None and not _GO_DURATION.match(value):
                raise ClusterError(f"{name}={value!r} is not a Go duration (e.g. 30s, 2m, 1h)")
        if self.audit_log_maxsize < 0 or self.audit_log_maxbackup < 0:
            raise ClusterError("audit log maxsize/maxbackup must be >= 0")
        webhook_auth = [self.webhook_token_file, self.webhook_client_cert, self.webhook_client_key]
        if self.webhook_url is None:
            if self.webhook_ca or any(webhook_auth):
                raise ClusterError("--webhook-ca/--webhook-token-file/--webhook-client-* need --webhook-url")
            return
        if not self.webhook_url.startswith("https://"):
            raise ClusterError(f"webhook URL must be https://..., got {self.webhook_url!r}")
        if not self.webhook_ca:
            raise ClusterError("--webhook-url needs --webhook-ca (the CA that signed the receiver's cert)")
        token = self.webhook_token_file is not None
        cert = self.webhook_client_cert is not None or self.webhook_client_key is not None
        if token == cert:
            raise ClusterError(
                "the audit webhook needs exactly one of --webhook-token-file or "
                "--webhook-client-cert plus --webhook-client-key"
            )
        if cert and not (self.webhook_client_cert and self.webhook_client_key):
            raise ClusterError("--webhook-client-cert and --webhook-client-key go together")
        for path in (self.webhook_ca, *webhook_auth):
            if path is not None and not Path(path).is_file():
                raise ClusterError(f"file not found: {path}")


class LocalCluster:
    """A running (or attached) local control plane rooted at ``dir``.

    Attributes: ``url``, ``ca_file``, ``admin_token``, ``admin_token_file``,
    ``collector_token``, ``collector_token_file``, ``norbac_token``, ``norbac_token_file``,
    ``kubeconfig``, ``audit_log_path``, ``etcd_url``, ``options``, ``components``,
    ``helm`` and ``kubectl`` (paths of the client tools, ``HELM``/``KUBECTL`` in ``DIR/env``;
    None when they could not be built).
    """

    def __init__(self, directory: Path, options: ClusterOptions, bin_dir: Path, ports: dict[str, int]) -> None:
        self.dir = directory.resolve()
        self.options = options
        self.bin_dir = bin_dir
        self.ports = ports
        self.url = f"https://127.0.0.1:{ports['kube-apiserver']}"
        self.etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        self.ca_file = self.dir / "ca.crt"
        self.kubeconfig = self.dir / "kubeconfig"
        self.admin_token_file = self.dir / "admin.token"
        self.collector_token_file = self.dir / "collector.token"
        self.norbac_token_file = self.dir / "norbac.token"
        self.audit_log_path = self.dir / "audit" / "audit.log"
        # Client tools built from the same pins (None when they could not be built or found).
        self.helm: Path | None = None
        self.kubectl: Path | None = None
        self.components: dict[str, Component] = {}
        self.node: Node | None = None
        self.node_ready_seconds: float | None = None
        self.startup_seconds: float | None = None
        self._atexit_registered = False
        self.owner_pid: int | None = None  # process whose death must stop the cluster
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._log: TextIO = sys.stderr

    # -- tokens and clients -------------------------------------------------------------

    @staticmethod
    def _read_token(path: Path) -> str:
        return path.read_text().strip()

    @property
    def admin_token(self) -> str:
        return self._read_token(self.admin_token_file)

    @property
    def collector_token(self) -> str:
        return self._read_token(self.collector_token_file)

    @property
    def norbac_token(self) -> str:
        return self._read_token(self.norbac_token_file)

    def client(self, who: str = "admin") -> KubeAPI:
        """A client authenticated as ``admin``, ``collector``, ``norbac``, ``kcm`` or ``scheduler``."""
        return KubeAPI(self.url, self.ca_file, self._read_token(self.dir / f"{who}.token"))

    def _ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        directory: str | os.PathLike[str],
        *,
        bin_dir: str | os.PathLike[str] | None = None,
        allow_build: bool = True,
        log: TextIO = sys.stderr,
        stop_at_exit: bool = True,
        **options: Any,
    ) -> LocalCluster:
        """Start a fresh cluster in ``directory`` and wait until it is ready.

        ``options`` are :class:`ClusterOptions` fields.  On any failure everything started so
        far is stopped and :class:`ClusterError` is raised.  With ``stop_at_exit`` (the default
        for Python callers) the cluster is also stopped when the interpreter exits.
        """
        opts = ClusterOptions(**options)
        opts.validate()
        directory = Path(directory)
        _refuse_if_running(directory)
        ports = _pick_ports(opts)  # before a possibly long build: fail fast on a taken port
        bin_dir = Path(bin_dir) if bin_dir is not None else ensure_binaries(log=log, allow_build=allow_build)
        cluster = cls(directory, opts, bin_dir, ports)
        cluster._log = log
        try:
            tools = ensure_tools(log=log, allow_build=allow_build)
            cluster.helm, cluster.kubectl = tools.helm, tools.kubectl
        except BuildError as exc:
            # The control plane is useful without them; tests that need helm skip on None.
            print(f"local cluster: helm/kubectl not available: {exc}", file=log, flush=True)
        if opts.nodes:
            try:
                preflight()  # before anything starts: not root, no iptables, a node already here
                node_bins = ensure_node_binaries(log=log, allow_build=allow_build)
                cluster.node = Node(cluster.dir, node_bins, opts.node_options(), node_name(), node_ip())
            except NodeError as exc:
                raise ClusterError(f"cannot start a node: {exc}") from exc
        started = time.monotonic()
        try:
            cluster._prepare()
            if stop_at_exit:
                cluster.owner_pid = os.getpid()
                cluster._start_watchdog()
            cluster._start_all()
        except BaseException as exc:
            cluster._stop_quietly()
            if isinstance(exc, ComponentError | OSError | NodeError):
                raise ClusterError(f"starting the local cluster in {directory} failed: {exc}") from exc
            raise
        cluster.startup_seconds = time.monotonic() - started
        cluster._write_state()
        if stop_at_exit:
            atexit.register(cluster._stop_quietly)
            cluster._atexit_registered = True
        return cluster

    @classmethod
    def attach(cls, directory: str | os.PathLike[str]) -> LocalCluster:
        """A handle on a cluster started by another process (from ``state.json``)."""
        directory = Path(directory)
        try:
            state = json.loads((directory / STATE_FILE).read_text())
        except FileNotFoundError as exc:
            raise ClusterError(f"no local cluster state in {directory} ({STATE_FILE} missing)") from exc
        cluster = cls(directory, ClusterOptions(**state["options"]), Path(state["bin_dir"]), state["ports"])
        cluster.components = {name: Component.from_state(name, comp) for name, comp in state["components"].items()}
        cluster.startup_seconds = state.get("startup_seconds")
        cluster.helm = Path(state["helm"]) if state.get("helm") else None
        cluster.kubectl = Path(state["kubectl"]) if state.get("kubectl") else None
        if state.get("node"):
            cluster.node = Node.from_state(cluster.dir, state["node"])
        cluster.node_ready_seconds = state.get("node_ready_seconds")
        cluster.owner_pid = state.get("owner_pid")
        return cluster

    def down(self, timeout: float = 15.0) -> None:
        """Stop the node (if any) and every component (SIGTERM, SIGKILL after ``timeout``).

        Leaves ``dir`` in place.  With a node, raises :class:`ClusterError` naming anything the
        node left on the host (processes, mounts, rules, interfaces, cgroups, sysctls, paths).
        """
        errors = self._stop_node()
        for name in reversed(COMPONENT_ORDER):
            comp = self.components.get(name)
            if comp is None:
                continue
            try:
                comp.stop(timeout)
            except ComponentError as exc:
                errors.append(str(exc))
        self._write_state()
        self._stop_watchdog()
        if self._atexit_registered:
            atexit.unregister(self._stop_quietly)
            self._atexit_registered = False
        if errors:
            raise ClusterError("; ".join(errors))

    def stop_orphaned(self) -> None:
        """Stop everything, ignoring errors (used by the watchdog and at interpreter exit)."""
        self._stop_quietly()

    def _start_watchdog(self) -> None:
        env = dict(os.environ)
        package_parent = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        with open(self.dir / "watchdog.log", "ab") as log:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "localcluster.watchdog", str(os.getpid()), str(self.dir)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.poll() is None:
            self._watchdog.terminate()
            try:
                self._watchdog.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
        self._watchdog = None

    def _stop_node(self) -> list[str]:
        if self.node is None or not self.node.started:
            return []
        errors = self.node.stop()
        self._write_state()
        left = self.node.leftovers()
        if left:
            errors.append("the node left behind: " + "; ".join(left))
        return errors

    def _stop_quietly(self) -> None:
        self._stop_watchdog()
        try:
            self._stop_node()
        except OSError:
            pass
        for name in reversed(COMPONENT_ORDER):
            comp = self.components.get(name)
            if comp is not None:
                try:
                    comp.stop(timeout=10)
                except ComponentError:
                    pass
        if self.components:
            try:
                self._write_state()
            except OSError:
                pass

    def stop_component(self, name: str, timeout: float = 15.0, graceful: bool = True) -> None:
        """Stop one component (e.g. to simulate an API server outage); see ``Component.stop``."""
        self.components[name].stop(timeout, graceful=graceful)
        self._write_state()

    def start_component(self, name: str) -> float:
        """(Re)start one stopped component with its original args and ports; wait until ready."""
        comp = self.components[name]
        if comp.alive():
            raise ClusterError(f"{name} is already running (pid {comp.pid})")
        if not port_is_free(comp.port):
            raise ClusterError(f"cannot restart {name}: port 127.0.0.1:{comp.port} is in use")
        comp.start()
        self._write_state()
        try:
            return comp.wait_ready(self._readiness(name), self._timeout(name))
        except ComponentError as exc:
            raise ClusterError(str(exc)) from exc

    def restart_apiserver(self, graceful: bool = True, timeout: float = 15.0) -> float:
        """Stop and start kube-apiserver (same args, same port); returns seconds until ready.

        Graceful: SIGTERM; open watches are ended cleanly (the stream just ends) thanks to
        ``--shutdown-watch-termination-grace-period``.  Not graceful: SIGKILL, like a crash;
        clients see their connections reset.  Either way the new process serves the same
        etcd data, so resourceVersions stay valid across the restart.
        """
        self.stop_component("kube-apiserver", timeout, graceful=graceful)
        return self.start_component("kube-apiserver")

    # -- setup ----------------------------------------------------------------------------

    def _prepare(self) -> None:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        # A fresh cluster every time: stale etcd data would not match the new PKI and tokens.
        for stale in ("etcd-data", "audit", "kcm-certs", "scheduler-certs", "apiserver-certs"):
            shutil.rmtree(d / stale, ignore_errors=True)
        ca = pki.make_ca()
        pki.write_cert(self.ca_file, ca.cert)
        pki.write_key(d / "pki" / "ca.key", ca.key)
        pki.write_cert(d / "pki" / "ca.crt", ca.cert)
        if self.node is not None:
            ips, dns = self.node.apiserver_sans(self.node.ip)
            serving = pki.issue(ca, "kube-apiserver", server=True, ips=ips, dns=dns)
            self.node.write_pki(ca)
        else:
            serving = pki.serving_cert(ca, "kube-apiserver")
        serving.write(d / "pki" / "apiserver.crt", d / "pki" / "apiserver.key")
        sa = pki.make_service_account_key()
        pki.write_key(d / "pki" / "sa.key", sa)
        pki.write_public_key(d / "pki" / "sa.pub", sa)
        tokens = config.write_tokens(d)
        config.write_audit_policy(d / "audit-policy.yaml")
        (d / "audit").mkdir(exist_ok=True)
        config.write_kubeconfig(self.kubeconfig, self.url, self.ca_file, token=tokens["admin"])
        config.write_kubeconfig(d / "kcm.kubeconfig", self.url, self.ca_file, token=tokens["kcm"])
        config.write_kubeconfig(d / "scheduler.kubeconfig", self.url, self.ca_file, token=tokens["scheduler"])
        o = self.options
        if o.webhook_url:
            assert o.webhook_ca is not None
            config.write_kubeconfig(
                d / "audit-webhook.kubeconfig",
                o.webhook_url,
                Path(o.webhook_ca).resolve(),
                token_file=Path(o.webhook_token_file).resolve() if o.webhook_token_file else None,
                client_cert=Path(o.webhook_client_cert).resolve() if o.webhook_client_cert else None,
                client_key=Path(o.webhook_client_key).resolve() if o.webhook_client_key else None,
                name="audit-sink",
            )
        self.components = {name: self._component(name) for name in self._wanted()}

    def _wanted(self) -> tuple[str, ...]:
        return COMPONENT_ORDER if self.options.controllers else COMPONENT_ORDER[:2]

    def _component(self, name: str) -> Component:
        args = {
            "etcd": self._etcd_args,
            "kube-apiserver": self._apiserver_args,
            "kube-controller-manager": self._kcm_args,
            "kube-scheduler": self._scheduler_args,
        }[name]()
        return Component(name, [str(self.bin_dir / name), *args], self.dir / f"{name}.log", self.ports[name])

    def _etcd_args(self) -> list[str]:
        client, peer = self.ports["etcd"], self.ports["etcd-peer"]
        return [
            "--name=kubetrail",
            f"--data-dir={self.dir / 'etcd-data'}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=kubetrail=http://127.0.0.1:{peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync",  # throw-away data; fsync would dominate on slow disks
            "--log-level=warn",
        ]

    def _apiserver_args(self) -> list[str]:
        d, o = self.dir, self.options
        node = self.node
        args = [
            f"--etcd-servers={self.etcd_url}",
            # With a node, pods reach the apiserver through the `kubernetes` Service, whose
            # endpoint must be a non-loopback address the apiserver itself keeps up to date.
            f"--bind-address={'0.0.0.0' if node else '127.0.0.1'}",
            f"--advertise-address={node.ip if node else '127.0.0.1'}",
            f"--secure-port={self.ports['kube-apiserver']}",
            f"--cert-dir={d / 'apiserver-certs'}",
            f"--tls-cert-file={d / 'pki' / 'apiserver.crt'}",
            f"--tls-private-key-file={d / 'pki' / 'apiserver.key'}",
            f"--client-ca-file={self.ca_file}",
            f"--token-auth-file={d / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={self.url}",
            f"--service-account-key-file={d / 'pki' / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'pki' / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24",
            f"--endpoint-reconciler-type={'lease' if node else 'none'}",
            "--profiling=false",
            # Without it a SIGTERM'd apiserver keeps every open watch (and itself) alive for
            # its 60 s shutdown timeout; with it, watches end cleanly and it exits in ~1 s.
            "--shutdown-watch-termination-grace-period=5s",
            f"--audit-policy-file={d / 'audit-policy.yaml'}",
            f"--audit-log-path={self.audit_log_path}",
            "--audit-log-format=json",
            f"--audit-log-maxsize={o.audit_log_maxsize}",
            f"--audit-log-maxbackup={o.audit_log_maxbackup}",
        ]
        if o.audit_log_compress:
            args.append("--audit-log-compress")
        if o.webhook_url:
            args += [
                f"--audit-webhook-config-file={d / 'audit-webhook.kubeconfig'}",
                "--audit-webhook-mode=batch",
                "--audit-webhook-batch-max-wait=1s",
                "--audit-webhook-initial-backoff=1s",
            ]
        if o.event_ttl:
            args.append(f"--event-ttl={o.event_ttl}")
        if o.compaction_interval:
            args.append(f"--etcd-compaction-interval={o.compaction_interval}")
        if o.no_watch_cache_for_events:
            args.append("--watch-cache-sizes=events#0,events.events.k8s.io#0")
        if not o.controllers:
            args.append("--disable-admission-plugins=ServiceAccount")
        if node:
            args += node.apiserver_args()
        return args + list(o.apiserver_extra_args)

    def _client_component_args(self, name: str, kubeconfig: Path) -> list[str]:
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports[name]}",
            "--leader-elect=false",
        ]

    def _kcm_args(self) -> list[str]:
        d = self.dir
        return [
            *self._client_component_args("kube-controller-manager", d / "kcm.kubeconfig"),
            f"--cert-dir={d / 'kcm-certs'}",
            f"--root-ca-file={self.ca_file}",
            f"--service-account-private-key-file={d / 'pki' / 'sa.key'}",
            "--use-service-account-credentials=true",
        ]

    def _scheduler_args(self) -> list[str]:
        d = self.dir
        return [
            *self._client_component_args("kube-scheduler", d / "scheduler.kubeconfig"),
            f"--cert-dir={d / 'scheduler-certs'}",
        ]

    # -- readiness ------------------------------------------------------------------------

    def _timeout(self, name: str) -> float:
        return self.options.ready_timeout if name == "kube-apiserver" else 60.0

    def _readiness(self, name: str) -> Any:
        if name == "etcd":

            def etcd_ok() -> tuple[bool, str]:
                ok, detail = probe(f"{self.etcd_url}/health")
                return ok and '"health":"true"' in detail, detail

            return etcd_ok
        if name == "kube-apiserver":
            ctx, token = self._ssl(), self.admin_token
            return lambda: probe(f"{self.url}/readyz", token=token, context=ctx)
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE  # kcm/scheduler serve a self-signed cert
        port = self.ports[name]
        return lambda: probe(f"https://127.0.0.1:{port}/healthz", context=insecure)

    def _start_all(self) -> None:
        self._write_state()  # owner pid on disk before the first process exists
        for name in self._wanted():
            comp = self.components[name]
            comp.start()
            self._write_state()
            comp.wait_ready(self._readiness(name), self._timeout(name))
            if name == "kube-apiserver":
                try:
                    rbac.apply(self.client("admin"))
                except (rbac.RbacError, OSError) as exc:
                    raise comp.failure(f"rejected the collector RBAC objects: {exc}") from exc
        if self.options.controllers:
            # The ServiceAccount admission plugin rejects pods until kcm has created the
            # namespace's `default` ServiceAccount; wait so the first Deployment works at once.
            admin = self.client("admin")
            kcm = self.components["kube-controller-manager"]

            def default_sa() -> tuple[bool, str]:
                resp = admin.get("/api/v1/namespaces/default/serviceaccounts/default")
                return resp.ok, str(resp)

            kcm.wait_ready(default_sa, 60.0)
        if self.node is not None:
            self.node_ready_seconds = self.node.start(
                self.client("admin"), self.url, self.ca_file, self._log, save=self._write_state
            )

    # -- state, status, helpers -----------------------------------------------------------

    def _write_state(self) -> None:
        state = {
            "version": 1,
            "owner_pid": self.owner_pid,
            "dir": str(self.dir),
            "bin_dir": str(self.bin_dir),
            "url": self.url,
            "etcd_url": self.etcd_url,
            "ports": self.ports,
            "options": asdict(self.options),
            "startup_seconds": self.startup_seconds,
            "node": self.node.to_state() if self.node is not None else None,
            "node_ready_seconds": self.node_ready_seconds,
            "helm": str(self.helm) if self.helm else None,
            "kubectl": str(self.kubectl) if self.kubectl else None,
            "components": {name: comp.to_state() for name, comp in self.components.items()},
        }
        tmp = self.dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.dir / STATE_FILE)
        self._write_env()

    def env(self) -> dict[str, str]:
        env = {
            "KUBE_URL": self.url,
            "KUBE_CA_FILE": str(self.ca_file),
            "KUBECONFIG": str(self.kubeconfig),
            "ADMIN_TOKEN_FILE": str(self.admin_token_file),
            "COLLECTOR_TOKEN_FILE": str(self.collector_token_file),
            "NORBAC_TOKEN_FILE": str(self.norbac_token_file),
            "AUDIT_LOG_PATH": str(self.audit_log_path),
            "ETCD_URL": self.etcd_url,
            "LOCAL_CLUSTER_DIR": str(self.dir),
        }
        if self.helm is not None:
            env["HELM"] = str(self.helm)
        if self.kubectl is not None:
            env["KUBECTL"] = str(self.kubectl)
        if self.node is not None:
            env.update(self.node.env())
        return env

    def _write_env(self) -> None:
        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]
        (self.dir / "env").write_text("# source this file: . DIR/env\n" + "\n".join(lines) + "\n")

    def rss_kb(self) -> dict[str, int | None]:
        """VmRSS (kB) of each component, None for stopped ones."""
        return {name: comp.rss_kb() for name, comp in self.components.items()}

    def status(self) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = {}
        for name, comp in self.components.items():
            alive = comp.alive()
            healthy, detail = self._readiness(name)() if alive else (False, "not running")
            result[name] = {
                "pid": comp.pid,
                "running": alive,
                "port": comp.port,
                "healthy": healthy,
                "detail": detail,
                "rss_kb": comp.rss_kb(),
                "log": str(comp.log_path),
            }
        if self.node is not None and self.node.started:
            result.update({f"node/{name}": st for name, st in self.node.status().items()})
        return result

    def compact_now(self) -> int:
        """Compact etcd to its current revision; returns that revision.

        Every resourceVersion older than the returned one is gone from etcd afterwards, so
        reads that reach etcd (watch cache disabled, or ``resourceVersionMatch=Exact``) answer
        410 Gone.
        """
        status, body = http_call("POST", f"{self.etcd_url}/v3/maintenance/status", {})
        if status != 200:
            raise ClusterError(f"etcd status failed: HTTP {status} {body!r}")
        revision = int(json.loads(body)["header"]["revision"])
        status, body = http_call(
            "POST", f"{self.etcd_url}/v3/kv/compaction", {"revision": revision, "physical": True}, timeout=30
        )
        if status != 200 and b"required revision has been compacted" not in body:
            raise ClusterError(f"etcd compaction failed: HTTP {status} {body!r}")
        return revision


def _refuse_if_running(directory: Path) -> None:
    if not (directory / STATE_FILE).exists():
        return
    try:
        old = LocalCluster.attach(directory)
    except (ClusterError, ValueError, KeyError, TypeError):
        return  # unreadable/old state: nothing we could manage anyway
    running = [f"{n} (pid {c.pid})" for n, c in old.components.items() if c.alive()]
    if running:
        raise ClusterError(
            f"a local cluster is already running in {directory}: {', '.join(running)}; "
            f"run `scripts/local-cluster down {directory}` first"
        )


def _pick_ports(opts: ClusterOptions) -> dict[str, int]:
    taken: set[int] = set()
    ports: dict[str, int] = {}
    for name, fixed in (("kube-apiserver", opts.api_port), ("etcd", opts.etcd_port)):
        if fixed is not None:
            if not port_is_free(fixed):
                raise ClusterError(f"port 127.0.0.1:{fixed} for {name} is already in use")
            ports[name] = fixed
            taken.add(fixed)
    for name in ("etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        if name not in ports:
            ports[name] = free_port(taken)
    return ports
