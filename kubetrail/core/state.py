"""The SQLite state file (``db``) that makes restarts resume instead of replaying.

One file per input, as in Fluent Bit, opened with Fluent Bit's ``db.sync``,
``db.journal_mode`` and ``db.locking`` options. Writes are small (a checkpoint per delivered
batch) and run on the event loop thread: in WAL mode with ``synchronous=NORMAL`` a commit is
tens of microseconds, cheaper than handing it to a thread.

**One state file, one owner** (:func:`check_state_files`, run by
:func:`kubetrail.core.config.load_config`, so ``kubetrail check`` and ``run`` exit 2 before
anything opens a file). Fluent Bit lets several inputs name the same ``db`` and then mixes
them (its tail takes another tail's rows for files of its own; fluent/fluent-bit#8928, and
its docs now ask for a unique ``db`` per tail). Here every plugin that keeps state in a file
is listed once in :data:`STATE_FILES`, with what it would do to a second user of that file,
and the same rule applies to all of them:

* ``tail`` keeps each input's rows under a scope of their own (its ``alias``; see
  :mod:`kubetrail.sources.tail`), so tails *may* share a ``db`` when each has a distinct
  ``alias``, the same ``db.journal_mode`` and ``db.locking off`` (an exclusive lock would
  shut the other connection out). Sharing by accident is common in Fluent Bit configs, and an
  alias is the one stable name an input has: ``tail.0`` changes when an input is added above.
* ``kubernetes_events`` (its rows are scoped by API and namespace but not by cluster or input:
  a second input watching the same would take the first one's checkpoint and delivered keys),
  the ``systemd`` input (one cursor row per file), the ``kubernetes_audit`` filter with
  ``dedupe`` (one key set per file: a second filter would drop events the first delivered)
  and the ``sqlite`` output (one writer per store: the second would be refused at start and
  retry for ever) never share their file, with each other or with a tail.
* The ``kafka`` input keeps no file: its offsets are committed to its consumer group, which
  gives each member its own partitions. ``storage.path`` is the service's, not a plugin's.

A file is known by its real path (symlinks and ``..`` resolved), or by device and inode when it
exists (hard links).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option, Section
from kubetrail.core.values import parse_bool

if TYPE_CHECKING:
    from kubetrail.core.config.model import PipelineConfig

DB_OPTIONS: tuple[Option, ...] = (
    Option("db", help="SQLite file keeping this input's checkpoints across restarts"),
    Option("db.sync", "choice", "normal", choices=("extra", "full", "normal", "off")),
    Option("db.journal_mode", "choice", "wal", choices=("wal", "delete", "truncate", "persist", "memory", "off")),
    Option("db.locking", "bool", False, help="Hold an exclusive lock on the db while running"),
)


class StateDB:
    """A thin wrapper that applies the Fluent Bit pragmas and creates tables."""

    def __init__(
        self, path: str | Path, sync: str = "normal", journal_mode: str = "wal", locking: bool = False
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self.conn.execute(f"PRAGMA journal_mode={journal_mode.upper()}")
        self.conn.execute(f"PRAGMA synchronous={sync.upper()}")
        if locking:
            self.conn.execute("PRAGMA locking_mode=EXCLUSIVE")

    @classmethod
    def from_options(cls, config: dict[str, object]) -> StateDB | None:
        if not config.get("db"):
            return None
        return cls(
            str(config["db"]),
            str(config.get("db.sync") or "normal"),
            str(config.get("db.journal_mode") or "wal"),
            bool(config.get("db.locking")),
        )

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def close(self) -> None:
        self.conn.close()


def _flag(section: Section, name: str, default: bool) -> bool:
    """A boolean option as the plugin will read it; a bad value is left to the plugin's own
    validation (which names it), so it counts as the default here."""
    value = section.get(name)
    if value is None:
        return default
    try:
        return parse_bool(value)
    except ValueError:
        return default


@dataclass(frozen=True)
class StateFileUse:
    """How one plugin keeps state in a file: the option naming it, whether several instances
    can keep their rows apart in one file, and what goes wrong for a second user of it."""

    option: str
    harm: str
    shareable: bool = False
    used: Callable[[Section], bool] = lambda _section: True  # the file is opened at all


# Every plugin that keeps state in a file: (section kind, plugin name) -> how. A test checks
# that every registered plugin with a ``db`` option is listed.
STATE_FILES: dict[tuple[str, str], StateFileUse] = {
    ("input", "tail"): StateFileUse(
        "db",
        "each tail keeps its files' offsets there, and without a scope of its own one tail would take "
        "the other's files for its own (their lines under its tag) and drop their offsets",
        shareable=True,
    ),
    ("input", "kubernetes_events"): StateFileUse(
        "db",
        "the Events checkpoint and delivered keys are kept per API and namespace, not per input: one "
        "input would resume from the other's resourceVersion and skip Events the other delivered",
    ),
    ("input", "systemd"): StateFileUse(
        "db", "the journal cursor is one row per file: each input would resume from the other's cursor"
    ),
    ("filter", "kubernetes_audit"): StateFileUse(
        "db",
        "the delivered (auditID, stage) keys are one set per file: one filter would drop as repeated "
        "the audit events the other delivered (one filter can take the webhook and the log file)",
        used=lambda section: _flag(section, "dedupe", True),
    ),
    ("output", "sqlite"): StateFileUse(
        "path",
        "a store has one writer (it holds a lock for its whole life): the second output would be refused "
        "at start and retry for ever, its records never delivered; match both tags in one sqlite output",
    ),
}


@dataclass(frozen=True)
class _Claim:
    section: Section
    kind: str  # input, filter, output, processor
    plugin: str
    use: StateFileUse
    path: str  # as written

    def __str__(self) -> str:
        alias = self.section.get("alias")
        named = f" {alias!r}" if alias else ""
        return f"{self.kind} {self.plugin}{named} ({self.section.location})"


def _file_key(path: str) -> tuple[object, ...]:
    """One key per file: its device and inode when it exists (hard links too), else its real path."""
    real = os.path.realpath(os.path.expanduser(path))
    try:
        st = os.stat(real)
    except OSError:
        return ("path", real)
    return ("inode", st.st_dev, st.st_ino)


def _claims(config: PipelineConfig) -> list[_Claim]:
    groups: list[tuple[str, str, list[Section]]] = [
        ("input", "input", config.inputs),
        ("filter", "filter", config.filters),
        ("output", "output", config.outputs),
    ]
    # YAML processors are filters bound to one input or output.
    for owner in (*config.inputs, *config.outputs):
        groups.append(("filter", "processor", config.processors_of(owner)))
    claims = []
    for kind, label, sections in groups:
        for section in sections:
            use = STATE_FILES.get((kind, section.plugin_name))
            if use is None:
                continue
            path = (section.get(use.option) or "").strip()
            # ":memory:" is a private database per connection: nothing to share.
            if path and path != ":memory:" and use.used(section):
                claims.append(_Claim(section, label, section.plugin_name, use, path))
    return claims


def _sharing_problem(first: _Claim, other: _Claim) -> str | None:
    """Why ``other`` cannot use the file ``first`` uses too (None: it can)."""
    if not (first.use.shareable and other.use.shareable and first.plugin == other.plugin):
        return f"{other.use.harm}. Give each its own {other.use.option}"
    aliases = [(claim.section.get("alias") or "").strip() for claim in (first, other)]
    if not all(aliases):
        return (
            f"{other.use.harm}. Give each its own {other.use.option}, or give each an alias "
            "(its rows in the shared db are kept under it)"
        )
    if aliases[0] == aliases[1]:
        return f"both have alias {aliases[0]!r}, the scope of their rows in the db; give each its own alias"
    modes = [(claim.section.get("db.journal_mode") or "wal").strip().lower() for claim in (first, other)]
    if modes[0] != modes[1]:
        return f"db.journal_mode {modes[0]} and {modes[1]}: one file has one journal mode; set the same on both"
    if _flag(first.section, "db.locking", False) or _flag(other.section, "db.locking", False):
        return "db.locking on holds the file for one connection only; turn it off or give each its own db"
    return None


def check_state_files(config: PipelineConfig) -> None:
    """Refuse a config in which two plugins would keep state in the same file (see the module
    docstring): a :class:`ConfigError` naming both, the file and what to do."""
    seen: dict[tuple[object, ...], list[_Claim]] = {}
    for claim in _claims(config):
        earlier = seen.setdefault(_file_key(claim.path), [])
        for first in earlier:
            problem = _sharing_problem(first, claim)
            if problem is not None:
                raise ConfigError(
                    f"{first} and {claim} both keep their state in {claim.path}: {problem}",
                    claim.section.location_of(claim.use.option),
                    claim.use.option,
                )
        earlier.append(claim)
