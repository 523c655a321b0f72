"""The ``null`` and ``counter`` outputs, run as kubetrail itself (a real process) on a tailed file.

``counter`` must print Fluent Bit's line per flush (``<time>,<n> (total = <sum>)``) with counts
that add up to the lines read; ``null`` must take everything, so the tail checkpoints the whole
file (a second run reads nothing again).
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.unit.helpers import write

COUNTER_LINE = re.compile(r"^(\d+\.\d{6}),(\d+) \(total = (\d+)\)$")


def run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def pipeline(tmp_path: Path, log: Path, output: str) -> Path:
    return write(
        tmp_path / "p.conf",
        f"""
[SERVICE]
    grace 2
[INPUT]
    name tail
    path {log}
    tag app
    read_from_head on
    exit_on_eof on
    batch_size 4k
    buffer_chunk_size 4k
    db {tmp_path / "tail.db"}
[OUTPUT]
    name {output}
    match *
""",
    )


def test_counter_prints_fluent_bit_lines_that_add_up(tmp_path: Path) -> None:
    log = write(tmp_path / "app.log", "".join(f'{{"n": {i}}}\n' for i in range(1000)))
    before = time.time()
    result = run(pipeline(tmp_path, log, "counter"))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line]
    assert lines, result.stderr[-2000:]
    total = 0
    for line in lines:
        match = COUNTER_LINE.match(line)
        assert match, f"not Fluent Bit's counter format: {line!r}"
        stamp, count, running = float(match.group(1)), int(match.group(2)), int(match.group(3))
        assert before - 1 <= stamp <= time.time() + 1
        assert count > 0
        total += count
        assert running == total  # the running total since start, as Fluent Bit prints it
    assert total == 1000
    assert len(lines) >= 2  # 4 KiB batches of a 12 KiB file: several flushes, each its own line


def test_null_takes_everything_and_the_checkpoint_moves(tmp_path: Path) -> None:
    log = write(tmp_path / "app.log", "".join(f'{{"n": {i}}}\n' for i in range(500)))
    config = pipeline(tmp_path, log, "null")
    result = run(config)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == ""
    with sqlite3.connect(tmp_path / "tail.db") as db:
        offsets = [row[0] for row in db.execute("select offset from in_tail_files")]
    assert offsets == [log.stat().st_size]  # delivered (to nowhere): the whole file is checkpointed
