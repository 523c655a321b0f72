"""The node's images, written by ``localcluster.images`` without any image tool (no cluster needed).

containerd itself checks them when the node imports them (``test_node.py``); these tests pin
what the node relies on before that: reproducible digests, a well-formed OCI layout whose
digests and sizes match the blobs, the busybox root filesystem, and a clear error for an
archive that carries no image name.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from localcluster import images
from tests import required


def _layout(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def _blob(files: dict[str, bytes], digest: str) -> bytes:
    data = files[f"blobs/sha256/{digest.split(':')[1]}"]
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    return data


def test_busybox_image_is_reproducible_and_well_formed(tmp_path: Path) -> None:
    try:
        busybox = images.find_busybox()
    except images.ImageError as exc:
        required.unavailable(str(exc), kind="node")
    first = images.busybox_image(tmp_path / "a.tar", busybox)
    second = images.busybox_image(tmp_path / "b.tar", busybox)
    assert first == second  # same inputs, same manifest digest
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()

    files = _layout(tmp_path / "a.tar")
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    (desc,) = index["manifests"]
    assert desc["annotations"]["io.containerd.image.name"] == images.BUSYBOX_IMAGE == "localhost/busybox:latest"
    assert desc["digest"] == first
    manifest = json.loads(_blob(files, desc["digest"]))
    assert len(_blob(files, desc["digest"])) == desc["size"]
    config_blob = _blob(files, manifest["config"]["digest"])
    (layer_desc,) = manifest["layers"]
    layer_gz = _blob(files, layer_desc["digest"])
    assert len(layer_gz) == layer_desc["size"] and layer_desc["mediaType"].endswith("tar+gzip")
    config = json.loads(config_blob)
    layer = gzip.decompress(layer_gz)
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    assert config["config"]["Cmd"] == ["sh"]

    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/busybox"].isfile() and members["bin/busybox"].mode == 0o755
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "busybox"
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
    assert all(m.uid == 0 and m.gid == 0 and m.mtime == 0 for m in members.values())
    names = list(members)
    assert names.index("bin") < names.index("bin/busybox")  # parents first
    assert b"root:x:0:0" in files_text(layer, "etc/passwd")


def files_text(layer: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        member = tar.extractfile(name)
        assert member is not None
        return member.read()


def test_pause_image_entrypoint(tmp_path: Path) -> None:
    binary = tmp_path / "pause"
    binary.write_bytes(b"\x7fELF-not-really")
    digest = images.pause_image(binary, tmp_path / "pause.tar")
    files = _layout(tmp_path / "pause.tar")
    manifest = json.loads(_blob(files, digest))
    config = json.loads(_blob(files, manifest["config"]["digest"]))
    assert config["config"]["Entrypoint"] == ["/pause"]
    assert images.archive_image_name(tmp_path / "pause.tar") == images.PAUSE_IMAGE


def test_archive_without_a_name_is_refused_with_the_reason(tmp_path: Path) -> None:
    unnamed = tmp_path / "unnamed.tar"
    with tarfile.open(unnamed, "w") as tar:
        data = json.dumps({"schemaVersion": 2, "manifests": [{"digest": "sha256:00", "annotations": {}}]}).encode()
        info = tarfile.TarInfo("index.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(images.ImageError, match=r"no io\.containerd\.image\.name annotation"):
        images.archive_image_name(unnamed)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar at all")
    with pytest.raises(images.ImageError, match="not an OCI image archive"):
        images.archive_image_name(garbage)
