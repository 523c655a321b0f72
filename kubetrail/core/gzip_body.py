"""Inflating a gzip request body without trusting it: the receivers' shared bound.

The ``http`` input and the ``kubernetes_audit`` webhook take ``Content-Encoding: gzip`` bodies
from the network and must not let a small body expand without end (a "gzip bomb": 50 KiB that
inflate to 50 MiB). :func:`gunzip_bounded` inflates at most ``limit + 1`` bytes (zlib's
``max_length``), so the work and the memory stop at the limit whatever the body says, and
tells the three ways a body can be bad apart, since the receivers answer them differently
(413 for too large, 400 for the others). It lives in ``core`` so that any input can use it
without importing another plugin's module.
"""

from __future__ import annotations

import zlib


class GzipBodyError(ValueError):
    """A gzip body that cannot be taken; ``too_large`` when it inflates past the limit."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def gunzip_bounded(data: bytes, limit: int) -> bytes:
    """The inflated ``data`` (one gzip member), at most ``limit`` bytes; else :class:`GzipBodyError`."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # 16+: the gzip header and trailer
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise GzipBodyError(f"bad gzip body: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise GzipBodyError(f"decompressed body over buffer_max_size ({limit} bytes)", too_large=True)
    if not inflater.eof:
        raise GzipBodyError("truncated gzip body")
    return out
