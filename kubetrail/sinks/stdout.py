"""The ``stdout`` output, with Fluent Bit's ``format`` and ``json_date_*`` options."""

from __future__ import annotations

import sys
from typing import Any, BinaryIO

from kubetrail.core.component import ComponentContext, Sink
from kubetrail.core.dates import epoch_text
from kubetrail.core.options import Option
from kubetrail.core.record import Batch
from kubetrail.sinks.json_format import JSON_DATE_OPTIONS, JSON_FORMATS, date_key_option, encode_batch, framed_lines


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
        *JSON_DATE_OPTIONS,
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any], stream: BinaryIO | None = None) -> None:
        super().__init__(ctx, config)
        self.format = config["format"]
        self.date_key = date_key_option(config["json_date_key"])
        self.date_format = config["json_date_format"]
        self.stream = stream or sys.stdout.buffer
        self._counter = 0

    async def write(self, batch: Batch) -> None:
        block = batch.raw_block if self.format == "msgpack" else None
        if self.format in JSON_FORMATS:
            out = encode_batch(batch, self.format, self.date_key, self.date_format)
        elif block is not None:  # the block and its times: no record built
            out = framed_lines(block, batch.block_times(), batch.tag, self._counter)
            self._counter += len(batch)
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
