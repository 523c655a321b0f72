"""The ``systemd`` input: journald's journal files, with Fluent Bit's options and record shape.

Reading: the journal file format is read by libsystemd itself through **cysystemd** (a
maintained Cython binding whose wheels bundle libsystemd, so nothing is compiled and no
``libsystemd-dev`` is needed). We did not write a journal parser: the format has compressed
objects, hash tables, entry arrays and online/archived states that libsystemd already handles,
including the rotation of files (journald renames the active file and starts a new one; the
reader's inotify descriptor reports it and the new file is merged into the same stream).
cysystemd was chosen over ``systemd-python`` (built from source against ``libsystemd-dev``,
last released 2023) and over pure-Python readers (unmaintained, no compression support).

What a record is, as Fluent Bit's ``in_systemd`` makes it: every field of the entry as a string
(a field that occurs several times becomes a list, in order), ``strip_underscores`` removes one
leading ``_`` and ``lowercase`` lowercases keys (keys that meet after that are merged into a list
too), at most ``max_fields`` values; the time is the entry's ``__REALTIME_TIMESTAMP``. ``tag``
with ``*``: the first ``*`` becomes the entry's ``_SYSTEMD_UNIT``, or ``unknown`` without one.
``systemd_filter FIELD=value`` (repeated) are journal matches joined by ``systemd_filter_type``
(``or``, the default, or ``and``).

Where it starts: the cursor stored in ``db`` (the entry at the cursor was delivered and is
skipped, unless it no longer exists, then the next one is not skipped); without one the head,
or the tail with ``read_from_tail`` (like Fluent Bit: seek to the tail, one entry back, then
forward to the end, at most 350 entries, since libsystemd may return the last entries of a file
again after a seek to the tail), or ``read_since_minutes_ago``.

Delivery: exactly as ``tail`` and ``kubernetes_events``: each batch carries an acknowledgement
token from an :class:`~kubetrail.core.acks.OrderedAcks` whose position is the cursor of the
batch's last entry, and the cursor is written to ``db`` (Fluent Bit's own table,
``in_systemd_cursor``, so a Fluent Bit database carries over) only when that batch and all
before it are delivered by every sink. Fluent Bit stores the cursor as soon as it has read; a
crash there loses what was in its memory, here it is read again. Every record also carries the
cursor as its identity, so sinks that write idempotently turn that replay into a no-op.

Bad journal files: libsystemd silently leaves out a file it cannot open (garbage, truncated
header). So every journal file that appears under ``path`` is also opened on its own once; one
that does not open is counted (``kubetrail_systemd_bad_files_total``) and logged by name, and
the rest of the journal is read as usual. An error while stepping through entries is counted
(``kubetrail_systemd_read_errors_total``) and reading resumes after the last entry read (Fluent
Bit seeks to the head, which sends everything again).

The blocking libsystemd calls run in a worker thread, one call at a time (an ``sd_journal`` may
be used from any thread, never from two at once), so the event loop keeps serving the rest of
the pipeline while a large journal is read.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

from kubetrail.core.acks import OrderedAcks
from kubetrail.core.component import ComponentContext, Emitter, Source
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.core.state import DB_OPTIONS, StateDB

UNKNOWN_UNIT = "unknown"
UNIT_FIELD = "_SYSTEMD_UNIT"
# Fluent Bit hands a chunk over once it passes about 1 MB, whatever max_entries says.
BATCH_BYTES = 1_024_000
# How often to look for new entries when the journal's inotify descriptor stays quiet (Fluent
# Bit's collector for pending entries runs every second too).
REFRESH = 1.0
# journald's field names: upper-case letters, digits and underscores, not starting with a digit.
_FIELD = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_SCHEMA = "CREATE TABLE IF NOT EXISTS in_systemd_cursor (cursor TEXT NOT NULL, updated INTEGER);"


def parse_filter(text: str) -> tuple[str, str]:
    """``FIELD=value`` -> (field, value); a clear error for anything journald would refuse."""
    field, sep, value = text.strip().partition("=")
    if not sep:
        raise ValueError(f"{text!r} is not FIELD=value (e.g. _SYSTEMD_UNIT=kubelet.service)")
    if not _FIELD.match(field):
        raise ValueError(f"{field!r} is not a journal field name (upper-case letters, digits and '_')")
    return field, value


def compose_tag(template: str, unit: str | None) -> str:
    """Fluent Bit's ``tag_compose``: the first ``*`` becomes the unit name (or ``unknown``)."""
    star = template.find("*")
    if star < 0:
        return template
    return template[:star] + (unit or UNKNOWN_UNIT) + template[star + 1 :]


def entry_body(
    data: dict[str, Any], strip_underscores: bool, lowercase: bool, max_fields: int
) -> tuple[dict[str, Any], int]:
    """An entry's fields as a record body (see the module docstring) and its size in bytes."""
    body: dict[str, Any] = {}
    count = 0
    size = 0
    for key, value in data.items():
        if count >= max_fields:
            break
        if strip_underscores and key.startswith("_"):
            key = key[1:]
        if lowercase:
            key = key.lower()
        values = value if isinstance(value, list) else [value]
        if count + len(values) > max_fields:
            values = values[: max_fields - count]
        count += len(values)
        for item in values:
            size += len(key) + len(item) + 2
            present = body.get(key)
            if present is None:
                body[key] = item
            elif isinstance(present, list):
                present.append(item)
            else:
                body[key] = [present, item]
    return body, size


class SystemdSource(Source):
    plugin_name = "systemd"
    description = "Reads the systemd journal (journald files); checkpoints the cursor once delivered"
    options = (
        Option("path", help="Journal directory (default: the local journal, /var/log/journal and /run/log/journal)"),
        Option("systemd_filter", multiple=True, help="FIELD=value journal match, e.g. _SYSTEMD_UNIT=kubelet.service"),
        Option(
            "systemd_filter_type",
            "choice",
            "or",
            choices=("or", "and"),
            help="How several systemd_filter combine",
        ),
        Option("read_from_tail", "bool", False, help="Without a stored cursor, start at the end of the journal"),
        Option(
            "read_since_minutes_ago",
            "int",
            0,
            help="Without a stored cursor, start this many minutes back (0: off)",
        ),
        Option("strip_underscores", "bool", False, help="Remove the leading '_' of field names (_PID -> PID)"),
        Option("lowercase", "bool", False, help="Lowercase field names"),
        Option("max_fields", "int", 8000, help="Most field values per record; the rest are left out"),
        Option("max_entries", "int", 5000, help="Most entries read per round (one batch or more)"),
        *DB_OPTIONS,
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.tag: str = config["tag"]
        self.path: str | None = config["path"]
        self.filters: list[tuple[str, str]] = []
        for text in config["systemd_filter"]:
            try:
                self.filters.append(parse_filter(text))
            except ValueError as exc:
                raise ConfigError(str(exc), key="systemd_filter") from None
        self.filter_and = config["systemd_filter_type"] == "and"
        self.read_from_tail: bool = config["read_from_tail"]
        self.since_minutes: int = config["read_since_minutes_ago"]
        self.strip: bool = config["strip_underscores"]
        self.lowercase: bool = config["lowercase"]
        self.max_fields: int = config["max_fields"]
        self.max_entries: int = config["max_entries"]
        for key in ("max_fields", "max_entries"):
            if config[key] < 1:
                raise ConfigError("must be at least 1", key=key)
        self.db_config = config
        self.db: StateDB | None = None
        self.reader: Any = None
        self.acks: OrderedAcks[str] = OrderedAcks(self._commit)
        self.committed: str | None = None  # the cursor in db: everything up to it is delivered
        self.last_read: str | None = None  # the cursor of the newest entry read
        self._carry: Any = None  # an entry read while positioning, to be sent first
        self._known_files: dict[str, tuple[int, int]] = {}  # path -> (inode, mtime_ns) probed
        self._stop = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._missing_logged = False
        self.bad_files = self.metrics.counter(
            "kubetrail_systemd_bad_files", "Journal files that libsystemd cannot open (skipped)"
        )
        self.read_errors = self.metrics.counter(
            "kubetrail_systemd_read_errors", "Errors reading journal entries (reading resumed after the last one)"
        )

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        self._wakeup.set()

    async def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    async def run(self, emitter: Emitter) -> None:
        if self.db is None:
            self.db = StateDB.from_options(self.db_config)
            if self.db is not None:
                self.db.conn.execute(_SCHEMA)
                row = self.db.execute("SELECT cursor FROM in_systemd_cursor LIMIT 1").fetchone()
                self.committed = row[0] if row else None
        # A restart after an error: batches of the previous run that never completed must not
        # hold the checkpoint back; reading resumes from the last delivered cursor.
        self.acks = OrderedAcks(self._commit)
        self._carry = None
        self.last_read = None
        while not await self._open():
            if await self._stopped_within(REFRESH * 5):
                return
        fd: int = self.reader.fd  # asking for it sets up libsystemd's inotify watches
        await self._check_files()
        while not self._stop.is_set():
            groups, more = await asyncio.to_thread(self._collect)
            for tag, records, size in groups:
                # The token is made here, on the event loop, where acknowledgements run.
                token = self.acks.token(records[-1].identity[0])  # type: ignore[index]
                await emitter.send(Batch(tag, records, token, size))
            if more:
                continue
            if await self._idle(fd):
                return
            changed = await asyncio.to_thread(self._process_events)
            if changed:
                await self._check_files()

    async def _idle(self, fd: int) -> bool:
        """Wait for the journal's inotify descriptor (or REFRESH); True when stopped meanwhile.

        The descriptor is watched only while idle: it stays readable until process_events()
        consumes its events, and a watch during a long read would wake the loop constantly.
        """
        loop = asyncio.get_running_loop()
        self._wakeup.clear()
        loop.add_reader(fd, self._wakeup.set)
        try:
            return await self._stopped_within(REFRESH, self._wakeup)
        finally:
            loop.remove_reader(fd)

    async def _stopped_within(self, seconds: float, event: asyncio.Event | None = None) -> bool:
        try:
            await asyncio.wait_for((event or self._stop).wait(), seconds)
        except TimeoutError:
            pass
        return self._stop.is_set()

    # -- positioning -----------------------------------------------------------------------

    async def _open(self) -> bool:
        """Open the journal and seek to where reading starts; False while ``path`` is missing."""
        if self.path is not None and not Path(self.path).is_dir():
            if not self._missing_logged:  # a node whose journal directory appears later
                self._missing_logged = True
                self.log.error("journal path is not a directory (yet); waiting for it", extra={"path": self.path})
            return False
        self.reader = await asyncio.to_thread(self._open_reader)
        self.log.info(
            "reading the journal",
            extra={"path": self.path or "(local journal)", "cursor": self.committed, "filters": len(self.filters)},
        )
        return True

    def _open_reader(self) -> Any:
        from cysystemd.reader import JournalOpenMode, JournalReader, Rule  # a C extension: loaded when used

        reader = JournalReader()
        if self.path is not None:
            reader.open_directory(self.path)
        else:
            reader.open(JournalOpenMode.LOCAL_ONLY)
        if self.filters:
            rule = Rule(*self.filters[0])
            for field, value in self.filters[1:]:
                rule = (rule & Rule(field, value)) if self.filter_and else (rule | Rule(field, value))
            reader.add_filter(rule)
        cursor = self.committed
        if cursor is not None:
            try:
                reader.seek_cursor(cursor.encode())
                entry = reader.next()
            except Exception as exc:  # a cursor from another machine or a garbled db row
                self.log.warning("stored cursor not usable; reading from the head", extra={"error": str(exc)})
                reader.seek_head()
                return reader
            if entry is not None and _cursor(entry) != cursor:
                self._carry = entry  # the stored entry is gone (vacuumed): this one was never sent
            self.last_read = cursor
        elif self.read_from_tail:
            # Anchor on the last entry so that next() returns only newer ones. As Fluent Bit
            # does, step forward to the end (at most 350 entries): libsystemd may hand back the
            # last entries of each file once more after seek_tail (systemd issue 9934).
            reader.seek_tail()
            reader.previous()
            for _ in range(350):
                if reader.next() is None:
                    break
        elif self.since_minutes > 0:
            reader.seek_realtime_usec(int((time.time() - self.since_minutes * 60) * 1_000_000))
        else:
            reader.seek_head()
        return reader

    # -- reading (worker thread) -------------------------------------------------------------

    def _collect(self) -> tuple[list[tuple[str, list[Record], int]], bool]:
        """Up to ``max_entries`` entries as batches (split where the tag changes or at ~1 MB);
        ``more`` is True when the round stopped at a limit rather than at the end."""
        groups: list[tuple[str, list[Record], int]] = []
        records: list[Record] = []
        size = 0
        tag: str | None = None
        dynamic = "*" in self.tag
        rows = 0
        more = False

        def flush() -> None:
            nonlocal records, size
            if records:
                assert tag is not None
                groups.append((tag, records, size))
            records, size = [], 0

        while rows < self.max_entries:
            entry = self._carry
            self._carry = None
            if entry is None:
                try:
                    entry = self.reader.next()
                except Exception as exc:
                    self._read_error(exc)
                    break
            if entry is None:
                break
            try:
                data = entry.data
                cursor = _cursor(entry)
                usec = entry.get_realtime_usec()
            except Exception as exc:
                self._read_error(exc)
                continue
            rows += 1
            self.last_read = cursor
            unit = data.get(UNIT_FIELD) if dynamic else None
            if isinstance(unit, list):
                unit = unit[0]
            entry_tag = compose_tag(self.tag, unit) if dynamic else self.tag
            if entry_tag != tag:
                flush()
                tag = entry_tag
            body, body_size = entry_body(data, self.strip, self.lowercase, self.max_fields)
            records.append(Record(entry_tag, usec * 1000, body, None, (cursor,)))
            size += body_size
            if size >= BATCH_BYTES:
                flush()
                more = True
                break
        else:
            more = True
        flush()
        return groups, more

    def _read_error(self, exc: Exception) -> None:
        """Count and log; continue after the last entry read (the file may have been removed)."""
        self.read_errors.inc()
        self.log.error("error reading the journal; resuming after the last entry read", extra={"error": str(exc)})
        try:
            if self.last_read is not None:
                self.reader.seek_cursor(self.last_read.encode())
                entry = self.reader.next()
                if entry is not None and _cursor(entry) != self.last_read:
                    self._carry = entry
            else:
                self.reader.seek_head()
        except Exception as again:
            self.log.error("cannot seek in the journal", extra={"error": str(again)})

    def _process_events(self) -> bool:
        """Let libsystemd take in inotify events; True when files were added or removed."""
        from cysystemd.reader import JournalEvent

        try:
            event = self.reader.process_events()
        except Exception as exc:
            self._read_error(exc)
            return True
        return bool(event == JournalEvent.INVALIDATE)

    # -- bad files ---------------------------------------------------------------------------

    async def _check_files(self) -> None:
        if self.path is None:
            return
        await asyncio.to_thread(self._probe_new_files)

    def _probe_new_files(self) -> None:
        from cysystemd.reader import JournalReader

        seen: dict[str, tuple[int, int]] = {}
        for path in _journal_files(Path(self.path or "")):
            try:
                st = os.stat(path)
            except OSError:
                continue
            key = (st.st_ino, st.st_mtime_ns)
            seen[path] = key
            known = self._known_files.get(path)
            if known is not None and known[0] == st.st_ino:
                continue  # probed already (a growing online file keeps its inode)
            probe = JournalReader()
            try:
                probe.open_files(path)
                probe.seek_head()
                probe.next()
            except Exception as exc:
                self.bad_files.inc()
                self.log.error(
                    "journal file cannot be read; skipped, the other files are read",
                    extra={"file": path, "error": str(exc)},
                )
        self._known_files = seen

    # -- checkpoint ------------------------------------------------------------------------

    def _commit(self, cursor: str) -> None:
        """Everything up to ``cursor`` is delivered by every sink: store it."""
        self.committed = cursor
        if self.db is None:
            return
        updated = self.db.execute("UPDATE in_systemd_cursor SET cursor=?, updated=?", (cursor, int(time.time())))
        if updated.rowcount == 0:
            self.db.execute("INSERT INTO in_systemd_cursor (cursor, updated) VALUES (?, ?)", (cursor, int(time.time())))


def _cursor(entry: Any) -> str:
    cursor = entry.cursor
    return cursor.decode() if isinstance(cursor, bytes) else str(cursor)


def _journal_files(root: Path) -> list[str]:
    """Journal files as ``sd_journal_open_directory`` finds them: in the directory and in its
    machine-id subdirectories (``/var/log/journal/<machine-id>/system.journal``)."""
    found: list[str] = []
    candidates: list[Path] = [root]
    try:
        candidates += [p for p in root.iterdir() if p.is_dir()]
    except OSError:
        return found
    for directory in candidates:
        try:
            for entry in directory.iterdir():
                if entry.name.endswith((".journal", ".journal~")) and entry.is_file():
                    found.append(str(entry))
        except OSError:
            continue
    return sorted(found)
