"""Skipping a test whose component this machine lacks, and failing it instead where all must be there.

A developer's machine may lack Java, Chromium or a built node: those tests skip with the reason,
so the rest of the suite still runs. CI builds and installs every component ahead
(``scripts/test``), so there a missing one is a broken build or a server that did not start,
and a skip would hide it: all 18 of ``test_kafka``'s tests once went that way when its cluster
did not start, and the run passed. ``.ci/run`` sets ``KUBETRAIL_REQUIRE_ALL=1``; then
:func:`unavailable` fails the test with the same reason. The narrower switches kept from before
(``KUBETRAIL_REQUIRE_NODE``, ``KUBETRAIL_REQUIRE_NATIVE``, ``KUBETRAIL_REQUIRE_SERVERS``) do the
same for one kind of component.

Skips that say a test does not apply to this environment (root reads any file; a tmpfs needs
root) are not "unavailable" and stay plain skips.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def required(kind: str = "") -> bool:
    """Whether a missing component fails its tests: ``KUBETRAIL_REQUIRE_ALL=1``, or
    ``KUBETRAIL_REQUIRE_<KIND>=1`` for ``kind``."""
    if os.environ.get("KUBETRAIL_REQUIRE_ALL") == "1":
        return True
    return bool(kind) and os.environ.get(f"KUBETRAIL_REQUIRE_{kind.upper()}") == "1"


def unavailable(reason: str, *, kind: str = "", allow_module_level: bool = False) -> NoReturn:
    """Skip the test for ``reason`` (a component is missing here), or fail it where
    :func:`required` says every component must be there."""
    if required(kind):
        switch = f"KUBETRAIL_REQUIRE_{kind.upper()}" if kind and not required() else "KUBETRAIL_REQUIRE_ALL"
        pytest.fail(f"{reason} ({switch}=1: a missing component fails, not skips)", pytrace=False)
    pytest.skip(reason, allow_module_level=allow_module_level)
