"""The ``systemd`` input on real journal files.

The files are written by Debian's ``systemd-journal-remote`` (installed by ``scripts/setup``)
from journal export format, so they are the files journald writes, and no journald runs. What
is checked: the record shape Fluent Bit's ``in_systemd`` gives (fields as strings, repeated
fields as lists, ``strip_underscores``, ``lowercase``, ``max_fields``, realtime timestamps), the
``tag`` with ``*``, ``systemd_filter`` with ``or`` and ``and``, ``read_from_tail``,
``max_entries``, a new journal file appearing while reading (rotation), unreadable files (counted,
logged, the rest read), and a real kubetrail process killed with SIGKILL and restarted from
``db``: no entry lost, repeats only within the in-flight window.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kubetrail.core.errors import ConfigError
from kubetrail.core.record import Record
from kubetrail.sources.systemd import compose_tag, entry_body, parse_filter
from tests.timing import scaled
from tests.unit.helpers import file_output, write
from tests.unit.source_helpers import running, wait_until

JOURNAL_REMOTE = next(
    (p for p in ("/lib/systemd/systemd-journal-remote", "/usr/lib/systemd/systemd-journal-remote") if Path(p).exists()),
    None,
)
try:
    import cysystemd.reader  # noqa: F401

    HAVE_READER = True
except ImportError:  # pragma: no cover - the dependency is pinned
    HAVE_READER = False

needs_journal = pytest.mark.skipif(
    JOURNAL_REMOTE is None or not HAVE_READER,
    reason="systemd-journal-remote not installed: run scripts/setup (apt-get install systemd-journal-remote)",
)

BOOT_ID = "0123456789abcdef0123456789abcdef"
BASE_USEC = 1_780_000_000_000_000  # 2026-05-28


def export_entry(fields: list[tuple[str, str | bytes]], usec: int, monotonic: int) -> bytes:
    """One entry in journal export format; bytes values use the binary field encoding."""
    out = [f"__REALTIME_TIMESTAMP={usec}\n__MONOTONIC_TIMESTAMP={monotonic}\n_BOOT_ID={BOOT_ID}\n".encode()]
    for key, value in fields:
        if isinstance(value, bytes):
            out.append(key.encode() + b"\n" + struct.pack("<Q", len(value)) + value + b"\n")
        else:
            out.append(f"{key}={value}\n".encode())
    out.append(b"\n")
    return b"".join(out)


def make_journal(path: Path, entries: list[list[tuple[str, str | bytes]]], start: int = 0) -> Path:
    """A real journal file at ``path`` with ``entries``; entry i has time BASE_USEC + start + i."""
    assert JOURNAL_REMOTE is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    export = b"".join(export_entry(f, BASE_USEC + start + i, 1000 + start + i) for i, f in enumerate(entries))
    tmp = path.parent / (".tmp-" + path.name)
    subprocess.run([JOURNAL_REMOTE, "-o", str(tmp), "-"], input=export, check=True, capture_output=True)
    tmp.rename(path)  # appears whole, as journald's rotation makes a file appear
    return path


def numbered(count: int, start: int = 0, unit: str = "kubelet.service") -> list[list[tuple[str, str | bytes]]]:
    return [
        [("MESSAGE", f"line {n}"), ("_SYSTEMD_UNIT", unit), ("PRIORITY", "6"), ("_PID", "42")]
        for n in range(start, start + count)
    ]


def systemd_input(path: Path, extra: str = "", tag: str = "host.*") -> str:
    return f"    name systemd\n    path {path}\n    tag {tag}\n{extra}"


def messages(records: list[Record]) -> list[str]:
    return [r.body["MESSAGE"] for r in records]


# --- pure logic -------------------------------------------------------------------------------


def test_filter_tag_and_body_rules() -> None:
    assert parse_filter("_SYSTEMD_UNIT=kubelet.service") == ("_SYSTEMD_UNIT", "kubelet.service")
    assert parse_filter("MESSAGE=a=b") == ("MESSAGE", "a=b")
    for bad in ("kubelet.service", "_systemd_unit=x", "1X=y"):
        with pytest.raises(ValueError):
            parse_filter(bad)
    assert compose_tag("host.*", "kubelet.service") == "host.kubelet.service"
    assert compose_tag("a.*.b.*", None) == "a.unknown.b.*"  # only the first star, as Fluent Bit
    assert compose_tag("plain", "x.service") == "plain"
    data = {"_PID": "1", "PID": "2", "MESSAGE": "m", "TAG": ["a", "b"]}
    assert entry_body(data, False, False, 8000)[0] == data
    # stripped keys that meet become a list, as Fluent Bit's kvlist merge does
    assert entry_body(data, True, True, 8000)[0] == {"pid": ["1", "2"], "message": "m", "tag": ["a", "b"]}
    assert entry_body(data, False, False, 4)[0] == {"_PID": "1", "PID": "2", "MESSAGE": "m", "TAG": "a"}


def test_bad_filter_is_a_configuration_error(tmp_path: Path) -> None:
    from kubetrail.core.config import load_config
    from kubetrail.runtime.pipeline import Pipeline
    from tests.unit.source_helpers import input_config

    conf = input_config(tmp_path, systemd_input(tmp_path, "    systemd_filter kubelet.service"))
    with pytest.raises(ConfigError, match=r"systemd_filter.*FIELD=value"):
        Pipeline(load_config(conf))
    conf = input_config(tmp_path, systemd_input(tmp_path, "    systemd_filter_type xor"))
    with pytest.raises(ConfigError, match="systemd_filter_type"):
        Pipeline(load_config(conf))


# --- reading real journal files ---------------------------------------------------------------


@needs_journal
async def test_records_have_fluent_bit_shape_and_unit_tags(tmp_path: Path) -> None:
    entries = [
        [("MESSAGE", "started"), ("_SYSTEMD_UNIT", "kubelet.service"), ("CODE", "a"), ("CODE", "b")],
        [("MESSAGE", "no unit"), ("BLOB", b"bin\nary")],
        [("MESSAGE", "runtime"), ("_SYSTEMD_UNIT", "containerd.service")],
    ]
    make_journal(tmp_path / "j" / "system.journal", entries)
    async with running(tmp_path, systemd_input(tmp_path / "j")) as run:
        records = await run.wait_records(3)
    assert [r.tag for r in records] == ["host.kubelet.service", "host.unknown", "host.containerd.service"]
    first = records[0].body
    assert first["MESSAGE"] == "started" and first["CODE"] == ["a", "b"] and first["_BOOT_ID"] == BOOT_ID
    assert records[1].body["BLOB"] == "bin\nary"
    assert [r.time_ns for r in records] == [(BASE_USEC + i) * 1000 for i in range(3)]
    assert all(r.identity and r.identity[0].startswith("s=") for r in records)  # the journal cursor
    # batches break where the tag changes, as Fluent Bit's chunks do
    assert [b.tag for b in run.sink.batches] == ["host.kubelet.service", "host.unknown", "host.containerd.service"]


@needs_journal
async def test_strip_underscores_lowercase_and_max_fields(tmp_path: Path) -> None:
    make_journal(tmp_path / "j" / "system.journal", numbered(1))
    extra = "    strip_underscores on\n    lowercase on\n    max_fields 3"
    async with running(tmp_path, systemd_input(tmp_path / "j", extra)) as run:
        (record,) = await run.wait_records(1)
    assert len(record.body) == 3
    assert all(k == k.lower() and not k.startswith("_") for k in record.body)


@needs_journal
@pytest.mark.parametrize(
    ("filters", "kind", "expected"),
    [
        (["_SYSTEMD_UNIT=kubelet.service"], "or", ["k0", "k1"]),
        (["_SYSTEMD_UNIT=kubelet.service", "_SYSTEMD_UNIT=containerd.service"], "or", ["k0", "c0", "k1"]),
        (["_SYSTEMD_UNIT=kubelet.service", "PRIORITY=3"], "or", ["k0", "c0", "k1"]),
        (["_SYSTEMD_UNIT=kubelet.service", "PRIORITY=3"], "and", ["k1"]),
    ],
)
async def test_filters(tmp_path: Path, filters: list[str], kind: str, expected: list[str]) -> None:
    entries: list[list[tuple[str, str | bytes]]] = [
        [("MESSAGE", "k0"), ("_SYSTEMD_UNIT", "kubelet.service"), ("PRIORITY", "6")],
        [("MESSAGE", "c0"), ("_SYSTEMD_UNIT", "containerd.service"), ("PRIORITY", "3")],
        [("MESSAGE", "s0"), ("_SYSTEMD_UNIT", "ssh.service"), ("PRIORITY", "6")],
        [("MESSAGE", "k1"), ("_SYSTEMD_UNIT", "kubelet.service"), ("PRIORITY", "3")],
    ]
    make_journal(tmp_path / "j" / "system.journal", entries)
    extra = "".join(f"    systemd_filter {f}\n" for f in filters) + f"    systemd_filter_type {kind}"
    async with running(tmp_path, systemd_input(tmp_path / "j", extra)) as run:
        await run.wait_records(len(expected))
        await _quiet(run, 0.5)
        assert messages(run.sink.records) == expected


async def _quiet(run: object, seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)  # nothing more may arrive meanwhile


@needs_journal
async def test_read_from_tail_sends_only_newer_entries(tmp_path: Path) -> None:
    make_journal(tmp_path / "j" / "old.journal", numbered(5))
    async with running(tmp_path, systemd_input(tmp_path / "j", "    read_from_tail on")) as run:
        await wait_until(lambda: run.source.reader is not None, 10, "the journal to open")
        await _quiet(run, 1.5)
        assert run.sink.records == []
        make_journal(tmp_path / "j" / "new.journal", numbered(3, start=100), start=100)
        records = await run.wait_records(3)
    assert messages(records) == ["line 100", "line 101", "line 102"]


@needs_journal
async def test_max_entries_splits_rounds_and_db_keeps_the_delivered_cursor(tmp_path: Path) -> None:
    make_journal(tmp_path / "j" / "system.journal", numbered(25))
    db = tmp_path / "systemd.db"
    extra = f"    max_entries 10\n    db {db}"
    async with running(tmp_path, systemd_input(tmp_path / "j", extra)) as run:
        records = await run.wait_records(25)
        assert [len(b) for b in run.sink.batches] == [10, 10, 5]
        await wait_until(lambda: run.source.committed == records[-1].identity[0], 5, "the checkpoint")  # type: ignore[index]
    (cursor,) = sqlite3.connect(db).execute("SELECT cursor FROM in_systemd_cursor").fetchone()
    assert cursor == records[-1].identity[0]  # type: ignore[index]
    # a restart resumes after it: only the entries of a new file come
    make_journal(tmp_path / "j" / "more.journal", numbered(2, start=25), start=25)
    async with running(tmp_path, systemd_input(tmp_path / "j", extra)) as run:
        again = await run.wait_records(2)
        await _quiet(run, 1.0)
        assert messages(run.sink.records) == ["line 25", "line 26"]
    assert len(again) == 2


@needs_journal
async def test_rotation_new_file_appears_while_reading(tmp_path: Path) -> None:
    journal = tmp_path / "j" / BOOT_ID
    make_journal(journal / "system.journal", numbered(200))
    async with running(tmp_path, systemd_input(tmp_path / "j", "    max_entries 50")) as run:
        await run.wait_records(50)
        # journald's rotation: the active file is renamed to an archived name, a new one starts
        (journal / "system.journal").rename(journal / "system@0000-0001.journal")
        make_journal(journal / "system.journal", numbered(150, start=200), start=200)
        records = await run.wait_records(350)
        await _quiet(run, 1.0)
    assert Counter(messages(run.sink.records)) == Counter(f"line {n}" for n in range(350))
    assert len(records) == 350


@needs_journal
async def test_unreadable_journal_files_are_counted_and_the_rest_is_read(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    good = make_journal(directory / "good.journal", numbered(20))
    write(directory / "garbage.journal", "").write_bytes(b"LPKSHHRH" + bytes(range(256)) * 20)
    (directory / "truncated.journal").write_bytes(good.read_bytes()[:3000])
    async with running(tmp_path, systemd_input(directory)) as run:
        await run.wait_records(20)
        await wait_until(lambda: run.metric("kubetrail_systemd_bad_files_total") == 2, 5, "2 bad files")
        # a bad file appearing later is found too, and reading goes on
        (directory / "late.journal").write_bytes(b"\0" * 4096)
        make_journal(directory / "later.journal", numbered(5, start=20), start=20)
        await run.wait_records(25)
        await wait_until(lambda: run.metric("kubetrail_systemd_bad_files_total") == 3, 5, "3 bad files")
    assert sorted(messages(run.sink.records)) == sorted(f"line {n}" for n in range(25))


@needs_journal
async def test_missing_path_waits_for_the_directory(tmp_path: Path) -> None:
    async with running(tmp_path, systemd_input(tmp_path / "later")) as run:
        await _quiet(run, 0.3)
        assert not run.task.done()  # the pipeline serves on; the journal may appear later
        make_journal(tmp_path / "later" / "system.journal", numbered(2))
        await run.wait_records(2, timeout=15)


# --- kill -9 ------------------------------------------------------------------------------------


def _delivered(out: Path) -> Counter[int]:
    seen: Counter[int] = Counter()
    if out.exists():
        for line in out.read_bytes().splitlines():
            if line.strip():
                try:
                    seen[int(json.loads(line)["MESSAGE"].split()[1])] += 1
                except ValueError:
                    pass  # the last line of a process killed mid-write
    return seen


@needs_journal
@pytest.mark.slow
def test_kill9_then_restart_from_db_loses_nothing(tmp_path: Path) -> None:
    total = 60_000
    journal = tmp_path / "j"
    for part in range(6):  # six files, as journald's rotation leaves them
        make_journal(journal / f"system@{part}.journal", numbered(10_000, start=part * 10_000), start=part * 10_000)
    conf = write(
        tmp_path / "k.conf",
        f"""
[SERVICE]
    grace 5
[INPUT]
    name systemd
    path {journal}
    tag node.*
    max_entries 1000
    db {tmp_path / "cursor.db"}
{file_output(tmp_path / "out")}""",
    )
    out = tmp_path / "out" / "out.jsonl"
    log = (tmp_path / "kubetrail.log").open("ab")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(conf)], stdout=log, stderr=log
        )

    proc = start()
    deadline = time.monotonic() + scaled(60)
    while time.monotonic() < deadline and sum(_delivered(out).values()) < total // 5:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    before = sum(_delivered(out).values())
    assert 0 < before < total, "kill -9 should land mid-journal"
    restarted = start()
    try:
        deadline = time.monotonic() + scaled(120)
        while time.monotonic() < deadline and len(_delivered(out)) < total:
            time.sleep(0.1)
        time.sleep(1.0)  # nothing beyond the journal may follow
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert restarted.wait(30) == 0
    seen = _delivered(out)
    missing = [n for n in range(total) if n not in seen]
    assert not missing, f"{len(missing)} entries lost, first {missing[:5]}"
    assert set(seen) == set(range(total))
    # At-least-once: only entries written out but not yet checkpointed may come twice (the
    # in-flight window, a few rounds of max_entries).
    repeated = sum(c - 1 for c in seen.values())
    assert repeated <= 8 * 1000, repeated
    shutil.rmtree(journal)


@needs_journal
async def test_cursor_of_a_vacuumed_entry_resumes_at_the_next_without_skipping_it(tmp_path: Path) -> None:
    db = tmp_path / "systemd.db"
    extra = f"    db {db}"
    make_journal(tmp_path / "j" / "old.journal", numbered(10))
    async with running(tmp_path, systemd_input(tmp_path / "j", extra)) as run:
        records = await run.wait_records(10)
        await wait_until(lambda: run.source.committed == records[-1].identity[0], 5, "the checkpoint")  # type: ignore[index]
    # journald vacuums the old file while kubetrail is down; newer entries are in another file
    (tmp_path / "j" / "old.journal").unlink()
    make_journal(tmp_path / "j" / "new.journal", numbered(5, start=10), start=10)
    async with running(tmp_path, systemd_input(tmp_path / "j", extra)) as run:
        await run.wait_records(5)
        await _quiet(run, 0.5)
        assert messages(run.sink.records) == [f"line {n}" for n in range(10, 15)]


@needs_journal
async def test_read_since_minutes_ago(tmp_path: Path) -> None:
    now_usec = int(time.time() * 1_000_000)
    entries = b"".join(
        export_entry([("MESSAGE", f"{minutes} min ago")], now_usec - minutes * 60_000_000, 1000 + i)
        for i, minutes in enumerate((30, 10, 2, 1))
    )
    (tmp_path / "j").mkdir()
    assert JOURNAL_REMOTE is not None
    out = tmp_path / "j" / "system.journal"
    subprocess.run([JOURNAL_REMOTE, "-o", str(out), "-"], input=entries, check=True, capture_output=True)
    async with running(tmp_path, systemd_input(tmp_path / "j", "    read_since_minutes_ago 5")) as run:
        await run.wait_records(2)
        await _quiet(run, 0.5)
        assert messages(run.sink.records) == ["2 min ago", "1 min ago"]


class _FailingOnce:
    """The real reader, except that its ``at``-th next() raises (as libsystemd does for a file
    removed or damaged under it)."""

    def __init__(self, reader: Any, at: int) -> None:
        self._reader = reader
        self._calls = 0
        self._at = at

    def next(self) -> Any:
        self._calls += 1
        if self._calls == self._at:
            raise SystemError("Bad message", "EBADMSG")
        return self._reader.next()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)


@needs_journal
async def test_read_error_is_counted_and_reading_resumes_after_the_last_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetrail.sources.systemd import SystemdSource

    real_open = SystemdSource._open_reader
    monkeypatch.setattr(SystemdSource, "_open_reader", lambda self: _FailingOnce(real_open(self), at=8))
    make_journal(tmp_path / "j" / "system.journal", numbered(20))
    async with running(tmp_path, systemd_input(tmp_path / "j")) as run:
        await run.wait_records(20)
        await _quiet(run, 1.2)
        assert run.metric("kubetrail_systemd_read_errors_total") == 1
        assert messages(run.sink.records) == [f"line {n}" for n in range(20)]  # none lost, none twice
