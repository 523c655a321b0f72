"""The ``stdout`` output, with Fluent Bit's ``format`` and ``json_date_*`` options.

A block (see :mod:`kubetrail.core.block`) in ``msgpack`` text or ``json_lines`` goes to the
stream's file descriptor with ``writev`` (``kubetrail_native.write_framed``, the file output's
way): each line straight from the block, only the small ``[N] TAG: [TIME, `` or
``{"date":TIME,`` prefixes formatted, no framed copy as large as the input. Anything else (a
stream without a descriptor, records, ``json``/``json_stream``) is encoded into one bytes object.
"""

from __future__ import annotations

import io
import sys
from typing import Any, BinaryIO

from kubetrail.core.component import ComponentContext, Sink
from kubetrail.core.dates import epoch_text
from kubetrail.core.options import Option
from kubetrail.core.record import Batch
from kubetrail.sinks.json_format import (
    JSON_DATE_OPTIONS,
    JSON_FORMATS,
    block_framing,
    date_key_option,
    encode_batch,
    framed_lines,
    times_bytes,
)

try:  # optional (built from native/): framed lines written with writev from the block itself
    from kubetrail_native import write_framed
except ImportError:  # pragma: no cover - depends on the installation
    write_framed = None


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
        # (style, text) for write_framed when this format can go out by writev; None otherwise.
        self._writev: tuple[int, bytes] | None = None
        if self.format == "msgpack":
            self._writev = (1, b"")  # the tag is the batch's
        elif self.format == "json_lines" and self.date_key is not None:
            spec = block_framing(self.format, self.date_key, self.date_format)
            if spec is not None:
                self._writev = (spec[0], spec[1])

    def _fileno(self) -> int | None:
        try:
            return self.stream.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            return None  # an in-memory stream (tests, embedding)

    async def write(self, batch: Batch) -> None:
        if self._writev is not None and write_framed is not None and self._write_block(batch):
            return
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

    def _write_block(self, batch: Batch) -> bool:
        """The batch's block framed onto the stream's descriptor; False when that path does not
        apply (no block, no descriptor, or a line the framing refuses: nothing written then)."""
        assert self._writev is not None
        block = batch.raw_block
        if block is None:
            return False
        fd = self._fileno()
        if fd is None:
            return False
        style, text = self._writev
        times = times_bytes(batch.block_times())
        self.stream.flush()  # anything buffered goes first
        try:
            if style == 1:
                write_framed(fd, block, times, batch.tag.encode(), self._counter)
            else:
                write_framed(fd, block, times, text, None, style)
        except ValueError:
            return False  # refused before writing anything (e.g. a line that is not an object)
        if style == 1:
            self._counter += len(batch)
        return True
