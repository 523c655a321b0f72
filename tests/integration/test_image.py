"""The container image that ``scripts/image build`` makes (an OCI archive, no engine needed).

Built once per run (cached across runs by its inputs), then unpacked and run with chroot as the
image's own non-root user: the launcher, the pinned dependencies, the native extension and the
default config all work from the image alone, and the archive is what ``ctr images import``
reads. Needs root (debootstrap, chroot); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests import required

ROOT = Path(__file__).resolve().parents[2]
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="building and running the image needs root")


@pytest.fixture(scope="module")
def image_archive() -> Path:
    result = subprocess.run([str(ROOT / "scripts" / "image"), "build"], capture_output=True, text=True, timeout=1200)
    if result.returncode != 0 and "debootstrap" in result.stderr and shutil.which("debootstrap") is None:
        required.unavailable(f"no debootstrap: {result.stderr[-500:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def rootfs(image_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    layout = tmp_path_factory.mktemp("oci")
    with tarfile.open(image_archive) as tar:
        tar.extractall(layout, filter="tar")
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":", 1)[1]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest).read_text())
    root = layout / "rootfs"
    root.mkdir()
    for layer in manifest["layers"]:
        with tarfile.open(layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]) as tar:
            tar.extractall(root, filter="fully_trusted")  # owners and modes as in the image
    return root


def _config(image_archive: Path, tmp_path: Path) -> dict[str, object]:
    with tarfile.open(image_archive) as tar:
        tar.extractall(tmp_path, filter="tar")
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["io.containerd.image.name"].startswith("localhost/kubetrail:")
    manifest = json.loads((tmp_path / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]).read_text())
    return json.loads((tmp_path / "blobs/sha256" / manifest["config"]["digest"].split(":")[1]).read_text())


def test_image_config_is_non_root_with_the_kubetrail_entrypoint(image_archive: Path, tmp_path: Path) -> None:
    config = _config(image_archive, tmp_path)
    inner = config["config"]
    assert isinstance(inner, dict)
    assert inner["User"] == "65532:65532"
    assert inner["Entrypoint"] == ["/usr/local/bin/kubetrail"]
    assert inner["Labels"]["org.opencontainers.image.version"]
    size = sum(f.stat().st_size for f in image_archive.parent.glob("*.oci.tar") if f == image_archive)
    assert size < 100 * 1024 * 1024  # compressed; the README gives the uncompressed size


def _in_image(rootfs: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROOT, "--userspec=65532:65532", str(rootfs), "/usr/local/bin/kubetrail", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"},
    )


def test_kubetrail_runs_from_the_image_as_its_user(rootfs: Path) -> None:
    version = _in_image(rootfs, "version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("kubetrail ")
    check = _in_image(rootfs, "check", "-c", "/etc/kubetrail/kubetrail.conf")
    assert check.returncode == 0, check.stderr
    plugins = _in_image(rootfs, "plugins", "kubernetes_audit")
    assert "kubernetes_audit" in plugins.stdout
    # The native scan is in the image, not only the pure-Python fallback.
    native = subprocess.run(
        [
            "chroot",
            "--userspec=65532:65532",
            str(rootfs),
            "/usr/bin/python3",
            "-I",
            "-c",
            "import sys; sys.path.insert(0, '/opt/kubetrail/lib'); import kubetrail_native; print('native ok')",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert native.stdout.strip() == "native ok", native.stderr


def test_image_has_no_compiler_and_no_pip(rootfs: Path) -> None:
    for tool in ("gcc", "cc", "cargo", "rustc", "pip", "pip3"):
        assert not (rootfs / "usr" / "bin" / tool).exists(), tool


def test_the_image_pipeline_runs_a_real_config(rootfs: Path) -> None:
    """A tail -> file pipeline inside the image, as its user, with a read-only root filesystem's
    layout: only /tmp is written."""
    work = rootfs / "tmp" / "work"
    work.mkdir(parents=True, exist_ok=True)
    (work / "in.log").write_text("".join(f'{{"n": {i}}}\n' for i in range(1000)))
    (work / "k.conf").write_text(
        "[INPUT]\n    name tail\n    path /tmp/work/in.log\n    read_from_head on\n    exit_on_eof on\n"
        "    parser json\n[OUTPUT]\n    name file\n    match *\n    path /tmp/work/out\n    file out.txt\n"
        "    mkdir on\n    format plain\n"
    )
    os.chown(work, 65532, 65532)
    result = _in_image(rootfs, "run", "-c", "/tmp/work/k.conf")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (work / "out" / "out.txt").read_text().splitlines()
    assert sorted(json.loads(line)["n"] for line in lines) == list(range(1000))
