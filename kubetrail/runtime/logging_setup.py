"""kubetrail's own logs: one JSON object per line on stderr.

Structured lines because the people running kubetrail ship its logs with kubetrail (or another
collector) too. Fluent Bit's ``log_level`` words are accepted (``off``, ``error``, ``warn``,
``info``, ``debug``, ``trace``). Extra fields passed with ``extra={...}`` become keys.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

LEVELS = {
    "off": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG - 5,
}

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower().replace("warning", "warn"),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def setup_logging(level: str = "info") -> None:
    root = logging.getLogger("kubetrail")
    root.setLevel(LEVELS.get(level.lower(), logging.INFO))
    if not any(getattr(h, "_kubetrail", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonLineFormatter())
        handler._kubetrail = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False
