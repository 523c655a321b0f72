"""Reading files that a running process is still writing, as the tests poll them.

A writer can be in the middle of a line when a test reads: the last line without its newline
is not written yet, so it is left for the next read. Every line before it is read as it is, so
a broken or blank line there still fails the caller's parsing.

A writer killed with SIGKILL mid-write leaves a fragment: the file output ends it with a newline
when it starts again (``FileSink._end_torn_line``), so it stands alone as one line that is not
JSON. ``written_json_lines(path, kills=N)`` allows one such line per kill, and no more.
"""

from __future__ import annotations

from collections.abc import Callable
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


def written_json_lines(path: Path, kills: int = 0, parse: Callable[[bytes], Any] = orjson.loads) -> list[Any]:
    """The complete lines of ``path``, each parsed (as JSON unless ``parse`` says otherwise).
    ``kills``: how many times the writer was killed with kill -9 and started again; that many
    lines may be the fragments of writes it cut short (skipped). One more line that does not
    parse fails."""
    parsed: list[Any] = []
    torn: list[bytes] = []
    for line in written_lines(path):
        try:
            parsed.append(parse(line))
        except ValueError:  # orjson.JSONDecodeError is one
            torn.append(line)
    assert len(torn) <= kills, f"{len(torn)} lines of {path} do not parse after {kills} kills: {torn[:3]!r}"
    return parsed
