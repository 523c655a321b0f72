"""Record identities from ``tail``: ``(file uid, offset of the record's first line)``.

What idempotent sinks need (es ``_id``, OTLP ``log.record.uid``): the same line read twice (after
a crash, before its checkpoint moved) gets the same identity; a different line never gets the
identity of another, even at the same path and offset after a rotation or a truncation.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubetrail.core.config import load_config
from kubetrail.core.record import Batch
from kubetrail.core.state import StateDB
from kubetrail.runtime.pipeline import Pipeline
from kubetrail.runtime.plugins import COMMON_INPUT_OPTIONS
from kubetrail.sources.tail import _SCHEMA, TailSource
from tests.unit.helpers import build, tail_file_config


class IdentitySink:
    """Keeps every delivered record's identity and body."""

    def __init__(self) -> None:
        self.delivered: list[tuple[tuple[Any, ...] | None, dict[str, Any]]] = []

    async def start(self) -> None:
        return None

    async def write(self, batch: Batch) -> None:
        self.delivered.extend((r.identity, r.body) for r in batch.records)

    async def close(self) -> None:
        return None


def config(tmp_path: Path, log: Path, input_extra: str = "", filters: str = "") -> Path:
    return tail_file_config(tmp_path, log, input_extra=input_extra, filters=filters)


async def run(conf: Path) -> list[tuple[tuple[Any, ...] | None, dict[str, Any]]]:
    pipeline = Pipeline(load_config(conf))
    sink = IdentitySink()
    pipeline.runners[0].sink = sink  # type: ignore[assignment]
    assert await pipeline.run() == 0
    return sink.delivered


def line_starts(data: bytes) -> list[int]:
    """Offsets of the non-empty lines of ``data``."""
    starts, position = [], 0
    for line in data.split(b"\n")[:-1]:
        if line.strip(b"\r"):
            starts.append(position)
        position += len(line) + 1
    return starts


@pytest.mark.parametrize(
    ("parser", "data"),
    [
        # the lazy JSON path (the block is validated in one call, records built on demand)
        ("parser json", b"".join(orjson.dumps({"n": i, "time": "2026-11-28T10:00:00Z"}) + b"\n" for i in range(50))),
        # JSON lines the lazy path cannot take (no time): one record per line
        ("parser json", b"".join(orjson.dumps({"n": i}) + b"\n" for i in range(50))),
        # no parser, with blank lines and CRLF: offsets still count every byte of the file
        ("", b"a 1\r\nb 2\r\n\r\nc 3\r\n\n\nd 4\r\n"),
    ],
    ids=["json-lazy", "json", "plain-crlf-blank"],
)
async def test_each_record_is_identified_by_its_file_and_line_offset(tmp_path: Path, parser: str, data: bytes) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(data)
    delivered = await run(config(tmp_path, log, parser))
    identities = [identity for identity, _ in delivered]
    assert all(identity is not None for identity in identities)
    uids = {identity[0] for identity in identities}  # type: ignore[index]
    assert len(uids) == 1 and len(next(iter(uids))) == 16
    assert [identity[1] for identity in identities] == line_starts(data)  # type: ignore[index]


async def test_container_messages_are_identified_by_their_first_piece(tmp_path: Path) -> None:
    data = (
        b"2026-11-28T10:00:00.000000001Z stdout F one\n"
        b"2026-11-28T10:00:00.000000002Z stdout P two-a \n"
        b"2026-11-28T10:00:00.000000003Z stderr F err\n"
        b"2026-11-28T10:00:00.000000004Z stdout F two-b\n"
        b"not a cri line\n"
    )
    log = tmp_path / "0.log"
    log.write_bytes(data)
    delivered = await run(config(tmp_path, log, "multiline.parser cri\n    offset_key off\n    path_key p"))
    starts = line_starts(data)
    by_text = {body.get("log"): identity[1] for identity, body in delivered}  # type: ignore[index]
    assert by_text == {"one": starts[0], "err": starts[2], "two-a two-b": starts[1], "not a cri line": starts[4]}
    # offset_key and path_key are added to joined messages too (the offset of the first piece)
    assert all(body["off"] == identity[1] and body["p"] == str(log) for identity, body in delivered)  # type: ignore[index]


async def test_lines_read_again_before_their_checkpoint_moved_keep_their_identities(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"".join(orjson.dumps({"n": i}) + b"\n" for i in range(100)))
    conf = config(tmp_path, log, "parser json")
    first = await run(conf)
    # As after kill -9 between delivery and checkpoint: the stored offset is behind.
    with sqlite3.connect(tmp_path / "tail.db") as db:
        db.execute("UPDATE in_tail_files SET offset=0")
    again = await run(conf)
    assert [identity for identity, _ in again] == [identity for identity, _ in first]
    assert len({identity for identity, _ in first}) == 100


async def test_a_new_file_at_the_same_path_and_offsets_gets_another_uid(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    same = b"".join(orjson.dumps({"n": i}) + b"\n" for i in range(10))
    log.write_bytes(same)
    conf = config(tmp_path, log, "parser json")
    first = await run(conf)
    log.rename(tmp_path / "app.log.1")
    log.write_bytes(same)  # same bytes, same offsets: a new file all the same
    second = await run(conf)
    assert len(second) == 10
    assert {identity[0] for identity, _ in first}.isdisjoint({identity[0] for identity, _ in second})  # type: ignore[index]


async def test_a_db_from_before_identities_is_upgraded_in_place(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    lines = [orjson.dumps({"n": i}) + b"\n" for i in range(20)]
    log.write_bytes(b"".join(lines))
    st = log.stat()
    with sqlite3.connect(tmp_path / "tail.db") as db:  # the schema without the uid column
        db.execute(
            "CREATE TABLE in_tail_files (id INTEGER PRIMARY KEY, name TEXT NOT NULL, offset INTEGER NOT NULL,"
            " inode INTEGER NOT NULL, dev INTEGER NOT NULL, fp_len INTEGER NOT NULL, fingerprint BLOB NOT NULL,"
            " created INTEGER NOT NULL, rotated INTEGER NOT NULL DEFAULT 0)"
        )
        head = log.read_bytes()[:256]
        db.execute(
            "INSERT INTO in_tail_files (name, offset, inode, dev, fp_len, fingerprint, created) VALUES (?,?,?,?,?,?,0)",
            (str(log), len(b"".join(lines[:10])), st.st_ino, st.st_dev, len(head), hashlib.sha256(head).digest()),
        )
    delivered = await run(config(tmp_path, log, "parser json"))
    assert [body["n"] for _, body in delivered] == list(range(10, 20))  # resumed at the old checkpoint
    with sqlite3.connect(tmp_path / "tail.db") as db:
        (uid,) = db.execute("SELECT uid FROM in_tail_files").fetchone()
    assert {identity[0] for identity, _ in delivered} == {uid}  # type: ignore[index]


async def test_audit_lines_take_the_audit_identity(tmp_path: Path) -> None:
    """Through the kubernetes_audit filter a tailed audit event is ``(auditID, stage)``, the same
    identity the webhook gives it, so a sink stores it once whichever way it came."""
    events = [
        {
            "kind": "Event",
            "apiVersion": "audit.k8s.io/v1",
            "level": "Metadata",
            "auditID": f"id-{i}",
            "stage": stage,
            "verb": "get",
            "requestURI": "/api",
            "stageTimestamp": "2026-11-28T10:00:00.000001Z",
        }
        for i in range(3)
        for stage in ("RequestReceived", "ResponseComplete")
    ]
    log = tmp_path / "audit.log"
    log.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    filters = "[FILTER]\n    name kubernetes_audit\n    match *\n    dedupe off\n"
    delivered = await run(config(tmp_path, log, "parser k8s_audit", filters))
    assert [identity for identity, _ in delivered] == [(e["auditID"], e["stage"]) for e in events]


def test_a_new_checkpoint_row_never_inherits_state_left_under_a_reused_row_id(tmp_path: Path) -> None:
    """SQLite reuses the id of a deleted last row. Pending multiline pieces or a cut-line mark
    left under that id would make a new file skip its first lines, so a new row starts clean and
    deleting a row takes its side rows with it."""
    log = tmp_path / "c.log"
    log.write_bytes(b"x\n")
    source = build(TailSource, common=COMMON_INPUT_OPTIONS, path=str(log), db=str(tmp_path / "tail.db"))
    source.db = StateDB(tmp_path / "tail.db")
    source.db.conn.executescript(_SCHEMA)
    st = log.stat()
    first = source._insert_row(str(log), 2, st, 2, b"fp", "uid1")
    source.db.execute("INSERT INTO in_tail_multiline VALUES (?, 100, '{\"stdout\": 50}')", (first,))
    source.db.execute("INSERT INTO in_tail_cut_lines VALUES (?, 70)", (first,))
    source.db.execute("DELETE FROM in_tail_files WHERE id=?", (first,))  # as an older version left it
    second = source._insert_row(str(log), 0, st, 2, b"fp", "uid2")
    assert second == first  # the id came back
    side = "SELECT (SELECT count(*) FROM in_tail_multiline) + (SELECT count(*) FROM in_tail_cut_lines)"
    assert source.db.execute(side).fetchone()[0] == 0
    source.db.execute("INSERT INTO in_tail_multiline VALUES (?, 100, '{}')", (second,))
    source.db.execute("INSERT INTO in_tail_cut_lines VALUES (?, 70)", (second,))
    source._delete_row(second)
    assert source.db.execute(side).fetchone()[0] == 0
    assert source.db.execute("SELECT count(*) FROM in_tail_files").fetchone()[0] == 0
    source.db.close()
