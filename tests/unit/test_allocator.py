"""The glibc malloc settings applied at start-up (runtime/allocator.py)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from kubetrail.runtime.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD, tune_malloc

GLIBC = platform.libc_ver()[0] == "glibc"

# A child process allocates and frees 4 MiB blocks, as batches come and go, and reports the
# page faults that took: each fault is a page handed out afresh instead of reused.
CHILD = """
import resource, sys
from kubetrail.runtime.allocator import tune_malloc
ok = tune_malloc(int(sys.argv[1]), int(sys.argv[2]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(100):
    block = b"x" * (4 * 1024 * 1024 + i)  # written: every page is touched
    del block
print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mmap_threshold: int, trim_threshold: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(mmap_threshold), str(trim_threshold)],
        capture_output=True,
        text=True,
        check=True,
    )
    ok, count = out.stdout.split()
    assert ok == "True"
    return int(count)


@pytest.mark.skipif(not GLIBC, reason="mallopt settings are glibc's")
def test_the_settings_keep_big_blocks_for_reuse() -> None:
    pages = 100 * 4 * 1024 * 1024 // 4096
    tuned = faults(MMAP_THRESHOLD, TRIM_THRESHOLD)
    every_block_mapped = faults(128 * 1024, 128 * 1024)  # glibc's static defaults
    assert every_block_mapped > pages * 0.9  # each block's pages faulted in anew
    assert tuned < pages * 0.1  # the same pages reused


@pytest.mark.skipif(GLIBC, reason="only for other C libraries")
def test_other_c_libraries_are_left_alone() -> None:  # pragma: no cover - CI runs on glibc
    assert tune_malloc() is False
