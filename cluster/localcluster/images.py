"""Container images for the local node, written without a registry, Docker or any image tool.

Why by hand: the node has no registry to pull from, and nothing that builds images can be
installed here.  An image is only an OCI image layout (``index.json``, ``oci-layout`` and
content-addressed blobs), which the standard library writes in a few lines; containerd
imports it as a tar with ``ctr images import``.

Why reproducible: every tar entry gets uid/gid 0 and mtime 0, entries are sorted with parents
first, and gzip gets mtime 0, so the same inputs give the same digests on every run (a test
checks this).  Two images are made here:

* ``pause`` (the pod sandbox): the static binary compiled from the Kubernetes release's
  ``pause.c`` (see ``gotools``), entrypoint ``/pause``.
* ``localhost/busybox:latest`` for test workloads: Debian's static busybox with a symlink per
  applet, ``/etc/passwd`` and ``/etc/group`` (root, nobody) and a 1777 ``/tmp``.

Other images (the kubetrail image from ``scripts/image build``) arrive as OCI archives; their
name is read from ``index.json`` (``io.containerd.image.name``, which ``ctr`` uses).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

PAUSE_IMAGE = "localhost/kubetrail/pause:local"
BUSYBOX_IMAGE = "localhost/busybox:latest"

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
NAME_ANNOTATION = "io.containerd.image.name"
REF_ANNOTATION = "org.opencontainers.image.ref.name"


class ImageError(RuntimeError):
    """An image could not be written or read; the message names the file and the problem."""


@dataclass(frozen=True)
class Entry:
    """One root-filesystem entry: a directory, a file (``data``) or a symlink (``target``)."""

    path: str  # relative, no leading slash
    mode: int = 0o755
    data: bytes | None = None
    target: str | None = None


def _tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def layer_tar(entries: list[Entry]) -> bytes:
    """An uncompressed, reproducible layer tar; parent directories are added before children."""
    by_path: dict[str, Entry] = {}
    for entry in entries:
        parts = entry.path.strip("/").split("/")
        for i in range(1, len(parts)):
            by_path.setdefault("/".join(parts[:i]), Entry("/".join(parts[:i])))
        by_path[entry.path.strip("/")] = entry
    out: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for path in sorted(by_path):  # sorted: "a" < "a/b", so parents come first
        entry = by_path[path]
        info = _info(path, entry.mode)
        if entry.target is not None:
            info.type = tarfile.SYMTYPE
            info.linkname = entry.target
            info.mode = 0o777
            out.append((info, None))
        elif entry.data is not None:
            info.size = len(entry.data)
            out.append((info, entry.data))
        else:
            info.type = tarfile.DIRTYPE
            out.append((info, None))
    return _tar_bytes(out)


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
        gz.write(data)
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_oci_archive(
    out: Path,
    name: str,
    layer: bytes,
    *,
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    env: list[str] | None = None,
) -> str:
    """Write a one-layer image as an OCI layout tar at ``out``; returns the manifest digest."""
    compressed = _gzip(layer)
    image_config: dict[str, object] = {
        "Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    }
    if entrypoint:
        image_config["Entrypoint"] = entrypoint
    if cmd:
        image_config["Cmd"] = cmd
    config = _json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": image_config,
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
        }
    )
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": _digest(config), "size": len(config)},
            "layers": [{"mediaType": MEDIA_LAYER, "digest": _digest(compressed), "size": len(compressed)}],
        }
    )
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = _json(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": MEDIA_MANIFEST,
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {NAME_ANNOTATION: name, REF_ANNOTATION: tag},
                }
            ],
        }
    )
    files: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for dirname in ("blobs", "blobs/sha256"):
        info = _info(dirname, 0o755)
        info.type = tarfile.DIRTYPE
        files.append((info, None))
    blobs = sorted((_digest(b).split(":")[1], b) for b in (compressed, config, manifest))
    for path, data in [
        *((f"blobs/sha256/{hexd}", blob) for hexd, blob in blobs),
        ("index.json", index),
        ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
    ]:
        info = _info(path, 0o644)
        info.size = len(data)
        files.append((info, data))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(_tar_bytes(files))
    tmp.replace(out)
    return _digest(manifest)


def pause_image(pause_binary: Path, out: Path) -> str:
    """The sandbox image from the static pause binary; returns the manifest digest."""
    layer = layer_tar([Entry("pause", 0o755, data=pause_binary.read_bytes())])
    return write_oci_archive(out, PAUSE_IMAGE, layer, entrypoint=["/pause"])


def find_busybox() -> Path:
    """Debian's static busybox (package busybox-static)."""
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if candidate.is_file():
            head = candidate.read_bytes()[:4]
            if head == b"\x7fELF":
                return candidate
    raise ImageError("busybox not found: install Debian's busybox-static (scripts/setup does as root)")


def _is_static(binary: Path) -> bool:
    """No ELF program interpreter (PT_INTERP): the binary runs in an empty root filesystem."""
    done = subprocess.run(["readelf", "-l", str(binary)], capture_output=True, text=True)
    if done.returncode != 0:  # no binutils: trust the file's own description
        return b"/lib64/ld-linux" not in binary.read_bytes()[:4096]
    return "INTERP" not in done.stdout


def busybox_image(out: Path, busybox: Path | None = None) -> str:
    """``localhost/busybox:latest`` from a static busybox; returns the manifest digest."""
    busybox = busybox or find_busybox()
    if not _is_static(busybox):
        raise ImageError(f"{busybox} is dynamically linked; the image needs Debian's busybox-static")
    listing = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=False)
    applets = sorted({a for a in listing.stdout.split() if a and "/" not in a and a != "busybox"})
    if "sh" not in applets:
        raise ImageError(f"`{busybox} --list` names no sh applet: {listing.stderr.strip()}")
    entries = [Entry("bin/busybox", 0o755, data=busybox.read_bytes())]
    entries += [Entry(f"bin/{a}", target="busybox") for a in applets]
    entries += [
        Entry("etc/passwd", 0o644, data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
        Entry("etc/group", 0o644, data=b"root:x:0:\nnogroup:x:65534:\n"),
        Entry("tmp", 0o1777),
        *(Entry(d, 0o755) for d in ("proc", "sys", "dev", "root", "var")),
    ]
    return write_oci_archive(out, BUSYBOX_IMAGE, layer_tar(entries), cmd=["sh"])


def archive_image_name(archive: Path) -> str:
    """The image name an OCI archive carries (what ``ctr images import`` will call it)."""
    try:
        with tarfile.open(archive) as tar:
            member = tar.extractfile("index.json")
            if member is None:
                raise KeyError("index.json")
            index = json.load(member)
    except (OSError, tarfile.TarError, KeyError, ValueError) as exc:
        raise ImageError(f"{archive} is not an OCI image archive (no readable index.json: {exc})") from exc
    for manifest in index.get("manifests", []):
        annotations = manifest.get("annotations") or {}
        if annotations.get(NAME_ANNOTATION):
            return str(annotations[NAME_ANNOTATION])
        ref = annotations.get(REF_ANNOTATION, "")
        if "/" in ref:  # some tools put the full reference here
            return str(ref)
    raise ImageError(
        f"{archive}: index.json has no {NAME_ANNOTATION} annotation (nor a full reference in "
        f"{REF_ANNOTATION}), so the imported image would have no name"
    )
