"""The ``stdout`` output, with Fluent Bit's ``format`` and ``json_date_*`` options."""

from __future__ import annotations

import sys
from typing import Any, BinaryIO

import orjson

from kubetrail.core.component import ComponentContext, Sink
from kubetrail.core.dates import DATE_FORMATS, epoch_text, format_date
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record


def with_date(record: Record, date_key: str | None, date_format: str) -> bytes:
    """The record as JSON with its time under ``date_key``, reusing the original bytes."""
    raw = record.json_bytes()
    if not date_key:
        return raw
    prefix = orjson.dumps({date_key: format_date(record.time_ns, date_format)})[:-1]
    if raw == b"{}":
        return prefix + b"}"
    return prefix + b"," + raw[1:]


class StdoutSink(Sink):
    plugin_name = "stdout"
    description = "Prints records to standard output"
    options = (
        Option(
            "format",
            "choice",
            "msgpack",
            choices=("msgpack", "json", "json_lines", "json_stream"),
            help="msgpack prints Fluent Bit's '[N] tag: [time, record]' lines",
        ),
        Option("json_date_key", "str", "date", help="Key for the time in json formats; 'false' to leave it out"),
        Option("json_date_format", "choice", "double", choices=DATE_FORMATS),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any], stream: BinaryIO | None = None) -> None:
        super().__init__(ctx, config)
        self.format = config["format"]
        key = config["json_date_key"]
        self.date_key = None if key is None or key.lower() in ("false", "off", "") else key
        self.date_format = config["json_date_format"]
        self.stream = stream or sys.stdout.buffer
        self._counter = 0

    async def write(self, batch: Batch) -> None:
        if self.format == "json":
            records = batch.records
            out = b"[" + b",".join(with_date(r, self.date_key, self.date_format) for r in records) + b"]\n"
        elif self.format == "json_lines" and self.date_key is None and batch.raw_block is not None:
            out = batch.raw_block
        elif self.format == "json_lines":
            records = batch.records
            out = b"".join(with_date(r, self.date_key, self.date_format) + b"\n" for r in records)
        elif self.format == "json_stream":
            records = batch.records
            out = b"".join(with_date(r, self.date_key, self.date_format) for r in records)
        else:
            lines = []
            for record in batch.records:
                lines.append(
                    f"[{self._counter}] {record.tag}: [{epoch_text(record.time_ns)}, ".encode()
                    + record.json_bytes()
                    + b"]\n"
                )
                self._counter += 1
            out = b"".join(lines)
        self.stream.write(out)
        self.stream.flush()
