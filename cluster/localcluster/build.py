"""Build the control-plane binaries from the Go module proxy, once, into a versioned cache.

Why from source: no prebuilt Kubernetes binaries can be downloaded on the machines this
project runs on, and there is no Docker.  The committed wrapper modules under
``cluster/gomod/`` pin the exact versions (k8s.io/kubernetes with every staging module
replaced by its published ``v0.x.y`` tag; go.etcd.io/etcd/server/v3), so the versions are
read from those go.mod files rather than repeated here.

Why a cache keyed by all three versions (Kubernetes, etcd, Go): a cold build costs minutes
of CPU on a 2-core machine, so a second ``build`` must only check that the binaries exist.
Each binary is built under a temporary name and renamed into place, so a killed build never
leaves a half-written binary that a later run would mistake for a finished one.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

GOMOD_DIR = Path(__file__).resolve().parent.parent / "gomod"
KUBE_GOMOD = GOMOD_DIR / "kubernetes" / "go.mod"
ETCD_GOMOD = GOMOD_DIR / "etcd" / "go.mod"

KUBE_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
ALL_BINARIES = ("etcd", *KUBE_BINARIES)

# Upstream release settings (hack/lib/golang.sh): static, these tags, stripped, trimmed.
BUILD_ENV = {"GOWORK": "off", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
KUBE_TAGS = "selinux,notest,grpcnotrace"

# Output of `go build` that means "could not fetch modules" rather than "code did not compile".
_DOWNLOAD_FAILURE = re.compile(
    r"dial tcp|no such host|connection refused|i/o timeout|TLS handshake|module lookup disabled"
    r"|unknown revision|reading https?://|proxy\.golang\.org|verifying .*: |checksum mismatch"
    r"|missing go\.sum entry|Get \"https?://",
)


class BuildError(RuntimeError):
    """The binaries could not be built; the message says why and what to do."""


class GoNotFoundError(BuildError):
    """No Go toolchain on PATH (and no cached binaries to fall back on)."""


@dataclass(frozen=True)
class Versions:
    """Versions that identify one set of binaries (and name its cache directory)."""

    kubernetes: str  # e.g. v1.36.3, from cluster/gomod/kubernetes/go.mod
    etcd: str  # e.g. v3.6.16, from cluster/gomod/etcd/go.mod
    go: str  # e.g. go1.26.8, the toolchain that builds them

    @property
    def key(self) -> str:
        return f"k8s-{self.kubernetes}-etcd-{self.etcd}-{self.go}"


@dataclass(frozen=True)
class BuildResult:
    bin_dir: Path
    versions: Versions
    built: tuple[str, ...]  # binaries compiled by this call (empty when all were cached)
    seconds: float


def module_version(gomod: Path, module: str) -> str:
    """The version of ``module`` required by ``gomod`` (block or single-line require)."""
    pattern = re.compile(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", re.MULTILINE)
    match = pattern.search(gomod.read_text())
    if not match:
        raise BuildError(f"{gomod} does not require {module}")
    return match.group(1)


def go_directive(gomod: Path) -> str:
    match = re.search(r"^go\s+(\S+)", gomod.read_text(), re.MULTILINE)
    return match.group(1) if match else "1.0"


def pinned_versions() -> tuple[str, str]:
    """(kubernetes, etcd) versions pinned by the committed wrapper modules."""
    return (
        module_version(KUBE_GOMOD, "k8s.io/kubernetes"),
        module_version(ETCD_GOMOD, "go.etcd.io/etcd/server/v3"),
    )


def find_go() -> str:
    go = shutil.which("go")
    if go is None:
        raise GoNotFoundError(
            "no Go toolchain found on PATH. Building the control plane needs Go >= "
            f"{go_directive(KUBE_GOMOD)} (https://go.dev/dl/) and access to the Go module proxy; "
            "then run `scripts/local-cluster build`."
        )
    return go


def go_version(go: str) -> str:
    env = {**os.environ, **BUILD_ENV}
    try:
        out = subprocess.run([go, "env", "GOVERSION"], env=env, capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise GoNotFoundError(f"`{go} env GOVERSION` failed: {exc}") from exc
    version = out.stdout.strip()
    if not version.startswith("go"):
        raise GoNotFoundError(f"unexpected output from `{go} env GOVERSION`: {version!r}")
    return version


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text.removeprefix("go"))[:3])


def cache_root() -> Path:
    """``$KUBETRAIL_CACHE_DIR/control-plane`` (default ``~/.cache/kubetrail/control-plane``)."""
    base = os.environ.get("KUBETRAIL_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "kubetrail"
    return root / "control-plane"


def _complete(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in ALL_BINARIES)


def find_cached_binaries() -> Path | None:
    """A complete cached binary set for the pinned versions, whatever Go built it.

    Used when Go itself is missing: binaries built earlier are still perfectly usable.
    """
    kube, etcd = pinned_versions()
    root = cache_root()
    if not root.is_dir():
        return None
    candidates = [d for d in root.glob(f"k8s-{kube}-etcd-{etcd}-go*") if _complete(d)]
    return max(candidates, key=lambda d: d.stat().st_mtime) if candidates else None


def binary_version(path: Path) -> str:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"<cannot run: {exc}>"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "<no output>"


def _kube_ldflags(version: str) -> str:
    match = re.match(r"v(\d+)\.(\d+)", version)
    major, minor = match.groups() if match else ("0", "0")
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return " ".join(flags)


def _run_go(cmd: list[str], cwd: Path, log: TextIO, env_overrides: dict[str, str] | None = None) -> None:
    """Run a go command, streaming its output to ``log``; raise BuildError on failure."""
    env = {**os.environ, **(BUILD_ENV if env_overrides is None else env_overrides)}
    print(f"+ (cd {cwd} && {' '.join(cmd)})", file=log, flush=True)
    tail: collections.deque[str] = collections.deque(maxlen=30)
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as exc:
        raise BuildError(f"cannot run {cmd[0]}: {exc}") from exc
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip("\n"))
        log.write(line)
        log.flush()
    code = proc.wait()
    if code == 0:
        return
    output = "\n".join(tail)
    if _DOWNLOAD_FAILURE.search(output):
        proxy = subprocess.run(
            [cmd[0], "env", "GOPROXY", "GOMODCACHE"], env=env, capture_output=True, text=True
        ).stdout.split()
        raise BuildError(
            "downloading Go modules failed (GOPROXY="
            f"{proxy[0] if proxy else '?'}, GOMODCACHE={proxy[1] if len(proxy) > 1 else '?'}). "
            "A cold build needs the Go module proxy; check network access and GOPROXY, then rerun "
            f"`scripts/local-cluster build`.\nlast output of `go build`:\n{output}"
        )
    raise BuildError(f"`go build` failed with exit code {code} in {cwd}:\n{output}")


def _build_into(
    go: str,
    cwd: Path,
    packages: Iterable[str],
    names: Iterable[str],
    flags: list[str],
    out: Path,
    log: TextIO,
) -> None:
    """go build ``packages`` into a temp dir next to ``out``, then rename each binary in."""
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        names = list(names)
        # `-o DIR/` names each binary after its package; a module-root main package
        # (etcd's server/v3) would be named "v3", so a single binary gets an explicit name.
        target = str(tmp / names[0]) if len(names) == 1 else f"{tmp}/"
        _run_go([go, "build", "-trimpath", *flags, "-o", target, *packages], cwd, log)
        for name in names:
            built = tmp / name
            if not built.is_file():
                raise BuildError(f"go build succeeded but produced no {name} in {tmp}")
            os.replace(built, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build(log: TextIO = sys.stderr, force: bool = False) -> BuildResult:
    """Build missing binaries into the cache; idempotent and cheap when all are there."""
    started = time.monotonic()
    go = find_go()
    gover = go_version(go)
    need = go_directive(KUBE_GOMOD)
    if _version_tuple(gover) < _version_tuple(need):
        raise BuildError(
            f"{gover} is too old: cluster/gomod/kubernetes/go.mod needs go >= {need}. "
            "Install a newer Go (https://go.dev/dl/)."
        )
    kube, etcd = pinned_versions()
    versions = Versions(kubernetes=kube, etcd=etcd, go=gover)
    out = cache_root() / versions.key
    out.mkdir(parents=True, exist_ok=True)
    built: list[str] = []

    if force or not os.access(out / "etcd", os.X_OK):
        print(f"building etcd {etcd} with {gover} into {out}", file=log, flush=True)
        _build_into(go, ETCD_GOMOD.parent, ["go.etcd.io/etcd/server/v3"], ["etcd"], ["-ldflags=-s -w"], out, log)
        built.append("etcd")

    missing = [n for n in KUBE_BINARIES if force or not os.access(out / n, os.X_OK)]
    if missing:
        print(f"building {', '.join(missing)} {kube} with {gover} into {out}", file=log, flush=True)
        _build_into(
            go,
            KUBE_GOMOD.parent,
            [f"k8s.io/kubernetes/cmd/{n}" for n in missing],
            missing,
            [f"-tags={KUBE_TAGS}", f"-ldflags={_kube_ldflags(kube)}"],
            out,
            log,
        )
        built.extend(missing)
    return BuildResult(out, versions, tuple(built), time.monotonic() - started)


def ensure_binaries(log: TextIO = sys.stderr, allow_build: bool = True) -> Path:
    """Directory holding all four binaries, building them if needed and allowed.

    Falls back to an earlier cached build of the pinned versions when Go is not installed.
    """
    try:
        go = find_go()
    except GoNotFoundError:
        cached = find_cached_binaries()
        if cached is not None:
            return cached
        raise
    kube, etcd = pinned_versions()
    out = cache_root() / Versions(kube, etcd, go_version(go)).key
    if _complete(out):
        return out
    if not allow_build:
        raise BuildError(f"control-plane binaries missing in {out}; run `scripts/local-cluster build`")
    return build(log=log).bin_dir
