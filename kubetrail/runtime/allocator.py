"""glibc malloc settings for a process that moves megabyte-sized blocks.

kubetrail's batches are blocks of one to a few megabytes (a tailed file's read, a filter's output
block, a sink's request body), made and freed many times a second. glibc serves each such
allocation with a fresh ``mmap`` once it is over its *dynamic* mmap threshold, and gives memory
back to the system as soon as the top of the heap has more than the trim threshold free; either
way each new block's pages are faulted in again, and on the tail -> kubernetes_audit -> file
path that was five times more page faults and a fifth of the wall time (docs/benchmarks.md).
A fixed mmap threshold of 32 MiB and a trim threshold of 128 MiB keep those blocks on the heap,
where the next batch reuses them; the price is up to that much freed memory kept for reuse
rather than returned at once. ``[SERVICE] malloc.tune off`` leaves glibc's defaults.

Only for glibc (other C libraries have no ``mallopt`` of this kind); elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 128 * 1024 * 1024

log = logging.getLogger("kubetrail.runtime.allocator")


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Apply the settings above; False where the C library is not glibc or refused them."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error (e.g. a value out of range).
    ok = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1)
    if not ok:
        log.warning("glibc refused the malloc settings; its defaults stay", extra={"mmap": mmap_threshold})
    return ok
