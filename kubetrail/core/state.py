"""The SQLite state file (``db``) that makes restarts resume instead of replaying.

One file per input, as in Fluent Bit, opened with Fluent Bit's ``db.sync``,
``db.journal_mode`` and ``db.locking`` options. Writes are small (a checkpoint per delivered
batch) and run on the event loop thread: in WAL mode with ``synchronous=NORMAL`` a commit is
tens of microseconds, cheaper than handing it to a thread.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from kubetrail.core.options import Option

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
