"""Build kubetrail's container image without a container engine or registry.

Two steps, shared with the ``Dockerfile`` so that both produce the same image:

``app ROOT``
    Builds kubetrail's wheel and the native extension's (``native/``, Rust via maturin), fetches
    the runtime dependencies as binary wheels at the versions pinned in ``requirements/ci.txt``,
    installs all of them into ``ROOT/opt/kubetrail/lib``, compiles their bytecode (the image runs
    with a read-only root filesystem, so nothing could be cached at run time) and writes the
    ``ROOT/usr/local/bin/kubetrail`` launcher. The Dockerfile's builder stage runs this.

``build``
    What ``scripts/image build`` runs: a Debian root filesystem from Debian's packages
    (``debootstrap --variant=minbase`` of this machine's release with ``python3-minimal``,
    cached by release and package list), the ``app`` step into it, a non-root user, apt's caches
    and the docs removed, then one layer written as an OCI image archive named
    ``localhost/kubetrail:<version>``. The archive is cached under a key over every input
    (sources, pins, this script, the package list): an unchanged tree rebuilds nothing. The
    archive's path is printed last.

Why no Docker here: this project's machines have no container engine and reach only package
registries, so the image is assembled from the same parts a Dockerfile would pull, by hand. The
layer is written deterministically (sorted entries, mtime 0, owners kept), so the same inputs
give the same digests.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGE_NAME = "localhost/kubetrail"
GLIBC_MINOR = 36  # the image's glibc is 2.36 (Debian bookworm): wheels built for up to it run
USER_ID = 65532  # the "nonroot" uid distroless images use; no meaning on the host
# Debian packages of the runtime; everything else comes from debootstrap's minbase set.
RUNTIME_PACKAGES = ("python3-minimal", "libpython3.11-stdlib", "ca-certificates", "tzdata")
# Removed from the root filesystem: caches and documentation nobody reads in a container.
SLIM_PATHS = (
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/cache/debconf/templates.dat-old",
    "var/log",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "dev",
)
LAUNCHER = """#!/usr/bin/python3 -I
# kubetrail's entry point in the image: -I keeps PYTHONPATH and user site-packages out.
import sys

sys.path.insert(0, "/opt/kubetrail/lib")
from kubetrail.cli.main import main

sys.exit(main())
"""


def version() -> str:
    text = (REPO / "kubetrail" / "__init__.py").read_text()
    match = re.search(r'__version__ = "([^"]+)"', text)
    if not match:
        raise SystemExit("kubetrail/__init__.py has no __version__")
    return match.group(1)


def run(*cmd: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    subprocess.run([str(c) for c in cmd], check=True, env=env, cwd=cwd)


def cache_dir() -> Path:
    return Path(os.environ.get("KUBETRAIL_CACHE_DIR") or Path.home() / ".cache" / "kubetrail")


def pinned_versions() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (REPO / "requirements" / "ci.txt").read_text().splitlines():
        name, sep, ver = line.strip().partition("==")
        if sep:
            pins[_canonical(name)] = ver
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- the app step -----------------------------------------------------------------------------


def build_wheels(out: Path, python: str) -> list[Path]:
    """kubetrail's and kubetrail_native's wheels plus the pinned runtime dependencies."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", str(cache_dir() / "native-target"))
    env["PATH"] = f"{Path(python).parent}:{env.get('PATH', '')}:{Path.home() / '.cargo' / 'bin'}"
    pip = (python, "-m", "pip", "--disable-pip-version-check")
    run(*pip, "wheel", "--no-deps", "-w", out, REPO, env=env)
    # maturin at the version pinned in requirements/ci.txt, already installed beside pip.
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", out, REPO / "native", env=env)
    own = sorted(out.glob("kubetrail-*.whl"))
    # Binary wheels for the image's Python (Debian's 3.11, glibc), whatever the builder runs.
    run(
        *pip,
        "download",
        "--only-binary=:all:",
        # Every manylinux tag up to the image's glibc (Debian bookworm: 2.36).
        *(f"--platform=manylinux_2_{minor}_x86_64" for minor in range(17, GLIBC_MINOR + 1)),
        "--platform=manylinux2014_x86_64",
        "--python-version=3.11",
        "--implementation=cp",
        "-c",
        REPO / "requirements" / "ci.txt",
        "-d",
        out,
        *own,
        env=env,
    )
    wheels = sorted(out.glob("*.whl"))
    pins = pinned_versions()
    for wheel in wheels:
        name, ver = wheel.name.split("-")[:2]
        if _canonical(name) in ("kubetrail", "kubetrail-native"):
            continue
        if pins.get(_canonical(name)) != ver:
            raise SystemExit(f"{wheel.name}: runtime dependency {name} is not pinned in requirements/ci.txt")
    return wheels


def install_app(root: Path, python: str, wheel_dir: Path) -> None:
    lib = root / "opt" / "kubetrail" / "lib"
    if lib.exists():
        shutil.rmtree(lib)
    wheels = build_wheels(wheel_dir, python)
    run(
        python,
        "-m",
        "pip",
        "--disable-pip-version-check",
        "install",
        "--no-deps",
        "--no-index",
        "--no-compile",
        "--target",
        lib,
        *wheels,
    )
    # Console scripts written by pip point at the builder's Python; the launcher replaces them.
    shutil.rmtree(lib / "bin", ignore_errors=True)
    # unchecked-hash: valid without source timestamps, so the layer stays reproducible.
    run(
        python,
        "-m",
        "compileall",
        "-q",
        "-j",
        "0",
        "--invalidation-mode",
        "unchecked-hash",
        "-d",
        "/opt/kubetrail/lib",
        lib,
    )
    launcher = root / "usr" / "local" / "bin" / "kubetrail"
    launcher.parent.mkdir(parents=True, exist_ok=True)
    launcher.write_text(LAUNCHER)
    launcher.chmod(0o755)


# --- the build step ---------------------------------------------------------------------------


def debian_release_and_mirror() -> tuple[str, str]:
    """This machine's Debian release and the mirror its apt already uses."""
    release = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            release = line.split("=", 1)[1].strip('"')
    mirror = ""
    sources = [*Path("/etc/apt/sources.list.d").glob("*.sources"), Path("/etc/apt/sources.list")]
    for path in sources:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and len(words) > 1 and "security" not in words[1]:
                mirror = mirror or words[1]
            elif words[:1] == ["deb"] and len(words) > 2 and "security" not in words[-2]:
                mirror = mirror or next(w for w in words[1:] if "://" in w)
    if not release or not mirror:
        raise SystemExit("cannot tell this machine's Debian release and mirror (/etc/os-release, /etc/apt)")
    return release, mirror


def base_rootfs(release: str, mirror: str) -> Path:
    """debootstrap's minbase plus the runtime packages, cached by release and package list."""
    key = hashlib.sha256(f"{release} {' '.join(RUNTIME_PACKAGES)}".encode()).hexdigest()[:12]
    base = cache_dir() / "image" / f"rootfs-{release}-{key}"
    if (base / ".complete").exists():
        return base
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap is missing: apt-get install debootstrap (scripts/image installs it as root)")
    tmp = base.with_name(base.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    run("debootstrap", "--variant=minbase", f"--include={','.join(RUNTIME_PACKAGES)}", release, tmp, mirror)
    (tmp / ".complete").write_text("")
    shutil.rmtree(base, ignore_errors=True)
    tmp.rename(base)
    return base


def input_key(release: str) -> str:
    """Hash of everything the image is made of: a changed input means a new image."""
    digest = hashlib.sha256()
    digest.update(f"{release} {' '.join(RUNTIME_PACKAGES)}\n".encode())
    paths = [REPO / "pyproject.toml", REPO / "requirements" / "ci.txt", Path(__file__)]
    for top in (REPO / "kubetrail", REPO / "native" / "src"):
        paths += [p for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    paths += [REPO / "native" / name for name in ("Cargo.toml", "Cargo.lock", "pyproject.toml")]
    for path in sorted(paths):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def finish_rootfs(root: Path) -> None:
    for rel in SLIM_PATHS:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            path.mkdir()  # kept empty: apt, dpkg and the runtime expect the directories
        elif path.exists():
            path.unlink()
    for name, line in (
        ("passwd", f"kubetrail:x:{USER_ID}:{USER_ID}:kubetrail:/nonexistent:/usr/sbin/nologin\n"),
        ("group", f"kubetrail:x:{USER_ID}:\n"),
    ):
        path = root / "etc" / name
        text = path.read_text()
        if "\nkubetrail:" not in text:
            path.write_text(text + line)
    config_dir = root / "etc" / "kubetrail"
    config_dir.mkdir(exist_ok=True)
    shutil.copy(REPO / "kubetrail" / "cli" / "default.conf", config_dir / "kubetrail.conf")


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if info.name in (".complete",) or info.ischr() or info.isblk() or info.isfifo():
        return None
    info.mtime = 0
    info.uname = info.gname = ""
    return info


def write_layer(root: Path, layer: Path) -> None:
    """Uncompressed tar of the root filesystem, entries sorted, parents before children."""
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                path = Path(dirpath) / name
                arcname = str(path.relative_to(root))
                info = tar.gettarinfo(str(path), arcname)
                info = _tar_filter(info)
                if info is None:
                    continue
                if info.isreg():
                    with open(path, "rb") as fh:
                        tar.addfile(info, fh)
                else:
                    tar.addfile(info)


def write_oci_archive(layer: Path, out: Path, ref: str, config: dict[str, object]) -> dict[str, int]:
    """An OCI image layout (one gzipped layer) tarred up, as ``ctr images import`` and
    ``skopeo copy oci-archive:`` read it."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return digest

    raw = layer.read_bytes()
    compressed = gzip.compress(raw, compresslevel=6, mtime=0)
    layer_digest = blob(compressed)
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
        "history": [{"created_by": "deploy/image/build.py", "comment": "debootstrap minbase + kubetrail"}],
    }
    config_bytes = json.dumps(image_config, sort_keys=True).encode()
    config_digest = blob(config_bytes)
    labels = dict(config.get("Labels", {}))  # type: ignore[call-overload]
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest,
                "size": len(compressed),
            }
        ],
        "annotations": labels,
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    manifest_digest = blob(manifest_bytes)
    tag = ref.rsplit(":", 1)[1]
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True).encode(),
        **{f"blobs/sha256/{d.split(':', 1)[1]}": data for d, data in blobs.items()},
    }
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for name in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    tmp.rename(out)
    return {"uncompressed": len(raw), "compressed": len(compressed)}


def image_config(ver: str, key: str) -> dict[str, object]:
    return {
        "User": f"{USER_ID}:{USER_ID}",
        "Entrypoint": ["/usr/local/bin/kubetrail"],
        "Cmd": ["run", "-c", "/etc/kubetrail/kubetrail.conf"],
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONUNBUFFERED=1"],
        "WorkingDir": "/",
        "ExposedPorts": {"2020/tcp": {}},
        "Labels": {
            "org.opencontainers.image.title": "kubetrail",
            "org.opencontainers.image.description": "Kubernetes Events, audit records and container logs, "
            "delivered with nothing lost and nothing repeated",
            "org.opencontainers.image.version": ver,
            "org.opencontainers.image.licenses": "Apache-2.0",
            "org.opencontainers.image.revision": key,
            "org.opencontainers.image.base.name": "debian minbase (debootstrap)",
        },
    }


def build(force: bool, python: str) -> Path:
    if os.geteuid() != 0:
        raise SystemExit("scripts/image build needs root (debootstrap, and file owners in the layer)")
    ver = version()
    release, mirror = debian_release_and_mirror()
    key = input_key(release)
    out_dir = cache_dir() / "image"
    out = out_dir / f"kubetrail-{ver}-{key}.oci.tar"
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".build.lock", "w") as lock:
        # One build at a time: two (the test suite's lanes on a cold cache) would remove each
        # other's debootstrap directory; the second finds the first's archive when it is done.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists() and not force:
            print(f"up to date: {IMAGE_NAME}:{ver} ({key})", file=sys.stderr)
            return out
        return _build_locked(out, out_dir, ver, key, release, mirror, python)


def _build_locked(out: Path, out_dir: Path, ver: str, key: str, release: str, mirror: str, python: str) -> Path:
    base = base_rootfs(release, mirror)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix="build-") as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "rootfs"
        run("cp", "-a", base, root)
        install_app(root, python, tmp / "wheels")
        finish_rootfs(root)
        layer = tmp / "layer.tar"
        write_layer(root, layer)
        sizes = write_oci_archive(layer, out, f"{IMAGE_NAME}:{ver}", image_config(ver, key))
    for old in out_dir.glob("kubetrail-*.oci.tar"):
        if old != out:
            old.unlink()
    (out_dir / "latest").write_text(f"{out}\n")
    print(
        f"built {IMAGE_NAME}:{ver}: {sizes['uncompressed'] / 1e6:.1f} MB uncompressed, "
        f"{sizes['compressed'] / 1e6:.1f} MB compressed",
        file=sys.stderr,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/image", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the OCI image archive (cached); prints its path last")
    b.add_argument("--force", action="store_true", help="rebuild even if the inputs did not change")
    a = sub.add_parser("app", help="install kubetrail into ROOT/opt/kubetrail (the Dockerfile's builder step)")
    a.add_argument("root", type=Path)
    a.add_argument("--wheels", type=Path, default=Path("/tmp/kubetrail-wheels"))
    sub.add_parser("path", help="print the path of the last built archive")
    args = parser.parse_args()
    python = sys.executable
    if args.command == "build":
        print(build(args.force, python))
    elif args.command == "app":
        install_app(args.root, python, args.wheels)
    else:
        latest = cache_dir() / "image" / "latest"
        if not latest.exists():
            raise SystemExit("no image built yet: scripts/image build")
        print(latest.read_text().strip())


if __name__ == "__main__":
    main()
