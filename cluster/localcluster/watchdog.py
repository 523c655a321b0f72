"""Stop a cluster when the Python process that started it dies without stopping it.

Why: the components run in their own sessions (see ``process``), so they survive their
parent.  That is right for ``local-cluster up``.  It is wrong for a test run that is SIGTERMed,
SIGKILLed or crashes: ``atexit`` and fixture teardown never run, and four daemons would be left
behind holding ports and memory.  :meth:`LocalCluster.up` therefore starts this small process
(in its own session, so a signal to the test run's process group does not reach it).  It
waits for its parent to go away, then stops the components listed in ``state.json``, but only
if that state still names the same owner pid.  A normal ``down()`` terminates the watchdog
first.

Usage: ``python -m localcluster.watchdog OWNER_PID DIR``
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _owner(directory: Path) -> int | None:
    try:
        owner = json.loads((directory / "state.json").read_text()).get("owner_pid")
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, int) else None


def main(argv: list[str]) -> int:
    owner, directory = int(argv[0]), Path(argv[1])
    while os.getppid() == owner:
        time.sleep(0.5)
    if _owner(directory) != owner:
        return 0  # the directory now belongs to someone else (or has no state): hands off
    from .cluster import LocalCluster

    LocalCluster.attach(directory).stop_orphaned()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
