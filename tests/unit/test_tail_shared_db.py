"""Tails sharing one ``db`` (each with an alias: its scope in the file), run for real twice
through the pipeline into file outputs: every line once, under its own tail's tag, resumed from
its own offset. Before scopes, the second run read the other tail's file as a rotated file of
its own (the line under the wrong tag as well as under the right one)."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path

from kubetrail.core.config import load_config
from kubetrail.runtime.pipeline import Pipeline
from tests.files import written_json_lines
from tests.unit.helpers import write

# The unique identity before scopes: what a db written by an older kubetrail has.
OLD_SCHEMA = """
CREATE TABLE in_tail_files (id INTEGER PRIMARY KEY, name TEXT NOT NULL, offset INTEGER NOT NULL,
    inode INTEGER NOT NULL, dev INTEGER NOT NULL, fp_len INTEGER NOT NULL, fingerprint BLOB NOT NULL,
    created INTEGER NOT NULL, rotated INTEGER NOT NULL DEFAULT 0, uid TEXT);
CREATE UNIQUE INDEX in_tail_files_identity ON in_tail_files (dev, inode);
"""


def tail(alias: str | None, path: Path, db: Path) -> str:
    lines = ["[INPUT]", "    name tail", f"    path {path}", f"    tag {alias or 'a'}", f"    db {db}"]
    lines += ["    read_from_head on", "    exit_on_eof on", "    path_key file"]
    return "\n".join(lines + ([f"    alias {alias}"] if alias else [])) + "\n"


def outputs(out: Path) -> str:
    return "".join(
        f"[OUTPUT]\n    name file\n    match {tag}\n    path {out}\n    file {tag}.jsonl\n    format plain\n"
        "    mkdir on\n"
        for tag in ("a", "b")
    )


async def run(tmp_path: Path, inputs: str) -> None:
    config = write(tmp_path / "p.conf", f"[SERVICE]\n    grace 2\n{inputs}{outputs(tmp_path / 'out')}")
    pipeline = Pipeline(load_config(config))
    assert await asyncio.wait_for(pipeline.run(), 30) == 0


def append(path: Path, *lines: str) -> None:
    with path.open("a") as handle:
        handle.write("".join(f"{line}\n" for line in lines))


def delivered(tmp_path: Path, tag: str) -> list[tuple[str, str]]:
    """(line, file it came from) of every record the output of ``tag`` wrote."""
    path = tmp_path / "out" / f"{tag}.jsonl"
    return [(r["log"], Path(r["file"]).name) for r in written_json_lines(path)] if path.exists() else []


def rows(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return sorted((scope, Path(name).name) for scope, name in conn.execute("SELECT scope, name FROM in_tail_files"))


async def test_two_tails_in_one_db_each_line_once_under_its_own_tag(tmp_path: Path) -> None:
    a, b, db = tmp_path / "a.log", tmp_path / "b.log", tmp_path / "state" / "tail.db"
    write(a, "a-1\na-2\na-3\n")
    write(b, "b-1\nb-2\n")
    inputs = tail("a", a, db) + tail("b", b, db)
    await run(tmp_path, inputs)
    append(a, "a-4", "a-5")
    append(b, "b-3")
    await run(tmp_path, inputs)  # each resumes from its own offset, and only its own files
    assert delivered(tmp_path, "a") == [(f"a-{n}", "a.log") for n in range(1, 6)]
    assert delivered(tmp_path, "b") == [(f"b-{n}", "b.log") for n in range(1, 4)]
    assert rows(db) == [("a", "a.log"), ("b", "b.log")]


async def test_two_tails_following_one_file_keep_an_offset_each(tmp_path: Path) -> None:
    log, db = tmp_path / "x.log", tmp_path / "tail.db"
    write(log, "x-1\nx-2\n")
    inputs = tail("a", log, db) + tail("b", log, db)
    await run(tmp_path, inputs)
    append(log, "x-3")
    await run(tmp_path, inputs)
    expected = [(f"x-{n}", "x.log") for n in range(1, 4)]
    assert delivered(tmp_path, "a") == expected and delivered(tmp_path, "b") == expected
    assert rows(db) == [("a", "x.log"), ("b", "x.log")]


async def test_a_db_from_before_scopes_keeps_its_offsets_when_a_second_tail_joins(tmp_path: Path) -> None:
    a, b, db = tmp_path / "a.log", tmp_path / "b.log", tmp_path / "tail.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(OLD_SCHEMA)
    write(a, "a-1\na-2\n")
    write(b, "b-1\n")
    await run(tmp_path, tail(None, a, db))  # one tail, no alias: rows of scope ''
    assert rows(db) == [("", "a.log")]
    append(a, "a-3")
    # Now two tails share the db, each with an alias: "a" takes over the row of its file.
    await run(tmp_path, tail("a", a, db) + tail("b", b, db))
    assert delivered(tmp_path, "a") == [("a-1", "a.log"), ("a-2", "a.log"), ("a-3", "a.log")]
    assert delivered(tmp_path, "b") == [("b-1", "b.log")]
    assert rows(db) == [("a", "a.log"), ("b", "b.log")]


async def test_a_rotated_file_s_row_from_before_scopes_goes_to_the_tail_it_is_a_backup_of(tmp_path: Path) -> None:
    """A row written before scopes for a rotated file read half-way (lumberjack's name, as the
    API server's audit log rotates): the tail whose file it is a backup of finishes it; the other
    tail, first in the config, leaves it alone."""
    a, b, db = tmp_path / "audit.log", tmp_path / "b.log", tmp_path / "tail.db"
    backup = write(tmp_path / "audit-2026-12-05T06-00-00.000.log", "old-1\nold-2\nold-3\n")
    write(a, "new-1\n")
    write(b, "b-1\n")
    st = backup.stat()
    with sqlite3.connect(db) as conn:
        conn.executescript(OLD_SCHEMA)
        conn.execute(
            "INSERT INTO in_tail_files (name, offset, inode, dev, fp_len, fingerprint, created, uid)"
            " VALUES (?, ?, ?, ?, ?, ?, 0, 'u1')",
            (str(backup), 6, st.st_ino, st.st_dev, 6, hashlib.sha256(b"old-1\n").digest()),
        )
    await run(tmp_path, tail("b", b, db) + tail("a", a, db))
    assert delivered(tmp_path, "a") == [
        ("old-2", backup.name),
        ("old-3", backup.name),
        ("new-1", "audit.log"),
    ]
    assert delivered(tmp_path, "b") == [("b-1", "b.log")]
