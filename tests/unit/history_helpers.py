"""What the history tests share: a store written by the real ``sqlite`` output, ``kubetrail
history``/``who``/``search`` through click's runner, and ``kubetrail ui`` as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result

from kubetrail.cli.main import main
from kubetrail.core.record import Batch, Record
from kubetrail.sinks import sqlite as sqlite_module
from kubetrail.sinks.sqlite import (
    BODY,
    BUCKET_BITS,
    BUCKET_KEY,
    IDENT_INDEX_NAME,
    OBJECT_INDEX,
    OLD_IDENT_INDEX_NAME,
    SCHEMA,
    SEGMENT_BITS,
    UID_INDEX,
    UID_INDEX_NAME,
    SqliteSink,
    ident_key,
    identity_bucket,
)
from tests.unit.helpers import build

# Schemas 1 and 2 had this object index (led by the name), which schema 3 replaced: for stores
# written by an older kubetrail.
V2_OBJECT_INDEX = (
    "CREATE INDEX IF NOT EXISTS records_object ON records (name, resource, namespace, time_ns) WHERE name IS NOT NULL"
)
# Schemas 1 to 4 had this user index, which schema 5's user_bodies table replaced.
V4_USER_INDEX = "CREATE INDEX IF NOT EXISTS records_user ON records (user, time_ns) WHERE user IS NOT NULL;"
# Schemas 1 to 6 had this uid index, which schema 7 replaced by one led by the segment of ids.
V6_UID_INDEX = "CREATE INDEX IF NOT EXISTS records_uid ON records (uid) WHERE uid IS NOT NULL"
V2_SCHEMA = SCHEMA.replace(OBJECT_INDEX, V2_OBJECT_INDEX).replace(UID_INDEX, V6_UID_INDEX) + V4_USER_INDEX
assert V2_OBJECT_INDEX in V2_SCHEMA
# Schemas 3 to 5 had this object index (led by the time bucket), which schema 6 replaced.
V5_OBJECT_INDEX = (
    f"CREATE INDEX IF NOT EXISTS records_object_bucket ON records ({BUCKET_KEY}, name, resource, namespace, time_ns)"
    " WHERE name IS NOT NULL"
)

# Schemas 4 to 6 had this identity index (led by the time bucket), which schema 7 replaced.
V6_IDENT_INDEX = (
    f"CREATE UNIQUE INDEX IF NOT EXISTS {OLD_IDENT_INDEX_NAME} ON records ({ident_key(BUCKET_BITS)}, ident)"
)


def to_schema_6(path: Path) -> None:
    """A store of this schema put back as kubetrail wrote it with schema 6: the identity index
    led by the time bucket, the Python path's rows' ``ibucket`` that bucket, the uid index on the
    uid alone (the same rows, the same ids)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.create_function("old_bucket", 2, lambda kind, body: identity_bucket(kind, body, bits=BUCKET_BITS))
    conn.executescript(
        f"BEGIN; DROP INDEX IF EXISTS {IDENT_INDEX_NAME};"
        f" UPDATE records AS r SET ibucket = old_bucket(r.kind, {BODY}) WHERE r.ibucket IS NOT NULL;"
        f" {V6_IDENT_INDEX}; DROP INDEX IF EXISTS {UID_INDEX_NAME}; {V6_UID_INDEX}; PRAGMA user_version=6; COMMIT;"
    )
    conn.close()


def to_schema_5(path: Path) -> None:
    """A store of this schema put back as kubetrail wrote it with schema 5: schema 6's, and the
    object index led by the time bucket instead of the segment of ids (the same rows, the same
    ids)."""
    to_schema_6(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(
        f"BEGIN; DROP INDEX IF EXISTS records_object_segment; {V5_OBJECT_INDEX}; PRAGMA user_version=5; COMMIT;"
    )
    conn.close()


@contextlib.contextmanager
def segments_of(bits: int) -> Iterator[None]:
    """New stores made meanwhile get an object index of segments of 2^bits ids (instead of
    SEGMENT_BITS': a test's few thousand records then span many segments)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite_module, "SCHEMA", SCHEMA.replace(f"(id >> {SEGMENT_BITS},", f"(id >> {bits},"))
        assert sqlite_module.SCHEMA != SCHEMA
        yield


def to_schema_4(path: Path) -> None:
    """A store of this schema (or 5) put back as kubetrail wrote it with schema 4: every body in
    ``records``, the user index, no ``user_bodies``, the object index led by the time bucket (the
    same rows, the same ids)."""
    to_schema_5(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(
        "BEGIN; UPDATE records SET body = (SELECT b.body FROM user_bodies b WHERE b.user = records.user"
        " AND b.time_ns = records.time_ns AND b.id = records.id) WHERE user IS NOT NULL;"
        "DROP VIEW whole_records; DROP TRIGGER user_bodies_retention; DROP TABLE user_bodies;"
        f"{V4_USER_INDEX} PRAGMA user_version=4; COMMIT;"
    )
    conn.close()


def copy_store(source: Path, target: Path) -> Path:
    """A consistent copy of a store (SQLite's backup: the WAL's pages included)."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    src.close()
    dst.close()
    return target


def fill(path: Path, *batches: list[Record]) -> None:
    """Each list is one write (one commit), in order: as batches reach the output."""
    sink = build(SqliteSink, path=str(path))

    async def run() -> None:
        await sink.start()
        for records in batches:
            await sink.write(Batch("t", records))
        await sink.close()

    asyncio.run(run())


def cli(store: Path, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--store", str(store)])


def entries(store: Path, *args: str) -> list[dict[str, Any]]:
    """The timeline entries ``--json`` prints (the command must succeed)."""
    result = cli(store, *args, "--json")
    assert result.exit_code == 0, result.output
    return [orjson.loads(line) for line in result.stdout.splitlines()]


@contextlib.contextmanager
def ui_server(store: Path) -> Iterator[str]:
    """``kubetrail ui`` on ``store`` (a free port): its URL. Stopped by SIGTERM after the block,
    which it must answer with exit code 0 (checked only when the block itself succeeded)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetrail.cli.main", "ui", "--store", str(store), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = proc.stdout.readline()
        match = re.search(r"(http://\S+)", line)
        assert match, f"no URL printed: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        yield match.group(1)
    finally:
        proc.terminate()
        code = proc.wait(timeout=10)
    assert code == 0, f"kubetrail ui exited {code}"
