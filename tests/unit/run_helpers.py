"""Running a classic config through ``kubetrail run`` and reading what its file output wrote.

Shared by the Fluent Bit filter and parser tests: the output uses the file plugin's default
``out_file`` format (``TAG: [SECONDS.NANOS, {json}]``), so the tests see tag, time and record.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from tests.timing import scaled
from tests.unit.helpers import write


def run_config(config: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``kubetrail run -c config`` as a real process, until its finite inputs are done (within
    ``timeout`` as on an idle machine, :func:`tests.timing.scaled`)."""
    return subprocess.run(
        [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=scaled(timeout),
    )


def tail_to_out_file(tmp_path: Path, lines: list[str], filters: str, parsers: str = "", tag: str = "app") -> Path:
    """A config tailing a file of ``lines`` (JSON parser) through ``filters`` into out_file format."""
    log = write(tmp_path / "in.log", "".join(line + "\n" for line in lines))
    if parsers:
        write(tmp_path / "parsers.conf", parsers)
    service = "    parsers_file parsers.conf\n" if parsers else ""
    return write(
        tmp_path / "p.conf",
        f"""
[SERVICE]
    grace 2
    log_level warn
{service}
[INPUT]
    name tail
    path {log}
    tag {tag}
    parser json
    read_from_head on
    exit_on_eof on
    db {tmp_path / "tail.db"}
{filters}
[OUTPUT]
    name file
    match *
    path {tmp_path / "out"}
    file out.txt
    mkdir on
""",
    )


def out_file_records(path: Path) -> list[tuple[str, int, dict[str, Any]]]:
    """(tag, time in ns, record) of every line an out_file-format file output wrote."""
    records = []
    for line in path.read_text().splitlines():
        tag, _, rest = line.partition(": [")
        stamp, _, body = rest.partition(", ")
        seconds, _, nanos = stamp.partition(".")
        records.append((tag, int(seconds) * 1_000_000_000 + int(nanos), orjson.loads(body[:-1])))
    return records
