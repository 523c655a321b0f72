"""Reading files that a running process is still writing, as the tests poll them.

A writer can be in the middle of a line when a test reads: the last line without its newline
is not written yet, so it is left for the next read. Every line before it is read as it is, so
a broken or blank line there still fails the caller's parsing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson


def written_lines(path: Path) -> list[bytes]:
    """The complete lines of ``path`` (none while it does not exist)."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    lines.pop()  # b"" after the last newline, or a line still being written
    return lines


def written_json_lines(path: Path) -> list[Any]:
    """The complete lines of ``path``, each parsed as JSON."""
    return [orjson.loads(line) for line in written_lines(path)]
