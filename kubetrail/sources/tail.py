"""The ``tail`` input: follows files, parses lines, and resumes from ``db`` after a restart.

How it keeps "nothing lost, nothing repeated":

* a file is known by device + inode, checked against a fingerprint of its first bytes
  (inode numbers are reused once a file is deleted);
* each batch covers whole lines ``[start, end)`` of one file and carries an acknowledgement
  token; the offset stored in ``db`` moves to ``end`` only when every sink has delivered the
  batch and every earlier one (see :class:`~kubetrail.core.acks.OrderedAcks`);
* a partial last line is not consumed until its newline arrives (or, with ``exit_on_eof``, the
  file ends), so a restart never splits a line;
* every record carries the identity ``(file uid, offset of its first line)``. The uid is random,
  made when the file is first seen and kept with its checkpoint in ``db``, so it survives
  restarts and renames but not a new file on a reused inode or a truncation (new content at old
  offsets must not look like a replay). Idempotent sinks use it as the document id (es
  ``_id``), which turns the lines read again after a crash into no-ops instead of duplicates.

Rotation:

* **rename** (kubelet's ``0.log`` -> ``0.log.<time>``, lumberjack's ``audit-<time>.log``): the
  old handle is read to its end and kept for ``rotate_wait``, then the new file is read from 0;
  backups rotated (or gzipped) while stopped are found by inode + fingerprint. A path found
  empty at the rotation (the new file not created yet: containerd reopens the log a moment
  after the kubelet's rename) is looked at again at every rotation check until a file is there,
  for up to ``refresh_interval``: the glob's next expansion comes that late, and a file that
  filled and rotated in the meantime would otherwise be read by no one (its lines lost);
* **symlinks** (``/var/log/containers/*.log`` -> ``/var/log/pods/...``): ``stat`` follows the
  link, so the identity is the target's and a retargeted link is a rotation; backups are looked
  for next to the target too;
* **copytruncate**: seen as the size below the offset, or the first bytes changed under a file
  that grew past the offset again (checked after every read, so new content is never read at an
  old offset). The unread rest of the old content is read from the copy next to the file, which
  has the same bytes at the same offsets, so checkpoint, pending pieces and in-flight
  acknowledgements carry over as they are;
* **inotify** (``inotify_watcher``) only shortens the wait; the loop never depends on an event
  (see :mod:`.tail_watch`).

Several tails in one ``db`` (Fluent Bit users share one by accident; Fluent Bit then mixes
them, fluent/fluent-bit#8928): every row of ``in_tail_files`` carries the ``scope`` of the input
that wrote it, its ``alias`` (``''`` without one), and a tail reads, resumes and deletes only
rows of its own scope; the file identity is unique per scope, so two tails may even follow the
same file, each with its own offset. That costs one indexed column. Only the alias can be the
scope: ``tail.0`` changes when an input is added above it, and a scope by ``path`` would change
with every edit of the globs, and either way the rows would then be taken for another input's
(its files read from the wrong offset, under the wrong tag). So sharing needs an alias on each
tail, checked at load time with the rest of the rule (:func:`kubetrail.core.state.check_state_files`).
Rows written before scopes existed (scope ``''``) are taken over by the first aliased tail that
follows their file (its path matches, or it is a rotated backup of a file it follows), so a db
keeps its offsets when a tail gets an alias or a second tail joins it. Renaming an alias
starts that tail afresh, as a new ``db`` would (the old rows stay, unused).

With no ``parser``, a block of whole lines goes on as one :class:`~kubetrail.core.block.TextBlock`
(each line the record ``{key: line}``, made only when someone asks), unless the line-by-line
path would drop a line of it (an empty line); see :mod:`kubetrail.core.block`.

Container runtime formats (``multiline.parser cri, docker``) are joined per stream by
:mod:`kubetrail.parsers.multiline`, whose docstring explains how checkpoints stay exact while a
message is half read.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import glob
import gzip
import hashlib
import json
import os
import re
import secrets
import stat
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, cast

from kubetrail.core.acks import AckToken, OrderedAcks
from kubetrail.core.block import ReadyBlock, TextBlock
from kubetrail.core.component import ComponentContext, Emitter, Source
from kubetrail.core.config.compat import no_effect
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.core.state import DB_OPTIONS, StateDB
from kubetrail.core.tags import expand_tag
from kubetrail.core.values import split_list
from kubetrail.parsers.base import Parser, wall_ns
from kubetrail.parsers.multiline import FORMATS, ContainerLogJoiner, JoinStats
from kubetrail.parsers.multiline_rules import BUILTIN_RULES, RegexLogJoiner, RuleSet, builtin, from_section
from kubetrail.sources.tail_watch import FileWatcher

try:  # optional (built from native/): many times faster than ``b"\n\n" in block``
    from kubetrail_native import count_newlines, has_blank_line
except ImportError:  # pragma: no cover - depends on the installation

    def has_blank_line(block: bytes) -> bool:
        return block.startswith(b"\n") or b"\n\n" in block

    def count_newlines(block: bytes) -> int:
        return block.count(b"\n")


FINGERPRINT_SIZE = 256
IDLE_POLL_SECONDS = 0.25
INOTIFY_POLL_SECONDS = 1.0  # with inotify, polling is only the safety net
MULTILINE_BATCH = 256 * 1024
ROTATION_CHECK_SECONDS = 1.0  # rotation is checked at least this often even while busy
PARSE_WARNING_INTERVAL = 60.0
# A checkpoint as _resume_row takes it.
_CHECKPOINTS = "SELECT id, name, offset, inode, dev, fp_len, fingerprint, uid FROM in_tail_files"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS in_tail_files (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    offset INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    dev INTEGER NOT NULL,
    fp_len INTEGER NOT NULL,
    fingerprint BLOB NOT NULL,
    created INTEGER NOT NULL,
    rotated INTEGER NOT NULL DEFAULT 0,
    uid TEXT,
    scope TEXT NOT NULL DEFAULT ''
);
-- With multiline.parser: lines up to `emitted` were delivered, except the pieces of the messages
-- still pending (stream -> start offset, JSON); in_tail_files.offset is the smallest start.
CREATE TABLE IF NOT EXISTS in_tail_multiline (
    file_id INTEGER PRIMARY KEY,
    emitted INTEGER NOT NULL,
    streams TEXT NOT NULL
);
-- truncate_long_lines: the checkpoint `offset` is inside a line whose head was delivered; a
-- restart skips to that line's end instead of sending the head again.
CREATE TABLE IF NOT EXISTS in_tail_cut_lines (
    file_id INTEGER PRIMARY KEY,
    offset INTEGER NOT NULL
);
"""


def _new_uid() -> str:
    """A file's part of its records' identities (64 random bits; see the module docstring)."""
    return secrets.token_hex(8)


def _line_starts(lines: list[bytes], start: int) -> list[int]:
    """File offsets of ``lines`` (newlines stripped) that follow each other from ``start``."""
    starts: list[int] = []
    append = starts.append
    position = start
    for line in lines:
        append(position)
        position += len(line) + 1
    return starts


def _fingerprint(handle: IO[bytes]) -> tuple[int, bytes]:
    head = os.pread(handle.fileno(), FINGERPRINT_SIZE, 0)
    return len(head), hashlib.sha256(head).digest()


def _grow_fingerprint(tailed: TailedFile) -> None:
    """Fingerprint more of a file that was short when opened, but only if its head still starts
    with the bytes fingerprinted so far. A commit can come after the file was truncated and
    written again (copytruncate): fingerprinting the new head then would hide the copy of the
    old content, whose unread rest would be lost (_find_copy matches on the old fingerprint)."""
    try:
        head = os.pread(tailed.handle.fileno(), FINGERPRINT_SIZE, 0)
    except (OSError, ValueError):
        return
    if len(head) > tailed.fp_len and hashlib.sha256(head[: tailed.fp_len]).digest() == tailed.fingerprint:
        tailed.fp_len, tailed.fingerprint = len(head), hashlib.sha256(head).digest()


@dataclass(eq=False)
class TailedFile:
    path: str
    tag: str
    handle: IO[bytes]
    dev: int
    inode: int
    offset: int  # where the next read starts
    fp_len: int
    fingerprint: bytes
    acks: OrderedAcks[int]
    uid: str = ""  # the file's part of its records' identities
    row_id: int | None = None
    committed: int = 0
    pending: bytes = b""
    skipping_long_line: bool = False
    at_eof: bool = False
    rotated_at: float | None = None
    backup: bool = False  # a rotated-away file: read to its end, then let go
    compressed: bool = False
    last_parse_warning: float = field(default=-PARSE_WARNING_INTERVAL)
    joiner: ContainerLogJoiner | RegexLogJoiner | None = None  # multiline.parser state
    marks: dict[int, dict[str, int]] = field(default_factory=dict)  # batch end -> pending starts
    ml_row: bool = False  # an in_tail_multiline row exists for this file
    truncated_head: tuple[bytes, int] | None = None  # truncate_long_lines: (head, line start) to emit
    cut_ends: set[int] = field(default_factory=set)  # batch ends that fall inside a truncated line
    cut_row: bool = False  # an in_tail_cut_lines row exists for this file
    origin: str | None = None  # for a copytruncate copy: the path it is a copy of


# Sends a tail has unfinished before it waits for the oldest (see TailSource._send).
ROUTING_AHEAD = 2


class TailSource(Source):
    plugin_name = "tail"
    description = "Follows files (globs), parses lines, resumes from its db after a restart"
    handles_mem_buf_limit = True  # it stops reading before it reads (see _wait_below_limit)
    options = (
        Option("path", required=True, help="Files to follow: globs, comma-separated"),
        Option("exclude_path", "list", [], help="Glob patterns of paths to skip, comma-separated"),
        Option("read_from_head", "bool", False, help="Read files found at start from the beginning"),
        Option("exit_on_eof", "bool", False, help="Stop (and let kubetrail exit) when every file is read"),
        Option("parser", help="Parser for each line (json, regex, ... or a [PARSER] name)"),
        Option("key", "str", "log", help="Key for the line when no parser is set or it fails"),
        Option("path_key", help="Add the file path to each record under this key"),
        Option("offset_key", help="Add the line's byte offset to each record under this key"),
        Option("refresh_interval", "duration", 60.0, help="How often the globs are expanded again"),
        Option("rotate_wait", "duration", 5.0, help="How long a rotated file is still read"),
        Option("buffer_chunk_size", "size", 32 * 1024, help="Smallest read (Fluent Bit compatibility)"),
        Option("buffer_max_size", "size", 4 * 1024 * 1024, help="Longest line; longer ones are skipped and counted"),
        Option("batch_size", "size", 1024 * 1024, help="Most bytes read into one batch"),
        Option("skip_long_lines", "bool", True, help="Skip lines longer than buffer_max_size (always on)"),
        Option(
            "truncate_long_lines",
            "bool",
            False,
            help="Keep the first buffer_max_size bytes of a longer line instead of skipping it",
        ),
        Option("skip_empty_lines", "bool", True, help="Skip empty lines"),
        Option(
            "multiline.parser",
            "list",
            [],
            help="Container runtime formats to parse and join partial lines of: cri, docker (or both)",
        ),
        Option("multiline.flush_ms", "int", 4000, help="Emit a partial message after this long without its end"),
        Option("inotify_watcher", "bool", True, help="Wake on inotify events; off: poll only"),
        Option("ignore_older", "duration", None, help="Skip files not modified for this long (found by a scan)"),
        # Fluent Bit's legacy docker mode is the docker joiner of multiline.parser docker.
        Option("docker_mode", "bool", False, help="Join docker's split lines (same as multiline.parser docker)"),
        Option("docker_mode_flush", "int", 4, help="Seconds before an unfinished docker_mode line goes out"),
        no_effect(
            "docker_mode_parser",
            why="docker_mode joins docker's split lines; join messages of several lines with the multiline filter",
        ),
        Option("tag_regex", "regex", None, help="Named groups of the file path, used as <name> in tag"),
        no_effect("db.compare_filename", "bool", False, why="a file is known by device, inode and fingerprint"),
        no_effect("ignore_active_older_files", "bool", False, why="ignore_older applies to files found by a scan"),
        no_effect("static_batch_size", "size", None, why="batch_size sets how much one read takes"),
        no_effect("event_batch_size", "size", None, why="batch_size sets how much one read takes"),
        no_effect("file_cache_advise", "bool", True, why="kubetrail leaves the page cache to the kernel"),
        no_effect("progress_check_interval", "duration", None, why="files are read as inotify reports them"),
        no_effect("progress_check_interval_nsec", "int", None, why="files are read as inotify reports them"),
        no_effect("unicode.encoding", why="files are read as UTF-8 (invalid bytes are counted and replaced)"),
        no_effect("generic.encoding", why="files are read as UTF-8 (invalid bytes are counted and replaced)"),
        no_effect(
            "multiline", "bool", False, why="the legacy multiline mode: use multiline.parser or the multiline filter"
        ),
        no_effect("multiline_flush", "int", 4, why="the legacy multiline mode: use multiline.flush_ms"),
        no_effect("parser_firstline", why="the legacy multiline mode: use the multiline filter with a parser"),
        *(
            no_effect(f"parser_{n}", why="the legacy multiline mode: use the multiline filter with a parser")
            for n in range(1, 10)
        ),
        *DB_OPTIONS,
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.patterns = split_list(config["path"])
        if not self.patterns:
            raise ConfigError("'path' is empty", key="path")
        self.exclude = config["exclude_path"]
        self.tag_template: str = config["tag"]
        self.read_from_head: bool = config["read_from_head"]
        self.exit_on_eof: bool = config["exit_on_eof"]
        self.key: str = config["key"]
        self.path_key: str | None = config["path_key"]
        self.offset_key: str | None = config["offset_key"]
        self.refresh_interval: float = config["refresh_interval"]
        self.rotate_wait: float = config["rotate_wait"]
        self.max_line: int = config["buffer_max_size"]
        self.truncate_long: bool = config["truncate_long_lines"]
        self.multiline: tuple[str, ...] = tuple(f.lower() for f in config["multiline.parser"])
        if config["docker_mode"] and not self.multiline:
            self.multiline = ("docker",)
        # cri/docker join a container runtime's pieces; the regex parsers (go, python, java, ruby,
        # [MULTILINE_PARSER]) join lines into messages with the same checkpoint scheme.
        self.rulesets = [] if all(name in FORMATS for name in self.multiline) else self._rulesets(ctx)
        self.flush_seconds: float = max(0.0, config["multiline.flush_ms"] / 1000)
        if config["docker_mode"] and not config["multiline.parser"]:
            self.flush_seconds = max(0.0, float(config["docker_mode_flush"]))
        self.tag_regex: re.Pattern[str] | None = config["tag_regex"]
        self.use_inotify: bool = config["inotify_watcher"]
        self.ignore_older: float | None = config["ignore_older"]
        self.mem_limit: int | None = config.get("mem_buf_limit")
        self._in_flight_bytes = 0
        self._sending: deque[asyncio.Future[None]] = deque()  # batches handed to the router (see _send)
        self._below_limit = asyncio.Event()
        self._below_limit.set()
        self.watcher: FileWatcher | None = None
        self._last_rotation_check = 0.0
        self._warned_once: set[tuple[str, str]] = set()
        # Paths whose checkpointed file was rotated away while stopped: the file there now is new.
        self._successors: set[str] = set()
        # Paths found empty when their file rotated away, and since when: opened from their first
        # byte as soon as a file is there again (see "rename" above).
        self._vacated: dict[str, float] = {}
        m = self.metrics
        self.m_long = m.counter("kubetrail_tail_long_lines", "Lines over buffer_max_size, by action", "action")
        self.m_bad = m.counter("kubetrail_tail_bad_input", "Bad input seen by tail, by kind", "kind")
        self.m_rotations = m.counter("kubetrail_tail_rotations", "Rotations detected, by kind", "kind")
        self.m_paused = m.counter("kubetrail_tail_mem_buf_paused", "Times reading paused on mem_buf_limit")
        self.read_size: int = max(config["batch_size"], config["buffer_chunk_size"])
        if self.multiline and config["batch_size"] == 1024 * 1024:
            # Container log records are dicts (~5x their bytes in memory, vs the lazy JSON path's
            # bytes) and sinks buffer 16 batches: smaller default batches keep RSS near 65 MB at
            # ~10% of the throughput. An explicit batch_size is taken as it is. (cri as a block,
            # bytes not dicts: 1 MB batches measured no faster, and 15-20 MB more RSS.)
            self.read_size = max(MULTILINE_BATCH, config["buffer_chunk_size"])
        self.parser: Parser | None = None
        if config["parser"]:
            parser = ctx.parsers.get(config["parser"])
            if parser is None:
                raise ConfigError(
                    f"unknown parser {config['parser']!r}; known: {', '.join(ctx.parsers.names())}", key="parser"
                )
            self.parser = parser
        self.db_config = config
        self.db: StateDB | None = None
        # Whose rows in a shared db are this input's (see the module docstring).
        self.scope: str = (config.get("alias") or "").strip()
        self.files: dict[tuple[int, int], TailedFile] = {}
        self._stop = asyncio.Event()
        self._warned_paths: set[str] = set()
        self._last_scan = 0.0

    def _rulesets(self, ctx: ComponentContext) -> list[RuleSet]:
        declared = {s.get("name"): s for s in getattr(ctx.parsers, "multiline_sections", [])}
        rulesets = []
        for name in self.multiline:
            if name in FORMATS:
                raise ConfigError(
                    f"multiline.parser {name} (container runtime pieces) cannot be mixed with line parsers here; "
                    "join the pieces with cri/docker on tail and the rest with the multiline filter",
                    key="multiline.parser",
                )
            if name in declared:
                rulesets.append(from_section(declared[name]))
            elif name in BUILTIN_RULES:
                rulesets.append(builtin(name))
            else:
                known = sorted({*FORMATS, *BUILTIN_RULES, *(n for n in declared if n)})
                raise ConfigError(
                    f"unknown multiline.parser {name!r}; known: {', '.join(known)}", key="multiline.parser"
                )
        return rulesets

    def _tag_for(self, path: str) -> str:
        """``tag`` for a file: ``*`` is the path; with ``tag_regex``, ``<name>`` is its group."""
        tag = expand_tag(self.tag_template, path)
        if self.tag_regex is not None:
            match = self.tag_regex.search(path)
            if match is not None:
                for name, value in match.groupdict().items():
                    tag = tag.replace(f"<{name}>", value or "")
        return tag

    # -- lifecycle -----------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        for tailed in list(self.files.values()):
            self._forget(tailed, delete_row=False)
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None
        if self.db is not None:
            self.db.close()
            self.db = None

    async def run(self, emitter: Emitter) -> None:
        try:
            await self._tail(emitter)
            await self._sent()
        finally:
            for sending in self._sending:  # stopped by an error or cancelled: replayed after a restart
                sending.cancel()
            self._sending.clear()

    async def _send(self, emitter: Emitter, batch: Batch) -> None:
        """Hands ``batch`` to the router without waiting for it to be routed: reading goes on
        meanwhile, and overlaps the filters that work in a thread of their own (the
        kubernetes_audit filter's native scan). Each send reaches the sinks only after the one
        before it (``after``), so the order of reading is kept. At most ``ROUTING_AHEAD`` sends
        are unfinished; then reading waits for the oldest."""
        if len(self._sending) >= ROUTING_AHEAD:
            await self._sending.popleft()
        previous = self._sending[-1] if self._sending else None
        self._sending.append(asyncio.ensure_future(emitter.send(batch, after=previous)))
        await asyncio.sleep(0)  # lets it start now, so that such a filter's thread begins

    async def _sent(self) -> None:
        """Waits until every batch given to ``_send`` is routed (raising what one raised)."""
        while self._sending:
            await self._sending.popleft()

    async def _tail(self, emitter: Emitter) -> None:
        if self.db is None:
            self.db = StateDB.from_options(self.db_config)
            if self.db is not None:
                self.db.conn.executescript(_SCHEMA)
                columns = {row[1] for row in self.db.execute("PRAGMA table_info(in_tail_files)")}
                if "uid" not in columns:  # a db written before records carried identities
                    self.db.execute("ALTER TABLE in_tail_files ADD COLUMN uid TEXT")
                self.db.execute("UPDATE in_tail_files SET uid=lower(hex(randomblob(8))) WHERE uid IS NULL")
                if "scope" not in columns:  # a db written before tails sharing one were kept apart
                    self.db.execute("ALTER TABLE in_tail_files ADD COLUMN scope TEXT NOT NULL DEFAULT ''")
                self.db.execute("DROP INDEX IF EXISTS in_tail_files_identity")  # (dev, inode) without scope
                self.db.execute(
                    "CREATE UNIQUE INDEX IF NOT EXISTS in_tail_files_scoped ON in_tail_files (scope, dev, inode)"
                )
                self._adopt_unscoped()
        if self.use_inotify and self.watcher is None and not self.exit_on_eof:
            watcher = FileWatcher(self.log)
            if watcher.start():
                self.watcher = watcher
        self._resume_rotated()
        if self.db is not None:  # multiline state of files whose checkpoint went away
            self.db.execute("DELETE FROM in_tail_multiline WHERE file_id NOT IN (SELECT id FROM in_tail_files)")
            self.db.execute("DELETE FROM in_tail_cut_lines WHERE file_id NOT IN (SELECT id FROM in_tail_files)")
        self._scan(initial=True)
        while not self._stop.is_set():
            progressed = False
            for tailed in list(self.files.values()):
                if self._stop.is_set():
                    break
                if self.mem_limit and self._in_flight_bytes >= self.mem_limit:
                    await self._wait_below_limit()
                    if self._stop.is_set():
                        break
                batch = self._read(tailed)
                if batch is not None:
                    await self._send(emitter, batch)
                if batch is not None or not tailed.at_eof:  # a read of only part of a line counts
                    progressed = True
            now = time.monotonic()
            if self.multiline and self.flush_seconds:
                for tailed in list(self.files.values()):
                    batch = self._flush_joiner(tailed, now - self.flush_seconds)
                    if batch is not None:
                        await self._send(emitter, batch)
            if progressed:
                # Busy files never reach the idle branch: rotation and new files are still
                # looked at on their own clocks.
                if now - self._last_rotation_check >= ROTATION_CHECK_SECONDS:
                    self._check_rotation()
                if now - self._last_scan >= self.refresh_interval:
                    self._scan(initial=False)
                await asyncio.sleep(0)  # let sinks and acks run between rounds
                continue
            if self.exit_on_eof:
                for tailed in list(self.files.values()):
                    batch = self._flush_partial(tailed)
                    if batch is not None:
                        await self._send(emitter, batch)
                    batch = self._flush_joiner(tailed, float("inf"))
                    if batch is not None:
                        await self._send(emitter, batch)
                await self._sent()
                self.log.info("every file read to its end (exit_on_eof)", extra={"files": len(self.files)})
                return
            self._check_rotation()
            if time.monotonic() - self._last_scan >= self.refresh_interval or (
                self.watcher is not None and self.watcher.dirs_changed
            ):
                if self.watcher is not None:
                    self.watcher.dirs_changed = False
                self._scan(initial=False)
            if self.watcher is not None:
                await self.watcher.wait(self._stop, INOTIFY_POLL_SECONDS)
                continue
            try:
                await asyncio.wait_for(self._stop.wait(), IDLE_POLL_SECONDS)
            except TimeoutError:
                pass

    async def _wait_below_limit(self) -> None:
        """mem_buf_limit: stop reading until deliveries bring the bytes in flight under it."""
        self.m_paused.inc()
        self._below_limit.clear()
        stopper = asyncio.ensure_future(self._stop.wait())
        waiter = asyncio.ensure_future(self._below_limit.wait())
        try:
            await asyncio.wait((stopper, waiter), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            waiter.cancel()

    def _track(self, size: int) -> Callable[[bool], None] | None:
        """An on-complete callback that returns ``size`` bytes to the mem_buf_limit budget."""
        if not self.mem_limit:
            return None
        self._in_flight_bytes += size

        def done(_delivered: bool) -> None:
            self._in_flight_bytes -= size
            if self.mem_limit and self._in_flight_bytes < self.mem_limit:
                self._below_limit.set()

        return done

    def _warn_once(self, path: str, kind: str, message: str, **extra: Any) -> None:
        """Bad input (unreadable, not a file, dangling link): counted each time, logged once."""
        self.m_bad.labels(kind).inc()
        if (path, kind) in self._warned_once:
            return
        if len(self._warned_once) > 10_000:
            self._warned_once.clear()
        self._warned_once.add((path, kind))
        self.log.warning(message, extra={"path": path, **extra})

    # -- discovery -----------------------------------------------------------------------

    def _scan(self, initial: bool) -> None:
        self._last_scan = time.monotonic()
        listings = DirListings()
        for pattern in self.patterns:
            self._check_directories(pattern)
            matches = sorted(glob.glob(pattern))
            if not matches and pattern not in self._warned_paths:
                self._warned_paths.add(pattern)
                self.log.warning("path matches no file (yet); will look again", extra={"path": pattern})
            for path in matches:
                if any(fnmatch.fnmatch(path, ex) for ex in self.exclude) or os.path.isdir(path):
                    continue
                if path.endswith(".gz"):
                    continue  # compressed backups are read only through rotation, from a checkpoint
                if not self._regular_file(path):
                    continue
                if self.ignore_older is not None and not self._known(path):
                    try:
                        if time.time() - os.stat(path).st_mtime > self.ignore_older:
                            continue
                    except OSError:
                        continue
                if initial and self.read_from_head and not self._known(path):
                    for backup in _backups_of(path, listings):  # older data first, oldest backup first
                        if not self._known(backup):
                            self._open_backup(backup, None)
                if initial:
                    self._rotated_since_resume(path, listings)
                # A file that took the place of one rotated away while stopped is read from its
                # start: all of it was written after the checkpoint (kubelet's new 0.log).
                self._open(path, from_head=self.read_from_head or not initial or path in self._successors)

    def _check_directories(self, pattern: str) -> None:
        """Warn about a directory of the pattern that cannot be listed (glob silently skips it),
        and watch the pattern's directories for new files."""
        directory = os.path.dirname(pattern) or "."
        static = directory
        while glob.has_magic(static):
            static = os.path.dirname(static) or "."
        if os.path.isdir(static) and not os.access(static, os.R_OK | os.X_OK):
            self._warn_once(static, "permission", "directory cannot be read; its files are not followed")
        if self.watcher is not None:
            for found in glob.glob(directory) if glob.has_magic(directory) else [directory]:
                if os.path.isdir(found) and os.access(found, os.R_OK | os.X_OK):
                    self.watcher.watch(found, directory=True)

    def _regular_file(self, path: str) -> bool:
        """Only regular files are followed: opening a FIFO would block the whole input, and a
        dangling symlink (a container log whose pod directory is gone) has nothing to read."""
        try:
            st = os.stat(path)
        except OSError as exc:
            if os.path.islink(path):
                self._warn_once(path, "dangling_symlink", "symlink points to nothing; skipped")
            elif exc.errno == errno.EACCES:
                self._warn_once(path, "permission", "cannot read file; skipped", error=exc.strerror)
            return False
        if not stat.S_ISREG(st.st_mode):
            self._warn_once(path, "not_regular", "not a regular file (FIFO, socket, device); skipped")
            return False
        return True

    def _known(self, path: str) -> bool:
        """A file this input follows or has a checkpoint for."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        if (st.st_dev, st.st_ino) in self.files:
            return True
        if self.db is None:
            return False
        return (
            self.db.execute(
                "SELECT 1 FROM in_tail_files WHERE scope=? AND dev=? AND inode=?", (self.scope, st.st_dev, st.st_ino)
            ).fetchone()
            is not None
        )

    def _matched(self, path: str) -> bool:
        return any(fnmatch.fnmatch(path, pattern) for pattern in self.patterns)

    def _adopt_unscoped(self) -> None:
        """Take over the rows written before scopes (scope ``''``) of the files this input
        follows: those its path matches and their rotated backups (see the module docstring)."""
        assert self.db is not None
        if not self.scope:
            return
        rows = self.db.execute("SELECT id, name FROM in_tail_files WHERE scope=''").fetchall()
        if not rows:
            return
        backups: set[str] | None = None  # looked for only if a row's name is not matched
        for row_id, name in rows:
            if not self._matched(name):
                if backups is None:
                    listings = DirListings()
                    backups = {
                        b
                        for p in self.patterns
                        for f in glob.glob(p)
                        for b in _backups_of(f, listings) + _target_backups(f, listings)
                    }
                if name not in backups:
                    continue
            # OR IGNORE: a row of this scope for the same file exists already; that one stays.
            self.db.execute("UPDATE OR IGNORE in_tail_files SET scope=? WHERE id=?", (self.scope, row_id))

    def _resume_rotated(self) -> None:
        """Finish files that were rotated away while kubetrail was stopped.

        A checkpoint whose file no longer sits at its path is looked for among the rotated
        backups next to it: the same inode if it was only renamed (API server ``audit-<time>.log``,
        kubelet ``0.log.<time>``), or the same fingerprint inside a ``.gz`` if it was compressed
        since. It is read from the stored offset to its end, so nothing written before the stop
        is lost and nothing already delivered is read again.
        """
        if self.db is None:
            return
        rows = self.db.execute(
            f"{_CHECKPOINTS} WHERE scope=?",
            (self.scope,),
        ).fetchall()
        listings = DirListings()
        for row in rows:
            self._resume_row(row, listings)

    def _rotated_since_resume(self, path: str, listings: DirListings) -> None:
        """A checkpoint of ``path`` whose file was rotated after :meth:`_resume_rotated` looked
        and before this first scan (milliseconds, but a CI run met it: the kubelet rotated a
        pod's log right then, and the scan took the new file for the only one): resumed now,
        from its backup, as if it had been rotated while stopped."""
        if self.db is None:
            return
        try:
            st = os.stat(path)
        except OSError:
            return
        rows = self.db.execute(
            f"{_CHECKPOINTS} WHERE scope=? AND name=? AND NOT (dev=? AND inode=?)",
            (self.scope, path, st.st_dev, st.st_ino),
        ).fetchall()
        for row in rows:
            self._resume_row(row, listings)

    def _resume_row(self, row: tuple[Any, ...], listings: DirListings) -> None:
        """One checkpoint of :meth:`_resume_rotated`: its file resumed, found rotated, or gone."""
        row_id, name, offset, inode, dev, fp_len, fingerprint, uid = row
        if (dev, inode) in self.files:
            return  # followed already
        here = _same_file(name, dev, inode, fp_len, fingerprint, allow_gz=False)
        if here and self._matched(name):
            return  # still in place: the scan resumes it
        if here:
            self._open_backup(name, (row_id, offset, fp_len, fingerprint, uid))
            return
        found = False
        candidates = _backups_of(name, listings) + _target_backups(name, listings)
        for index, candidate in enumerate(candidates):
            if _same_file(candidate, dev, inode, fp_len, fingerprint):
                self._open_backup(candidate, (row_id, offset, fp_len, fingerprint, uid), tag_path=name)
                # Rotated again while stopped: the backups after it (oldest first, plain or
                # .gz) hold what was written since, and the file now at the path is new.
                for later in candidates[index + 1 :]:
                    if not self._known(later):
                        self._open_backup(later, None, tag_path=name)
                self._successors.add(name)
                found = True
                break
        if not found:
            if _same_inode(name, dev, inode):  # the head changed, the inode did not
                self.metrics.error("truncated_while_stopped")
                self.log.warning(
                    "file truncated or rewritten in place while stopped: read again from its start; "
                    "whatever it held past the checkpoint before that is lost",
                    extra={"path": name, "offset": offset},
                )
            else:
                self.metrics.error("rotated_away")
                self.log.warning(
                    "a file rotated away while stopped was not found; its unread part is lost",
                    extra={"path": name, "offset": offset},
                )
            self._delete_row(row_id)

    def _open_backup(
        self, path: str, row: tuple[int, int, int, bytes, str] | None, tag_path: str | None = None
    ) -> None:
        """Follow a rotated file (plain or ``.gz``) from its checkpoint (or its start) to its end."""
        compressed = path.endswith(".gz")
        try:
            st = os.stat(path)
            handle = cast(IO[bytes], gzip.open(path, "rb") if compressed else open(path, "rb"))  # noqa: SIM115
            head = handle.read(FINGERPRINT_SIZE)
        except (OSError, EOFError) as exc:
            self.metrics.error("open")
            self.log.error("cannot open rotated file", extra={"path": path, "error": str(exc)})
            return
        if row is None:
            fp_len, fingerprint, offset, uid = len(head), hashlib.sha256(head).digest(), 0, _new_uid()
            row_id = self._insert_row(path, 0, st, fp_len, fingerprint, uid)
        else:
            row_id, offset, fp_len, fingerprint, uid = row
        self._follow(
            path,
            tag_path or path,
            handle,
            st,
            offset,
            fp_len,
            fingerprint,
            uid,
            row_id,
            backup=True,
            compressed=compressed,
        )
        self.log.info("reading rotated file to its end", extra={"path": path, "offset": offset})

    def _follow(
        self,
        path: str,
        tag_path: str,
        handle: IO[bytes],
        st: os.stat_result,
        offset: int,
        fp_len: int,
        fingerprint: bytes,
        uid: str,
        row_id: int | None,
        backup: bool = False,
        compressed: bool = False,
    ) -> TailedFile:
        """Start reading an opened file at ``offset``; its checkpoint moves as sinks acknowledge."""
        handle.seek(offset)
        tailed = TailedFile(
            path=path,
            tag=self._tag_for(tag_path),
            handle=handle,
            dev=st.st_dev,
            inode=st.st_ino,
            offset=offset,
            fp_len=fp_len,
            fingerprint=fingerprint,
            acks=OrderedAcks(lambda position: None),
            uid=uid,
            row_id=row_id,
            committed=offset,
            backup=backup,
            compressed=compressed,
        )
        tailed.acks = OrderedAcks(lambda position, t=tailed: self._commit(t, position))  # type: ignore[misc]
        if self.db is not None and row_id is not None and offset > 0:
            cut = self.db.execute("SELECT offset FROM in_tail_cut_lines WHERE file_id=?", (row_id,)).fetchone()
            if cut is not None and cut[0] == offset:
                tailed.cut_row = True
                tailed.skipping_long_line = True  # the head of this line was delivered before
        self.files[(st.st_dev, st.st_ino)] = tailed
        self._attach(tailed)
        return tailed

    def _open(self, path: str, from_head: bool) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) in self.files:
            return
        if not stat.S_ISREG(st.st_mode):
            self._warn_once(path, "not_regular", "not a regular file (FIFO, socket, device); skipped")
            return
        try:
            handle = open(path, "rb")  # noqa: SIM115 - held open while the file is followed
        except OSError as exc:
            self.m_bad.labels("permission" if exc.errno == errno.EACCES else "open").inc()
            if path not in self._warned_paths:
                self._warned_paths.add(path)
                self.metrics.error("open")
                self.log.error("cannot open file", extra={"path": path, "error": exc.strerror})
            return
        st = os.fstat(handle.fileno())
        fp_len, fingerprint = _fingerprint(handle)
        offset = 0 if from_head else st.st_size
        row_id = None
        uid = _new_uid()
        if self.db is not None:
            row = self.db.execute(
                "SELECT id, offset, fp_len, fingerprint, uid FROM in_tail_files WHERE scope=? AND dev=? AND inode=?",
                (self.scope, st.st_dev, st.st_ino),
            ).fetchone()
            if row is not None:
                stored_len, stored_fp = row[2], row[3]
                head = os.pread(handle.fileno(), stored_len, 0)
                if len(head) == stored_len and hashlib.sha256(head).digest() == stored_fp and row[1] <= st.st_size:
                    row_id, offset, uid = row[0], row[1], row[4]
                else:  # inode reused by a new file, or the file was truncated while we were down
                    self._delete_row(row[0])
                    offset = 0
            if row_id is None:
                row_id = self._insert_row(path, offset, st, fp_len, fingerprint, uid)
        self._follow(path, path, handle, st, offset, fp_len, fingerprint, uid, row_id)
        self.log.info("following file", extra={"path": path, "offset": offset, "inode": st.st_ino})

    def _insert_row(
        self, path: str, offset: int, st: os.stat_result, fp_len: int, fingerprint: bytes, uid: str
    ) -> int | None:
        """A checkpoint row for a file (replacing one of a file that had its inode before)."""
        if self.db is None:
            return None
        cursor = self.db.execute(
            "INSERT OR REPLACE INTO in_tail_files (name, offset, inode, dev, fp_len, fingerprint, created, uid, scope)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (path, offset, st.st_ino, st.st_dev, fp_len, fingerprint, int(time.time()), uid, self.scope),
        )
        row_id = cursor.lastrowid
        # SQLite may hand out the id of a deleted row again (no AUTOINCREMENT): a new file must not
        # inherit pending pieces or a cut-line mark left under that id (that would skip its lines).
        self._delete_side_rows(row_id)
        return row_id

    def _delete_row(self, row_id: int) -> None:
        """A file's checkpoint and everything kept beside it."""
        assert self.db is not None
        self.db.execute("DELETE FROM in_tail_files WHERE id=?", (row_id,))
        self._delete_side_rows(row_id)

    def _delete_side_rows(self, row_id: int | None) -> None:
        assert self.db is not None
        self.db.execute("DELETE FROM in_tail_multiline WHERE file_id=?", (row_id,))
        self.db.execute("DELETE FROM in_tail_cut_lines WHERE file_id=?", (row_id,))

    def _attach(self, tailed: TailedFile) -> None:
        """Multiline state (and its replay window after a restart) and the inotify watch."""
        if self.multiline:
            tailed.joiner = (
                RegexLogJoiner(self.rulesets, self.max_line, self.truncate_long, self.key, tailed.uid)
                if self.rulesets
                else ContainerLogJoiner(self.multiline, self.max_line, self.truncate_long, self.key, tailed.uid)
            )
            if self.db is not None and tailed.row_id is not None:
                row = self.db.execute(
                    "SELECT emitted, streams FROM in_tail_multiline WHERE file_id=?", (tailed.row_id,)
                ).fetchone()
                if row is not None:
                    tailed.ml_row = True
                    tailed.joiner.replay(row[0], {str(k): int(v) for k, v in json.loads(row[1]).items()})
        if self.watcher is not None and not tailed.compressed:
            self.watcher.watch(os.path.realpath(tailed.path), directory=False)

    # -- reading ---------------------------------------------------------------------------

    def _read(self, tailed: TailedFile) -> Batch | None:
        if tailed.truncated_head is not None:  # truncate_long_lines: the head goes out on its own
            head, line_start = tailed.truncated_head
            tailed.truncated_head = None
            # Acknowledged up to the head's end, inside the line: see in_tail_cut_lines.
            end = line_start + len(head)
            tailed.cut_ends.add(end)
            return self._make_batch(tailed, head + b"\n", line_start, end, skip_first=False)
        try:
            chunk = tailed.handle.read(self.read_size)
        except OSError as exc:
            self.metrics.error("read")
            self.log.error("read failed; file dropped", extra={"path": tailed.path, "error": exc.strerror})
            self._forget(tailed, delete_row=False)
            return None
        if not chunk:
            tailed.at_eof = True
            return None
        tailed.at_eof = False
        if not tailed.backup and self._rewritten(tailed):
            # copytruncate: the file was emptied and written again since the last read, so this
            # chunk is new content at an old offset. Drop it; the file is read again from 0.
            self._truncated(tailed)
            return None
        start = tailed.offset - len(tailed.pending)
        tailed.offset += len(chunk)
        data = tailed.pending + chunk if tailed.pending else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            tailed.pending = self._hold_partial(tailed, data)
            return None
        block = data if cut + 1 == len(data) else data[: cut + 1]
        # Whether the block's first line is the end of a skipped line is known before the
        # block's own unfinished tail is looked at (which may start skipping the next one).
        skip_first = tailed.skipping_long_line
        tailed.skipping_long_line = False
        tailed.pending = self._hold_partial(tailed, data[cut + 1 :])
        return self._make_batch(tailed, block, start, start + cut + 1, skip_first)

    def _hold_partial(self, tailed: TailedFile, partial: bytes) -> bytes:
        if len(partial) <= self.max_line:
            return partial
        # A line longer than buffer_max_size is skipped (counted), never a reason to stop
        # following the file as Fluent Bit's default does.
        if not tailed.skipping_long_line:
            if self.truncate_long:
                tailed.truncated_head = (partial[: self.max_line], tailed.offset - len(partial))
                self.m_long.labels("truncated").inc()
            else:
                self.metrics.dropped(1, "long_line")
                self.m_long.labels("skipped").inc()
                self.log.warning(
                    "line longer than buffer_max_size skipped", extra={"path": tailed.path, "limit": self.max_line}
                )
        tailed.skipping_long_line = True
        return b""

    def _flush_partial(self, tailed: TailedFile) -> Batch | None:
        if not tailed.pending or tailed.skipping_long_line:
            return None
        line, tailed.pending = tailed.pending, b""
        end = tailed.offset
        return self._make_batch(tailed, line + b"\n", end - len(line), end, skip_first=False)

    def _make_batch(self, tailed: TailedFile, block: bytes, start: int, end: int, skip_first: bool) -> Batch | None:
        """Whole lines ``block`` (newline-terminated) from ``[start, end)`` of the file -> a batch."""
        if tailed.joiner is not None:
            return self._make_container_batch(tailed, block, start, end, skip_first)
        token = tailed.acks.token(end, self._track(len(block)))
        plain = not (skip_first or self.path_key or self.offset_key)
        # A blank line is skipped by the line-by-line path, so such a block is parsed that way:
        # a lazy block's count must be its records' count from the start.
        if plain and not has_blank_line(block):
            parser = self.parser
            lazy = parser.line_block(block, tailed.tag) if parser is not None else self._text_block(tailed, block)
            if lazy is not None:
                lazy.fallback = lambda: self._line_batch(tailed, block, start, token, False, True)
                lazy.identity = (tailed.uid, start)
                lazy.report = self._bad_input
                return Batch(tailed.tag, None, token, len(block), block=lazy)
        batch = self._line_batch(tailed, block, start, token, skip_first, plain)
        if not len(batch):
            token.seal()  # nothing to deliver, but the offset may still advance
            return None
        return batch

    def _text_block(self, tailed: TailedFile, block: bytes) -> TextBlock | None:
        """No parser: the lines as one block of ``{key: line}`` records (see TextBlock), unless
        it holds a line the line-by-line path would skip (only ``\\r`` in a CRLF file)."""
        first_end = block.find(b"\n")
        crlf = first_end > 0 and block[first_end - 1] == 13  # as _line_batch decides: by the first line
        if crlf and (block.startswith(b"\r\n") or b"\n\r\n" in block):
            return None
        return TextBlock(block, count_newlines(block), tailed.tag, self.key, wall_ns(), crlf)

    def _bad_input(self, kind: str, count: int) -> None:
        """Bad input found while parsing (``bad_time``, ``invalid_utf8``)."""
        self.m_bad.labels(kind).inc(count)

    def _line_batch(
        self, tailed: TailedFile, block: bytes, start: int, token: AckToken, skip_first: bool, plain: bool
    ) -> Batch:
        """The block parsed line by line (empty when no line is left)."""
        tag = tailed.tag
        size = len(block)
        parser = self.parser
        uid = tailed.uid
        lines = block.split(b"\n")
        lines.pop()  # the empty string after the final newline
        starts = _line_starts(lines, start)
        if skip_first:
            lines[0] = b""  # the rest of a line already reported as too long
        raw_block: bytes | None = block if plain else None
        if lines and lines[0].endswith(b"\r"):  # CRLF files end every line with it
            lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
            raw_block = None
        if b"" in lines:  # empty lines are skipped, so the block no longer matches the records
            kept = [(line, at) for line, at in zip(lines, starts, strict=True) if line]
            lines, starts = [line for line, _ in kept], [at for _, at in kept]
            raw_block = None
        if not lines:
            return Batch(tag, [], token, size)
        if parser is not None:
            if raw_block is not None:
                records, failed, unchanged = parser.parse_block(raw_block, lines, tag)
                if not unchanged:
                    raw_block = None
            else:
                records, failed = parser.parse_lines(lines, tag)
            if failed:
                self._parse_failures(tailed, failed)
            if parser.bad_times:
                self._bad_input("bad_time", parser.bad_times)
                parser.bad_times = 0
            if parser.bad_utf8:
                self._bad_input("invalid_utf8", parser.bad_utf8)
                parser.bad_utf8 = 0
        else:
            raw_block = None
            now = wall_ns()
            key = self.key
            records = [Record(tag, now, {key: line.decode("utf-8", "replace")}) for line in lines]
        if len(records) == len(starts):  # parsers make one record per line
            for record, at in zip(records, starts, strict=True):
                record.identity = (uid, at)
        if self.path_key or self.offset_key:
            self._decorate(tailed, records, starts)
        return Batch(tag, records, token, size, raw_block=raw_block)

    def _make_container_batch(
        self, tailed: TailedFile, block: bytes, start: int, end: int, skip_first: bool
    ) -> Batch | None:
        """multiline.parser cri/docker: parse, join pieces per stream, remember what is pending."""
        joiner = tailed.joiner
        assert joiner is not None
        stats = JoinStats()
        if isinstance(joiner, ContainerLogJoiner) and not (self.path_key or self.offset_key):
            # cri lines as one block of records' JSON lines (see parsers/multiline.py)
            lines_at = block.find(b"\n") + 1 if skip_first else 0  # skip the rest of a too-long line
            ready = joiner.process_block(block[lines_at:] if lines_at else block, start + lines_at, tailed.tag, stats)
            if ready is not None:
                if stats.any():
                    self._join_stats(tailed, stats)
                return self._container_batch(tailed, ready, end, len(block))
        lines = block.split(b"\n")
        lines.pop()
        if skip_first and lines:  # the rest of a line already reported as too long
            start += len(lines[0]) + 1
            del lines[0]
        records = joiner.process(lines, start, tailed.tag, stats)
        if stats.any():
            self._join_stats(tailed, stats)
        return self._container_batch(tailed, records, end, len(block))

    def _container_batch(
        self, tailed: TailedFile, records: list[Record] | ReadyBlock, end: int, size: int
    ) -> Batch | None:
        joiner = tailed.joiner
        assert joiner is not None
        if joiner.pending:
            tailed.marks[end] = joiner.pending_starts()
        token = tailed.acks.token(end, self._track(size))
        if isinstance(records, ReadyBlock):
            if not records.count:
                token.seal()
                return None
            return Batch(tailed.tag, None, token, size, block=records)
        if not records:
            token.seal()
            return None
        if self.path_key or self.offset_key:
            # A joined message's offset is that of its first piece, as in its identity.
            self._decorate(tailed, records, [record.identity[1] for record in records])  # type: ignore[index]
        return Batch(tailed.tag, records, token, size)

    def _flush_joiner(self, tailed: TailedFile, older_than: float) -> Batch | None:
        """Messages whose end never came within multiline.flush_ms go out as they are."""
        joiner = tailed.joiner
        if joiner is None or not joiner.pending:
            return None
        stats = JoinStats()
        records = joiner.flush(older_than, tailed.tag, stats)
        if not records:
            return None
        if stats.any():
            self._join_stats(tailed, stats)
        return self._container_batch(tailed, records, tailed.offset - len(tailed.pending), 0)

    def _join_stats(self, tailed: TailedFile, stats: JoinStats) -> None:
        for kind, count in (
            ("not_container_log", stats.bad_lines),
            ("bad_time", stats.bad_times),
            ("invalid_utf8", stats.bad_utf8),
        ):
            if count:
                self.m_bad.labels(kind).inc(count)
        if stats.long_skipped:
            self.metrics.dropped(stats.long_skipped, "long_line")
            self.m_long.labels("skipped").inc(stats.long_skipped)
        if stats.long_truncated:
            self.m_long.labels("truncated").inc(stats.long_truncated)
        if stats.bad_lines or stats.bad_times:
            self._parse_failures(tailed, stats.bad_lines + stats.bad_times)

    def _decorate(self, tailed: TailedFile, records: list[Record], starts: list[int]) -> None:
        for record, at in zip(records, starts, strict=True):
            body = record.mutable_body()
            if self.path_key:
                body[self.path_key] = tailed.path
            if self.offset_key:
                body[self.offset_key] = at

    def _parse_failures(self, tailed: TailedFile, failed: int) -> None:
        self.metrics.error("parse", failed)
        now = time.monotonic()
        if now - tailed.last_parse_warning >= PARSE_WARNING_INTERVAL:
            tailed.last_parse_warning = now
            self.log.warning(
                "lines did not parse; passed on under the log key",
                extra={"path": tailed.path, "parser": self.parser.name if self.parser else None, "count": failed},
            )

    # -- checkpoints and rotation -----------------------------------------------------------

    def _commit(self, tailed: TailedFile, position: int) -> None:
        tailed.committed = position
        pending: dict[str, int] = {}
        if tailed.joiner is not None:
            # Pieces of unfinished messages before `position` are not delivered yet: resume
            # from the oldest one, and replay only those streams up to `position`.
            pending = tailed.marks.pop(position, {})
            for stale in [mark for mark in tailed.marks if mark < position]:
                del tailed.marks[stale]
        is_cut = position in tailed.cut_ends
        if tailed.cut_ends:
            tailed.cut_ends = {end for end in tailed.cut_ends if end > position}
        if self.db is None or tailed.row_id is None:
            return
        if tailed.fp_len < FINGERPRINT_SIZE and not tailed.compressed:
            _grow_fingerprint(tailed)
        resume = min(position, *pending.values()) if pending else position
        self.db.execute(
            "UPDATE in_tail_files SET offset=?, fp_len=?, fingerprint=? WHERE id=?",
            (resume, tailed.fp_len, tailed.fingerprint, tailed.row_id),
        )
        if is_cut:
            if resume == position:
                tailed.cut_row = True
                self.db.execute(
                    "INSERT OR REPLACE INTO in_tail_cut_lines (file_id, offset) VALUES (?, ?)",
                    (tailed.row_id, position),
                )
        elif tailed.cut_row:
            tailed.cut_row = False
            self.db.execute("DELETE FROM in_tail_cut_lines WHERE file_id=?", (tailed.row_id,))
        if pending:
            self.db.execute(
                "INSERT OR REPLACE INTO in_tail_multiline (file_id, emitted, streams) VALUES (?, ?, ?)",
                (tailed.row_id, position, json.dumps(pending)),
            )
            tailed.ml_row = True
        elif tailed.ml_row:
            self.db.execute("DELETE FROM in_tail_multiline WHERE file_id=?", (tailed.row_id,))
            tailed.ml_row = False

    def _rewritten(self, tailed: TailedFile) -> bool:
        """The first bytes are no longer the ones the file was opened with (copytruncate)."""
        try:
            head = os.pread(tailed.handle.fileno(), tailed.fp_len, 0)
        except (OSError, ValueError):
            return False
        return len(head) != tailed.fp_len or hashlib.sha256(head).digest() != tailed.fingerprint

    def _truncated(self, tailed: TailedFile) -> None:
        """The file was truncated in place. If a complete copy of its old content sits next to it
        (copytruncate: copy, then truncate), the unread rest is read from the copy, carrying on
        with the same checkpoint, pieces and acknowledgements (the copy has the same bytes at the
        same offsets). Then the file is followed again from its start."""
        self.m_rotations.labels("truncate").inc()
        self.files.pop((tailed.dev, tailed.inode), None)
        try:
            tailed.handle.close()
        except OSError:
            pass
        old_row = tailed.row_id
        copy = self._find_copy(tailed)
        if copy is not None:
            path, handle, st = copy
            self.m_rotations.labels("copytruncate").inc()
            handle.seek(tailed.offset)
            tailed.handle, tailed.dev, tailed.inode = handle, st.st_dev, st.st_ino
            tailed.path, tailed.backup, tailed.at_eof = path, True, False
            if self.db is not None and old_row is not None:
                # The copy is the same content at the same offsets: it keeps the file's uid.
                row = self.db.execute("SELECT offset FROM in_tail_files WHERE id=?", (old_row,)).fetchone()
                tailed.row_id = self._insert_row(
                    path, row[0] if row else 0, st, tailed.fp_len, tailed.fingerprint, tailed.uid
                )
                for table in ("in_tail_multiline", "in_tail_cut_lines"):  # same offsets: same state
                    self.db.execute(f"UPDATE {table} SET file_id=? WHERE file_id=?", (tailed.row_id, old_row))
            self.files[(st.st_dev, st.st_ino)] = tailed
            self.log.info("file truncated; its copy is read to the end first", extra={"path": path})
        else:
            if tailed.offset > 0:
                self.log.warning(
                    "file truncated in place; anything written after the last read and before the truncation is lost",
                    extra={"path": tailed.path, "offset": tailed.offset},
                )
            tailed.row_id = None  # its batches still in flight no longer move any checkpoint
        if self.db is not None and old_row is not None:
            self._delete_row(old_row)  # side rows already moved to the copy's row, if there is one
        self._open(tailed.path if copy is None else self._origin(tailed), from_head=True)

    def _origin(self, tailed: TailedFile) -> str:
        """The followed path a copy was made of (the tag keeps it too)."""
        return tailed.origin or tailed.path

    def _find_copy(self, tailed: TailedFile) -> tuple[str, IO[bytes], os.stat_result] | None:
        origin = tailed.path
        tailed.origin = origin
        candidates = _backups_of(origin)
        real = os.path.realpath(origin)
        if real != origin:
            candidates += _backups_of(real)
        for candidate in reversed(candidates):  # the newest copy is the likeliest
            if candidate.endswith(".gz"):
                continue
            try:
                handle = open(candidate, "rb")  # noqa: SIM115 - becomes the followed handle
            except OSError:
                continue
            st = os.fstat(handle.fileno())
            head = os.pread(handle.fileno(), tailed.fp_len, 0)
            if (
                (st.st_dev, st.st_ino) not in self.files
                and st.st_size >= tailed.offset
                and len(head) == tailed.fp_len
                and hashlib.sha256(head).digest() == tailed.fingerprint
            ):
                return candidate, handle, st
            handle.close()
        return None

    def _check_rotation(self) -> None:
        now = self._last_rotation_check = time.monotonic()
        for path, since in list(self._vacated.items()):
            if os.path.exists(path) or now - since >= self.refresh_interval:
                del self._vacated[path]
                self._open(path, from_head=True)  # nothing there (expired): does nothing
        for tailed in list(self.files.values()):
            if not tailed.at_eof:
                continue
            if tailed.backup:
                if not len(tailed.acks):  # read to its end and all of it delivered
                    self.log.info("rotated file done", extra={"path": tailed.path})
                    self._forget(tailed, delete_row=True)
                continue
            try:
                st = os.stat(tailed.path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    continue
                st = None
            if st is not None and (st.st_dev, st.st_ino) == (tailed.dev, tailed.inode):
                if st.st_size < tailed.offset:  # truncated in place (copytruncate, or `> file`)
                    self._truncated(tailed)
                continue
            # The path now names another file (rotated) or nothing (deleted). The old handle was
            # read to its end; keep it for rotate_wait in case a late write lands, then let go.
            if tailed.rotated_at is None:
                tailed.rotated_at = now
                self.log.info("file rotated or removed", extra={"path": tailed.path})
                if st is not None:
                    self._open(tailed.path, from_head=True)
                else:
                    self._vacated[tailed.path] = now
            elif now - tailed.rotated_at >= self.rotate_wait and not len(tailed.acks):
                self._forget(tailed, delete_row=True)

    def _forget(self, tailed: TailedFile, delete_row: bool) -> None:
        self.files.pop((tailed.dev, tailed.inode), None)
        try:
            tailed.handle.close()
        except OSError:
            pass
        if self.watcher is not None and not tailed.backup:
            self.watcher.unwatch(os.path.realpath(tailed.path))
        if delete_row and self.db is not None and tailed.row_id is not None:
            self._delete_row(tailed.row_id)


def _same_inode(path: str, dev: int, inode: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (dev, inode)


_BACKUP_TIME = re.compile(r"\d{8}-\d{6}|\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d+)?")


class DirListings:
    """Directory listings kept for one pass over many files of the same directories (a scan of
    ``/var/log/containers``): finding each file's backups by listing its directory anew made a
    scan of N files cost N listings of N names (500 containers: 750,000 names, ~1.5 s of CPU
    at start-up). A listing is as current as a ``glob`` at the moment it was taken."""

    def __init__(self) -> None:
        self._names: dict[str, list[str]] = {}

    def names(self, directory: str) -> list[str]:
        names = self._names.get(directory)
        if names is None:
            try:
                names = os.listdir(directory or ".")
            except OSError:
                names = []
            self._names[directory] = names
        return names


def _backups_of(path: str, listings: DirListings | None = None) -> list[str]:
    """Rotated copies of ``path`` next to it, oldest first: lumberjack's (the API server's audit
    log) ``<stem>-<time><ext>[.gz]`` and kubelet's ``<name>.<time>[.gz]`` (the names the globs
    ``<stem>-*<ext>``, ``<stem>-*<ext>.gz`` and ``<name>.*`` match, from one listing)."""
    directory, base = os.path.split(path)
    stem, ext = os.path.splitext(base)
    lumberjack = stem + "-"
    kubelet = base + "."
    found: set[str] = set()
    for name in (listings or DirListings()).names(directory):
        if name.startswith(kubelet) or (
            name.startswith(lumberjack)
            and (
                (name.endswith(ext) and len(name) >= len(lumberjack) + len(ext))
                or (name.endswith(ext + ".gz") and len(name) >= len(lumberjack) + len(ext) + 3)
            )
        ):
            found.add(os.path.join(directory, name))
    found.discard(path)

    def age(name: str) -> tuple[int, str | float, str]:
        # By the time in the name where there is one (kubelet's 20240101-120000, lumberjack's
        # 2024-01-01T12-00-00.000): kubelet gzips the previous backup *after* renaming the
        # current file, so modification times put the older backup last. Else (logrotate's
        # app.log.1, .2.gz) by modification time.
        stamp = _BACKUP_TIME.search(os.path.basename(name.removesuffix(".gz")))
        if stamp:
            return (0, stamp.group(0), name)
        try:
            return (1, os.stat(name).st_mtime, name)
        except OSError:
            return (1, 0.0, name)

    return sorted(found, key=age)


def _target_backups(path: str, listings: DirListings | None = None) -> list[str]:
    """For a symlink (``/var/log/containers/*.log``): the backups next to its target, where kubelet
    rotates (``/var/log/pods/.../0.log.<time>``)."""
    if not os.path.islink(path):
        return []
    target = os.path.realpath(path)
    return _backups_of(target, listings) if target != path else []


def _same_file(candidate: str, dev: int, inode: int, fp_len: int, fingerprint: bytes, allow_gz: bool = True) -> bool:
    """The checkpointed file, renamed (same inode and first bytes: inodes are reused) or
    compressed (the same first bytes inside the ``.gz``)."""
    try:
        st = os.stat(candidate)
        if (st.st_dev, st.st_ino) == (dev, inode):
            with open(candidate, "rb") as plain:
                head = os.pread(plain.fileno(), fp_len, 0)
        elif allow_gz and candidate.endswith(".gz"):
            with gzip.open(candidate, "rb") as handle:
                head = handle.read(fp_len)
        else:
            return False
    except (OSError, EOFError):
        return False
    return len(head) == fp_len and hashlib.sha256(head).digest() == fingerprint
