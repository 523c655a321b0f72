"""The tail's search for a file's rotated backups (``_backups_of``) from one directory listing,
against the three globs it replaces, on directories of random names (globs' magic characters,
hidden names, empty stems and extensions, gzip suffixes)."""

from __future__ import annotations

import glob
import os
import random
from pathlib import Path

import pytest

from kubetrail.sources.tail import DirListings, _backups_of

PARTS = ["audit", "audit-", "a[b]", "0", ".log", ".gz", "-", "x", "*", "?", ".", "log", "20240101-120000", ".hidden"]


def by_globs(path: str) -> set[str]:
    directory, base = os.path.split(path)
    stem, ext = os.path.splitext(base)
    d, s, e = glob.escape(directory), glob.escape(stem), glob.escape(ext)
    found = set(glob.glob(os.path.join(d, s + "-*" + e)))
    found |= set(glob.glob(os.path.join(d, s + "-*" + e + ".gz")))
    found |= set(glob.glob(os.path.join(d, glob.escape(base) + ".*")))
    found.discard(path)
    return found


@pytest.mark.parametrize("seed", range(20))
def test_one_listing_finds_what_the_globs_find(tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    names = {"".join(rnd.choice(PARTS) for _ in range(rnd.randint(1, 4))) for _ in range(30)} - {".", ".."}
    for name in names:
        (tmp_path / name).touch()
    listings = DirListings()
    matched = 0
    for name in sorted(names):
        path = str(tmp_path / name)
        expected = by_globs(path)
        assert set(_backups_of(path, listings)) == expected, name
        assert set(_backups_of(path)) == expected
        matched += len(expected)
    assert matched > 0  # the names do have backups among them


def test_the_backups_come_oldest_first_and_a_listing_is_reused(tmp_path: Path) -> None:
    for name in ["audit.log", "audit-2024-01-02T00-00-00.000.log", "audit-2024-01-01T00-00-00.000.log.gz", "other"]:
        (tmp_path / name).touch()
    listings = DirListings()
    found = _backups_of(str(tmp_path / "audit.log"), listings)
    assert [os.path.basename(p) for p in found] == [
        "audit-2024-01-01T00-00-00.000.log.gz",
        "audit-2024-01-02T00-00-00.000.log",
    ]
    (tmp_path / "audit-2024-01-03T00-00-00.000.log").touch()  # after the listing: not seen by it
    assert len(_backups_of(str(tmp_path / "audit.log"), listings)) == 2
    assert len(_backups_of(str(tmp_path / "audit.log"))) == 3
    assert _backups_of(str(tmp_path / "missing-dir" / "x.log")) == []
