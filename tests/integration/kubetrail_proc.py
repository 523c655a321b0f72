"""Running kubetrail as a real process in integration tests, and reading what it delivered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests import timing
from tests.files import written_json_lines

RUNNING: list[KubetrailProcess] = []


def log_tails(lines: int = 60) -> str:
    """The end of every running test process's log, for the report of a failed test."""
    parts = []
    for proc in RUNNING:
        tail = proc.log().splitlines()[-lines:]
        parts.append(f"--- {proc.log_path} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts)


def kill_leftovers() -> None:
    """Called after every test (see conftest): no kubetrail process outlives its test."""
    while RUNNING:
        proc = RUNNING.pop()
        if proc.alive():
            proc.kill9()


class KubetrailProcess:
    """``kubetrail run -c CONFIG`` with a file output; records are read back by identity."""

    def __init__(self, workdir: Path, config_text: str, name: str = "kubetrail") -> None:
        self.workdir = workdir
        self.name = name
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / f"{name}.conf"
        self.config.write_text(config_text)
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> KubetrailProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(self.config)],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        RUNNING.append(self)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def file_output(path: Path, file: str = "out.jsonl") -> str:
    """A ``[OUTPUT]`` section: every record as a JSON line into ``path/file``."""
    return f"""
[OUTPUT]
    name   file
    match  *
    path   {path}
    file   {file}
    format plain
    mkdir  on
"""


def read_records(*paths: Path, kills: int = 0) -> list[dict[str, Any]]:
    """The records of file outputs (format plain); ``kills``: how many writers of each file were
    killed with kill -9 and restarted, each of which may leave one fragment line."""
    out: list[dict[str, Any]] = []
    for path in paths:
        out.extend(written_json_lines(path, kills))
    return out


def identities(records: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    return Counter((r["metadata"]["uid"], r["metadata"]["resourceVersion"]) for r in records)


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    """Until ``check()``, ``timeout`` stretched on a loaded machine (:func:`tests.timing.wait_for`)."""
    timing.wait_for(check, timeout, what, interval)
