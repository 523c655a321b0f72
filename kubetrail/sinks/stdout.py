"""The ``stdout`` output, with Fluent Bit's ``format`` and ``json_date_*`` options.

A block (see :mod:`kubetrail.core.block`) in ``msgpack`` text or ``json_lines`` goes to the
stream's file descriptor without a framed copy as large as the input, in a worker thread (as the
file output writes; see ``write`` for why). ``msgpack`` text is framed in one pass through a
256 KiB buffer reused for every write (``kubetrail_native.write_framed_buffered``): each line's
``[N] TAG: [TIME, `` formatted and the line copied after it while the buffer stays in the CPU's
cache, one ``write`` per 256 KiB; ``writev`` from the block (``write_framed``) spent ~0.025 s
more CPU per 266 MB on its per-line slice list and prefixes. ``json_lines`` with a date goes
through the same buffer (``write_dated_lines_buffered``: ``{"date":...,`` then the line's
members). Anything else (a stream without a descriptor, records, ``json``/``json_stream``) is
encoded into one bytes object.
"""

from __future__ import annotations

import asyncio
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
try:  # optional (a newer native build): msgpack text framed through a small reused buffer
    from kubetrail_native import write_framed_buffered
except ImportError:  # pragma: no cover - depends on the installation
    write_framed_buffered = None
try:  # optional (a newer native build): json_lines with a date through the same buffer
    from kubetrail_native import write_dated_lines_buffered
except ImportError:  # pragma: no cover - depends on the installation
    write_dated_lines_buffered = None


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
        first = self._counter
        if self.format == "msgpack":
            self._counter += len(batch)  # numbered now: a batch another worker writes meanwhile follows
        args = self._block_args(batch, first)
        # In a worker thread, as the file output writes: the event loop reads the next block
        # meanwhile. Written inline, each batch's buffers were freed before the next was read,
        # glibc's heap shrank and grew again every batch, and the fresh pages cost ~0.1 s of
        # page faults per 266 MB (72,700 minor faults against `format plain`'s ~21,000).
        if args is not None and await asyncio.to_thread(self._write_block, *args):
            return
        block = batch.raw_block if self.format == "msgpack" else None
        if self.format in JSON_FORMATS:
            out = encode_batch(batch, self.format, self.date_key, self.date_format)
        elif block is not None:  # the block and its times: no record built
            out = framed_lines(block, batch.block_times(), batch.tag, first)
        else:
            lines = []
            for n, record in enumerate(batch.records, first):
                lines.append(
                    f"[{n}] {record.tag}: [{epoch_text(record.time_ns)}, ".encode() + record.json_bytes() + b"]\n"
                )
            out = b"".join(lines)
        self.stream.write(out)
        self.stream.flush()

    def _block_args(self, batch: Batch, first: int) -> tuple[int, bytes, bytes, bytes, int] | None:
        """``(fd, block, times, tag or key text, first)`` for :meth:`_write_block`; None when
        that path does not apply (no native writer or block, a stream without a descriptor)."""
        if self._writev is None or write_framed is None:
            return None
        block = batch.raw_block
        if block is None:
            return None
        fd = self._fileno()
        if fd is None:
            return None
        style, text = self._writev
        self.stream.flush()  # anything buffered goes first
        return fd, block, times_bytes(batch.block_times()), batch.tag.encode() if style == 1 else text, first

    def _write_block(self, fd: int, block: bytes, times: bytes, text: bytes, first: int) -> bool:
        """The block framed onto ``fd`` (in a worker thread); False when the framing refuses it
        (e.g. a line that is not an object, for a date): nothing was written then."""
        assert self._writev is not None
        style = self._writev[0]
        try:
            if style == 1 and write_framed_buffered is not None:
                write_framed_buffered(fd, block, times, text, first)
            elif style in (2, 3) and write_dated_lines_buffered is not None:
                write_dated_lines_buffered(fd, block, times, text, style)
            elif style == 1:
                write_framed(fd, block, times, text, first)
            else:
                write_framed(fd, block, times, text, None, style)
        except ValueError:
            return False
        return True
