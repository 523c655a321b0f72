"""Build helm, kubectl and a node's binaries (kubelet, kube-proxy, containerd, runc, CNI, crictl).

Why two kinds of build:

* kubectl, kubelet and kube-proxy come from the same ``k8s.io/kubernetes`` release as the
  control plane, so they are built in the committed wrapper module (``cluster/gomod/kubernetes``)
  with the control plane's flags and land in the control plane's cache directory, whose name
  already carries the Kubernetes and Go versions.  The pause binary is compiled from that
  release's ``build/pause/linux/pause.c`` (found in the module cache) and lives there too.
* helm, containerd, runc, the CNI plugins and crictl have no ``replace`` directives, so
  ``go install module/cmd@version`` builds exactly upstream's build list, checked against the
  checksum database.  Their versions are pinned below (one place); each set gets a cache
  directory named after its versions and the Go version, so a bump rebuilds and nothing else
  does.

Every binary is built into a temporary directory next to its final place and renamed in, as
``build`` does for the control plane: a killed build never leaves a half-written binary that a
later run would take for a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .build import (
    KUBE_GOMOD,
    KUBE_TAGS,
    BuildError,
    GoNotFoundError,
    _kube_ldflags,
    _run_go,
    binary_version,
    cache_root,
    ensure_binaries,
    find_go,
    go_version,
    pinned_versions,
)

HELM_VERSION = "v4.3.2"
CONTAINERD_VERSION = "v2.4.2"
RUNC_VERSION = "v1.5.3"
CNI_VERSION = "v1.10.0"
CRICTL_VERSION = "v1.37.0"
COREDNS_VERSION = "v1.15.0"

# Built in the kubernetes wrapper module, into the control plane's cache directory.
KUBE_TOOL_BINARIES = ("kubectl",)
KUBE_NODE_BINARIES = ("kubelet", "kube-proxy")
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")


@dataclass(frozen=True)
class GoInstall:
    """One ``go install PKG...@VERSION`` producing ``binaries`` (named after their packages)."""

    version: str
    packages: tuple[str, ...]
    binaries: tuple[str, ...]
    ldflags: str = "-s -w"
    tags: str = ""
    cgo: bool = False
    subdir: str = ""  # inside the cache directory (the CNI plugins go to cni/)


HELM = GoInstall(
    HELM_VERSION,
    ("helm.sh/helm/v4/cmd/helm",),
    ("helm",),
    # What helm's Makefile sets for a tagged release (no "+unreleased" metadata).
    ldflags=(
        f"-s -w -X helm.sh/helm/v4/internal/version.version={HELM_VERSION}"
        " -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
    ),
)

NODE_INSTALLS: tuple[GoInstall, ...] = (
    GoInstall(
        CONTAINERD_VERSION,
        tuple(f"github.com/containerd/containerd/v2/cmd/{c}" for c in ("containerd", "containerd-shim-runc-v2", "ctr")),
        ("containerd", "containerd-shim-runc-v2", "ctr"),
        ldflags=f"-s -w -X github.com/containerd/containerd/v2/version.Version={CONTAINERD_VERSION}",
    ),
    # runc 1.5's Makefile also adds the `libpathrs` tag, which needs a Rust C library; without
    # it runc uses its pure-Go fallback.  seccomp needs cgo and libseccomp-dev.
    GoInstall(
        RUNC_VERSION,
        ("github.com/opencontainers/runc",),
        ("runc",),
        ldflags=f"-s -w -X main.version={RUNC_VERSION.removeprefix('v')}",
        tags="seccomp urfave_cli_no_docs",
        cgo=True,
    ),
    GoInstall(
        CNI_VERSION,
        (
            "github.com/containernetworking/plugins/plugins/main/bridge",
            "github.com/containernetworking/plugins/plugins/ipam/host-local",
            "github.com/containernetworking/plugins/plugins/main/loopback",
            "github.com/containernetworking/plugins/plugins/meta/portmap",
        ),
        CNI_PLUGINS,
        subdir="cni",
    ),
    # Cluster DNS, so pods resolve kubernetes.default.svc as in any real cluster.
    # In a versioned subdir: a CoreDNS bump rebuilds only CoreDNS.
    GoInstall(COREDNS_VERSION, ("github.com/coredns/coredns",), ("coredns",), subdir=f"coredns-{COREDNS_VERSION}"),
    GoInstall(
        CRICTL_VERSION,
        ("sigs.k8s.io/cri-tools/cmd/crictl",),
        ("crictl",),
        ldflags=f"-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version={CRICTL_VERSION}",
    ),
)


def helm_key(gover: str) -> str:
    return f"helm-{HELM_VERSION}-{gover}"


def node_key(gover: str) -> str:
    return f"node-containerd-{CONTAINERD_VERSION}-runc-{RUNC_VERSION}-cni-{CNI_VERSION}-crictl-{CRICTL_VERSION}-{gover}"


@dataclass(frozen=True)
class Tools:
    """Client tools for a cluster: ``helm`` and ``kubectl`` (paths to executables)."""

    helm: Path
    kubectl: Path


@dataclass(frozen=True)
class NodeBinaries:
    """Everything a node runs.  ``kube_dir`` holds kubelet, kube-proxy and pause (the
    control plane's cache directory); ``dir`` holds containerd, its shim, ctr, runc, crictl
    and ``cni/``."""

    dir: Path
    kube_dir: Path

    @property
    def cni_dir(self) -> Path:
        return self.dir / "cni"

    def path(self, name: str) -> Path:
        if name in (*KUBE_NODE_BINARIES, "pause"):
            return self.kube_dir / name
        for inst in NODE_INSTALLS:
            if name in inst.binaries and inst.subdir:
                return self.dir / inst.subdir / name
        return self.dir / name

    def all_paths(self) -> list[Path]:
        paths = [self.kube_dir / n for n in (*KUBE_NODE_BINARIES, "pause")]
        for inst in NODE_INSTALLS:
            base = self.dir / inst.subdir if inst.subdir else self.dir
            paths += [base / b for b in inst.binaries]
        return paths

    def complete(self) -> bool:
        return all(os.access(p, os.X_OK) for p in self.all_paths())


@dataclass
class ToolBuildResult:
    built: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _go_install(go: str, inst: GoInstall, out: Path, log: TextIO) -> None:
    target = out / inst.subdir if inst.subdir else out
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target))
    # `go install pkg@version` runs outside any module: GOFLAGS=-mod=mod is not allowed there,
    # and GOBIN sends the binaries to the temp dir.
    env = {
        "GOWORK": "off",
        "GOFLAGS": "",
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "1" if inst.cgo else "0",
        "GOBIN": str(tmp),
    }
    cmd = [go, "install", "-trimpath", f"-ldflags={inst.ldflags}"]
    if inst.tags:
        cmd.append(f"-tags={inst.tags}")
    cmd += [f"{pkg}@{inst.version}" for pkg in inst.packages]
    try:
        _run_go(cmd, tmp, log, env)
        for name in inst.binaries:
            if not (tmp / name).is_file():
                raise BuildError(f"go install succeeded but produced no {name} in {tmp}")
            os.replace(tmp / name, target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_kube(go: str, names: list[str], out: Path, log: TextIO) -> None:
    kube, _ = pinned_versions()
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    env = {"GOWORK": "off", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
    try:
        target = str(tmp / names[0]) if len(names) == 1 else f"{tmp}/"
        cmd = [go, "build", "-trimpath", f"-tags={KUBE_TAGS}", f"-ldflags={_kube_ldflags(kube)}", "-o", target]
        _run_go(cmd + [f"k8s.io/kubernetes/cmd/{n}" for n in names], KUBE_GOMOD.parent, log, env)
        for name in names:
            if not (tmp / name).is_file():
                raise BuildError(f"go build succeeded but produced no {name} in {tmp}")
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def kubernetes_source_dir(go: str) -> Path:
    """The k8s.io/kubernetes module's directory in the module cache (downloads it if needed)."""
    env = {**os.environ, "GOWORK": "off", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    try:
        out = subprocess.run(
            [go, "mod", "download", "-json", "k8s.io/kubernetes"],
            cwd=KUBE_GOMOD.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"`go mod download k8s.io/kubernetes` failed: {exc}") from exc
    try:
        info = json.loads(out.stdout)
    except ValueError as exc:
        raise BuildError(f"`go mod download k8s.io/kubernetes` failed: {out.stderr.strip()}") from exc
    if "Dir" not in info:
        raise BuildError(f"`go mod download k8s.io/kubernetes` failed: {info.get('Error', out.stderr.strip())}")
    return Path(info["Dir"])


def _build_pause(go: str, out: Path, log: TextIO) -> None:
    """The sandbox ("pause") binary from the Kubernetes release's own C source, static."""
    kube, _ = pinned_versions()
    source = kubernetes_source_dir(go) / "build" / "pause" / "linux" / "pause.c"
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise BuildError("no C compiler (gcc) on PATH: it builds the pause image (apt-get install gcc)")
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        cmd = [cc, "-Os", "-Wall", "-Werror", "-static", f"-DVERSION={kube}", "-o", str(tmp / "pause"), str(source)]
        print("+ " + " ".join(cmd), file=log, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"compiling {source} failed (static glibc: apt-get install libc6-dev):\n{done.stderr}")
        if shutil.which("strip"):
            subprocess.run(["strip", str(tmp / "pause")], check=False)
        os.replace(tmp / "pause", out / "pause")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _go_and_version() -> tuple[str, str]:
    go = find_go()
    return go, go_version(go)


def build_tools(log: TextIO = sys.stderr, force: bool = False) -> tuple[Tools, ToolBuildResult]:
    """helm and kubectl, built when missing (kubectl next to the control plane binaries)."""
    started = time.monotonic()
    go, gover = _go_and_version()
    kube_dir = ensure_binaries(log=log)
    helm_dir = cache_root() / helm_key(gover)
    helm_dir.mkdir(parents=True, exist_ok=True)
    result = ToolBuildResult()
    if force or not os.access(helm_dir / "helm", os.X_OK):
        print(f"building helm {HELM_VERSION} with {gover} into {helm_dir}", file=log, flush=True)
        _go_install(go, HELM, helm_dir, log)
        result.built.append("helm")
    missing = [n for n in KUBE_TOOL_BINARIES if force or not os.access(kube_dir / n, os.X_OK)]
    if missing:
        print(f"building {', '.join(missing)} into {kube_dir}", file=log, flush=True)
        _build_kube(go, missing, kube_dir, log)
        result.built += missing
    result.seconds = time.monotonic() - started
    return Tools(helm=helm_dir / "helm", kubectl=kube_dir / "kubectl"), result


def build_node(log: TextIO = sys.stderr, force: bool = False) -> tuple[NodeBinaries, ToolBuildResult]:
    """kubelet, kube-proxy, pause, containerd (+ shim, ctr), runc, CNI plugins, crictl, CoreDNS."""
    started = time.monotonic()
    go, gover = _go_and_version()
    kube_dir = ensure_binaries(log=log)
    node_dir = cache_root() / node_key(gover)
    node_dir.mkdir(parents=True, exist_ok=True)
    bins = NodeBinaries(node_dir, kube_dir)
    result = ToolBuildResult()
    missing = [n for n in KUBE_NODE_BINARIES if force or not os.access(kube_dir / n, os.X_OK)]
    if missing:
        print(f"building {', '.join(missing)} into {kube_dir}", file=log, flush=True)
        _build_kube(go, missing, kube_dir, log)
        result.built += missing
    if force or not os.access(kube_dir / "pause", os.X_OK):
        _build_pause(go, kube_dir, log)
        result.built.append("pause")
    for inst in NODE_INSTALLS:
        base = node_dir / inst.subdir if inst.subdir else node_dir
        if force or not all(os.access(base / b, os.X_OK) for b in inst.binaries):
            print(f"building {', '.join(inst.binaries)} {inst.version} with {gover} into {base}", file=log, flush=True)
            _go_install(go, inst, node_dir, log)
            result.built += list(inst.binaries)
    result.seconds = time.monotonic() - started
    return bins, result


def _cached(pattern: str, check: list[str]) -> Path | None:
    root = cache_root()
    if not root.is_dir():
        return None
    found = [d for d in root.glob(pattern) if all(os.access(d / c, os.X_OK) for c in check)]
    return max(found, key=lambda d: d.stat().st_mtime) if found else None


def ensure_tools(log: TextIO = sys.stderr, allow_build: bool = True) -> Tools:
    """helm and kubectl: cached ones for the pinned versions, else built (if allowed)."""
    try:
        _, gover = _go_and_version()
    except GoNotFoundError:
        kube_dir = ensure_binaries(log=log, allow_build=False)
        helm_dir = _cached(f"helm-{HELM_VERSION}-go*", ["helm"])
        if helm_dir is None or not os.access(kube_dir / "kubectl", os.X_OK):
            raise
        return Tools(helm_dir / "helm", kube_dir / "kubectl")
    kube_dir = ensure_binaries(log=log, allow_build=allow_build)
    tools = Tools(cache_root() / helm_key(gover) / "helm", kube_dir / "kubectl")
    if os.access(tools.helm, os.X_OK) and os.access(tools.kubectl, os.X_OK):
        return tools
    if not allow_build:
        raise BuildError(f"helm/kubectl missing ({tools.helm}, {tools.kubectl}); run `scripts/local-cluster build`")
    return build_tools(log=log)[0]


def ensure_node_binaries(log: TextIO = sys.stderr, allow_build: bool = True) -> NodeBinaries:
    """A node's binaries: cached ones for the pinned versions, else built (if allowed)."""
    try:
        _, gover = _go_and_version()
    except GoNotFoundError:
        kube_dir = ensure_binaries(log=log, allow_build=False)
        node_dir = _cached(node_key("go*"), ["containerd", "runc"])
        if node_dir is None or not NodeBinaries(node_dir, kube_dir).complete():
            raise
        return NodeBinaries(node_dir, kube_dir)
    kube_dir = ensure_binaries(log=log, allow_build=allow_build)
    bins = NodeBinaries(cache_root() / node_key(gover), kube_dir)
    if bins.complete():
        return bins
    if not allow_build:
        raise BuildError(f"node binaries missing in {bins.dir} / {kube_dir}; run `scripts/local-cluster build --node`")
    return build_node(log=log)[0]


def versions_report(tools: Tools | None, node: NodeBinaries | None) -> list[tuple[str, str]]:
    """(name, first line of its version output) for printing after a build."""
    rows: list[tuple[str, str]] = []
    if tools is not None:
        rows.append(("helm", _first_line([str(tools.helm), "version", "--short"])))
        rows.append(("kubectl", _first_line([str(tools.kubectl), "version", "--client"])))
    if node is not None:
        for name in ("kubelet", "kube-proxy"):
            rows.append((name, binary_version(node.path(name))))
        rows.append(("pause", _first_line([str(node.path("pause")), "-v"])))
        rows.append(("containerd", _first_line([str(node.path("containerd")), "--version"])))
        rows.append(("runc", _first_line([str(node.path("runc")), "--version"])))
        rows.append(("crictl", _first_line([str(node.path("crictl")), "--version"])))
        rows.append(("coredns", _first_line([str(node.path("coredns")), "-version"])))
        rows.append(("cni plugins", CNI_VERSION))
    return rows


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"<cannot run: {exc}>"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "<no output>"
