"""Dead letters: records an output will never take, kept on disk with the reason instead of lost.

Fluent Bit's names: ``storage.keep.rejected`` and ``storage.rejected.path`` (a directory under
``storage.path``, default ``rejected``) in ``[SERVICE]``. Fluent Bit copies each rejected chunk
into its own ``.flb`` file in its internal format; kubetrail writes JSON lines a person (or
``jq``, or a ``tail`` input) can read, one file per output (``<output id>.jsonl``), one line per
record::

    {"rejected_at": "2026-...Z", "output": "es.0", "tag": "kube.audit", "reason": "retry_limit: ...",
     "time": 1732790000.123456, "identity": [...], "record": {...the record...}}

What goes there, as in Fluent Bit: a batch the output rejected permanently
(:class:`~kubetrail.core.errors.PermanentError`; with ``rejected`` set, only those records), and a
batch whose ``retry_limit`` is used up. A line is fsynced before the batch counts as handled, so
the source's checkpoint (or the audit webhook's 200) never gets ahead of the dead letter. If the
dead-letter file itself cannot be written, the batch is counted as dropped and that is logged:
the dead-letter queue must never be the reason the pipeline stops.

Default: on when ``storage.path`` is set (Fluent Bit: off). kubetrail's promise is that nothing
is lost silently; ``storage.keep.rejected off`` restores Fluent Bit's behaviour (count, log, drop).

Why in ``core``: the runtime decides the policy (whether, and where: it builds one writer per
input and output and hands it over in :class:`~kubetrail.core.component.ComponentContext`), but
inputs write dead letters too (the ``kafka`` input's messages not valid for its ``format``),
and plugins import only ``core`` and what sits beside them, never the runtime above them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import orjson

from kubetrail.core.metrics import ComponentMetrics
from kubetrail.core.record import Record

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class DeadLetters:
    def __init__(self, directory: Path, component_id: str, metrics: ComponentMetrics, logger: logging.Logger) -> None:
        self.directory = directory
        self.path = directory / (_UNSAFE.sub("_", component_id) + ".jsonl")
        self.component_id = component_id
        self.metrics = metrics
        self.log = logger
        self.m_dead = metrics.counter(
            "kubetrail_records_dead_lettered", "Records written to the dead-letter file, by reason", "reason"
        )

    async def write(self, records: Iterable[tuple[Record, str]], kind: str) -> bool:
        """Append ``(record, reason)`` pairs; True once they are fsynced."""
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        output = orjson.dumps(self.component_id)
        lines: list[bytes] = []
        for record, reason in records:
            head = {
                "rejected_at": stamp,
                "tag": record.tag,
                "reason": reason,
                "time": record.time_ns / 1e9,
                "identity": list(record.identity) if record.identity is not None else None,
            }
            try:
                body = record.json_bytes()
            except (TypeError, orjson.JSONEncodeError):
                body = orjson.dumps(repr(record.body_))
            lines.append(b'{"output":' + output + b"," + orjson.dumps(head, default=str)[1:-1] + b',"record":' + body)
        if not lines:
            return True
        data = b"}\n".join(lines) + b"}\n"
        try:
            await asyncio.to_thread(self._append, data)
        except OSError as exc:
            self.metrics.error("dead_letter")
            self.log.error(
                "cannot write the dead-letter file; records dropped",
                extra={"path": str(self.path), "error": exc.strerror or str(exc), "records": len(lines)},
            )
            return False
        self.m_dead.labels(kind).inc(len(lines))
        return True

    def _append(self, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
