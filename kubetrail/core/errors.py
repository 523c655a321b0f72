"""Error types shared across layers.

Config errors carry the file and line they came from, because a user with a 300-line Fluent Bit
config needs to be told *where* the problem is, not just what it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Location:
    """Where a config value was written."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class ConfigError(Exception):
    """A configuration problem found before anything starts (exit code 2)."""

    def __init__(self, message: str, location: Location | None = None, key: str | None = None) -> None:
        self.message = message
        self.location = location
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location else ""
        key = f"'{self.key}': " if self.key else ""
        return f"{where}{key}{self.message}"


class RetryableError(Exception):
    """A delivery failure that may succeed later (5xx, timeout, full disk, connection refused).

    ``retry_after`` (seconds, optional): the destination asked for this wait (HTTP 429/503
    ``Retry-After``); the runner then waits at least that long, at most ``scheduler.cap``.
    """

    def __init__(self, *args: object, retry_after: float | None = None) -> None:
        super().__init__(*args)
        self.retry_after = retry_after


class PermanentError(Exception):
    """A delivery failure that retrying cannot fix (the payload itself was rejected).

    ``rejected``: when the destination refused only some records of a batch (an es ``_bulk``
    item with a mapping error), the ``(record, reason)`` pairs it refused; every other record
    of the batch was delivered. ``None`` means the whole batch was refused.
    """

    def __init__(self, message: str, rejected: list[tuple[Any, str]] | None = None) -> None:
        super().__init__(message)
        self.rejected = rejected
