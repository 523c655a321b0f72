"""The ``file`` output: Fluent Bit's formats, and fsync before a batch is acknowledged.

Writes happen in a worker thread (``asyncio.to_thread``) so an fsync on a slow disk never
stalls the event loop that is still reading inputs. Batches queued for the same file are
written by one call with one fsync (``write_group``, a group commit: the sink runner collects
them); each is acknowledged after that fsync. Open files are kept in a small LRU since the file
name may come from the tag (one file per tag, as in Fluent Bit).
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import stat
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from kubetrail.core.component import ComponentContext, Sink
from kubetrail.core.dates import epoch_text
from kubetrail.core.errors import ConfigError, RetryableError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record, decode_body
from kubetrail.sinks.json_format import framed_lines, times_bytes

MAX_OPEN_FILES = 64
_DELIMITERS = {"\\t": "\t", "tab": "\t", "space": " ", "comma": ",", ",": ",", " ": " ", "\t": "\t"}
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


try:  # optional (built from native/): out_file text framed from the block itself
    from kubetrail_native import write_framed
except ImportError:  # pragma: no cover - depends on the installation
    write_framed = None
try:  # a newer build: framed through one small reused buffer (see kubetrail.sinks.stdout)
    from kubetrail_native import write_framed_buffered
except ImportError:  # pragma: no cover - depends on the installation
    write_framed_buffered = None
try:  # optional (built from native/): csv, ltsv and template text written from the block's lines
    from kubetrail_native import FieldsWriter
except ImportError:  # pragma: no cover - depends on the installation (or an older build)
    FieldsWriter = None


@dataclass(frozen=True)
class _Fields:
    """A block to write as ``csv``/``ltsv``/``template`` text, formatted natively on the way to
    the file (``FieldsWriter.write``)."""

    block: bytes
    times: Sequence[int]
    # The lines' top-level members as the parser's scan kept them (LineMembers), or None.
    members: Any = None


@dataclass(frozen=True)
class _Framed:
    """A block to write as ``out_file`` text, framed on the way to the file (``write_framed_buffered``)."""

    block: bytes
    times: bytes
    tag: bytes


def _sync(fd: int) -> None:
    """fsync, where the file can be synced: a pipe or a device (EINVAL: "does not support
    synchronization") has nothing on disk to wait for, and must not be retried forever."""
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


class FileSink(Sink):
    plugin_name = "file"
    description = "Writes records to files, fsynced before acknowledging"
    options = (
        Option("path", help="Directory of the output file (default: the working directory)"),
        Option("file", help="File name (default: the record's tag)"),
        Option("format", "choice", "out_file", choices=("out_file", "plain", "csv", "ltsv", "template")),
        Option("delimiter", help="csv: , (default), tab or space; ltsv: tab (default)"),
        Option("label_delimiter", "str", ":", help="ltsv: between label and value"),
        Option("template", "str", "{time} {message}", help="template: {key} placeholders, {time} is the time"),
        Option("csv_column_names", "bool", False, help="csv: write a header line in a new file"),
        Option("mkdir", "bool", False, help="Create the directory (0755) if it does not exist"),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.directory = Path(config["path"]) if config["path"] else Path.cwd()
        self.file_name: str | None = config["file"]
        self.format: str = config["format"]
        self.mkdir: bool = config["mkdir"]
        default_delimiter = "\t" if self.format == "ltsv" else ","
        raw_delimiter = config["delimiter"]
        if raw_delimiter is None:
            self.delimiter = default_delimiter
        elif raw_delimiter.lower() in _DELIMITERS:
            self.delimiter = _DELIMITERS[raw_delimiter.lower()]
        else:
            raise ConfigError(f"bad delimiter {raw_delimiter!r}; allowed: comma, tab, space", key="delimiter")
        self.label_delimiter: str = config["label_delimiter"]
        self.template: str = config["template"]
        self.csv_header: bool = config["csv_column_names"]
        self._files: OrderedDict[Path, IO[bytes]] = OrderedDict()
        self._formatter: Callable[[Record], bytes] = {
            "out_file": self._format_out_file,
            "plain": self._format_plain,
            "csv": lambda r: self._format_csv(r.time_ns, r.body),
            "ltsv": lambda r: self._format_ltsv(r.time_ns, r.body),
            "template": lambda r: self._format_template(r.time_ns, r.body),
        }[self.format]
        # The formats that need the fields, from a block's lines and times (no Record per line).
        self._body_formatter: Callable[[int, dict[str, Any]], bytes] | None = {
            "csv": self._format_csv,
            "ltsv": self._format_ltsv,
            "template": self._format_template,
        }.get(self.format)
        # The same three formats natively, byte for byte (native/src/fieldtext.rs); the lines it
        # leaves (a float, a repeated key, ...) go through the body formatter above.
        self._fields_writer: Any = None
        if self._body_formatter is not None and FieldsWriter is not None:
            kind = ("csv", "ltsv", "template").index(self.format)
            pieces = [piece.encode() for piece in _PLACEHOLDER.split(self.template)]
            self._fields_writer = FieldsWriter(
                kind, self.delimiter.encode(), self.label_delimiter.encode(), pieces if kind == 2 else []
            )

    async def start(self) -> None:
        await asyncio.to_thread(self._check_directory)

    def _check_directory(self) -> None:
        if not self.directory.is_dir():
            if not self.mkdir:
                raise RetryableError(f"output directory {self.directory} does not exist (set 'mkdir on' to create it)")
            try:
                self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
            except OSError as exc:
                raise RetryableError(f"cannot create output directory {self.directory}: {exc.strerror}") from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise RetryableError(f"output directory {self.directory} is not writable")

    async def write(self, batch: Batch) -> None:
        await self.write_group([batch])

    def group_key(self, batch: Batch) -> object | None:
        return self._target(batch)

    async def write_group(self, batches: list[Batch]) -> None:
        """Batches queued for the same file: written together, one fsync (a group commit)."""
        pieces = [self._data(batch) for batch in batches]
        await asyncio.to_thread(self._write_sync, self._target(batches[0]), pieces, batches[0])

    def _target(self, batch: Batch) -> Path:
        return self.directory / (self.file_name or batch.tag)

    def _data(self, batch: Batch) -> bytes | _Framed | _Fields:
        if self.format in ("plain", "out_file"):
            block = batch.raw_block
            if block is not None:
                if self.format == "plain":
                    return block  # unmodified JSON lines: the input bytes are the output
                # The block's own times (see kubetrail.core.block): no record is built, and with
                # the native module the lines go to the file with writev, never copied.
                if write_framed is not None:
                    return _Framed(block, times_bytes(batch.block_times()), batch.tag.encode())
                return framed_lines(block, batch.block_times(), batch.tag)
        elif self._body_formatter is not None and not batch.is_materialized:
            lazy = batch.line_block
            if lazy is not None and self._fields_writer is not None:
                lazy.keep_members = True  # before validation: the parser's scan keeps them for us
            block = batch.raw_block
            if block is not None:
                if self._fields_writer is not None:
                    # The members are of the validated bytes only (not of a fallback's records).
                    members = lazy.members if lazy is not None and lazy.data() is block else None
                    return _Fields(block, batch.block_times(), members)
                return self._fields_from_block(block, batch.block_times())
        formatter = self._formatter
        return b"".join([formatter(record) for record in batch.records])

    def _fields_from_block(self, block: bytes, times: Sequence[int]) -> bytes:
        """``csv``/``ltsv``/``template`` text of a block's lines without the native module: each
        line decoded once for its fields, no Record holding both bytes and dict."""
        body_formatter = self._body_formatter
        assert body_formatter is not None
        lines = block.split(b"\n")
        return b"".join([body_formatter(t, decode_body(line)) for t, line in zip(times, lines)])  # noqa: B905

    def _write_fields(self, handle: IO[bytes], data: _Fields) -> None:
        """The block's lines formatted natively straight into the file; a line the native
        writer leaves (a float, a repeated key, ...) is formatted here, in its place."""
        body_formatter, writer = self._body_formatter, self._fields_writer
        assert body_formatter is not None and writer is not None
        handle.flush()  # what is buffered goes first
        times, first = times_bytes(data.times), 0
        lines: list[bytes] | None = None
        extra = () if data.members is None else (data.members,)  # an older build takes none
        while (stop := writer.write(handle.fileno(), data.block, times, first, *extra)) is not None:
            lines = lines or data.block.split(b"\n")
            handle.write(body_formatter(data.times[stop], decode_body(lines[stop])))
            handle.flush()
            first = stop + 1

    def _write_sync(self, target: Path, pieces: list[bytes | _Framed | _Fields], batch: Batch) -> None:
        size_before: int | None = None
        try:
            handle = self._open(target, batch)
            size_before = os.fstat(handle.fileno()).st_size
            for data in pieces:
                if isinstance(data, _Fields):
                    self._write_fields(handle, data)
                elif isinstance(data, _Framed):
                    handle.flush()  # what is buffered goes first (the file is opened to append)
                    framed = write_framed_buffered or write_framed
                    framed(handle.fileno(), data.block, data.times, data.tag)
                else:
                    handle.write(data)
            handle.flush()
            _sync(handle.fileno())
        except OSError as exc:
            stale = self._files.pop(target, None)
            if stale is not None:
                self._cut_back(stale, target, size_before)
            raise RetryableError(f"cannot write {target}: {exc.strerror or exc}") from None
        except ValueError:
            # A line no formatter could take (csv/ltsv/template: not JSON after all), found
            # after part of the batch was written: nothing of it stays in the file.
            stale = self._files.pop(target, None)
            if stale is not None:
                self._cut_back(stale, target, size_before)
            raise

    @staticmethod
    def _cut_back(handle: IO[bytes], target: Path, size: int | None) -> None:
        """After a failed write, cut what part of the batch reached the file: the retry writes
        the whole batch again, so a half line (or a whole copy, when only the fsync failed)
        must not stay in front of it. Closed first, since closing flushes Python's buffer."""
        try:
            handle.close()
        except OSError:
            pass  # the flush fails the same way; the truncation below still applies
        try:
            if size is not None:
                os.truncate(target, size)
        except OSError:
            pass  # the disk refuses even that: the retry still appends a complete batch

    def _open(self, target: Path, batch: Batch) -> IO[bytes]:
        handle = self._files.get(target)
        if handle is not None:
            self._files.move_to_end(target)
            return handle
        if self.mkdir:
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        handle = open(target, "ab")  # noqa: SIM115 - kept open across batches, closed in close()
        self._end_torn_line(handle, target)
        if self.csv_header and self.format == "csv" and handle.tell() == 0 and len(batch):
            header = [*batch.records[0].body.keys()]
            handle.write((self.delimiter.join(["time", *header]) + "\n").encode())
        self._files[target] = handle
        while len(self._files) > MAX_OPEN_FILES:
            _, oldest = self._files.popitem(last=False)
            oldest.close()
        return handle

    def _end_torn_line(self, handle: IO[bytes], target: Path) -> None:
        """A file that ends mid-line was cut short by a crash (kill -9, power loss) in the
        middle of a write. That batch was never acknowledged, so it comes again whole; the
        fragment is ended with a newline so that it does not run into the first line appended
        now and spoil it. The fragment itself is left: the file may hold lines of others.

        Only a regular file we may read is looked at (read through a second descriptor: the
        output's own is write-only, so that a write-only file, a pipe such as /dev/stdout, or
        a device can still be written)."""
        try:
            appended = os.fstat(handle.fileno())
            if not stat.S_ISREG(appended.st_mode) or appended.st_size == 0:
                return
            reader = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
            try:
                same = os.fstat(reader).st_ino == appended.st_ino
                last = os.pread(reader, 1, appended.st_size - 1) if same else b"\n"
            finally:
                os.close(reader)
        except OSError:
            return  # not readable: appended to as it is
        if last != b"\n":
            handle.write(b"\n")
            self.log.warning(
                "%s ended mid-line, a write cut short by a crash; the fragment is ended with a "
                "newline and its batch is written again whole",
                target,
            )

    async def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def _format_plain(self, record: Record) -> bytes:
        return record.json_bytes() + b"\n"

    def _format_out_file(self, record: Record) -> bytes:
        return f"{record.tag}: [{epoch_text(record.time_ns)}, ".encode() + record.json_bytes() + b"]\n"

    def _format_csv(self, time_ns: int, body: dict[str, Any]) -> bytes:
        fields = [epoch_text(time_ns)]
        for value in body.values():
            fields.append('"' + _text(value).replace('"', '""') + '"')
        return (self.delimiter.join(fields) + "\n").encode()

    def _format_ltsv(self, time_ns: int, body: dict[str, Any]) -> bytes:
        ld = self.label_delimiter
        fields = [f"time{ld}{epoch_text(time_ns)}"]
        for key, value in body.items():
            text = _text(value).replace(self.delimiter, " ").replace("\n", "\\n")
            fields.append(f"{key}{ld}{text}")
        return (self.delimiter.join(fields) + "\n").encode()

    def _format_template(self, time_ns: int, body: dict[str, Any]) -> bytes:
        def fill(match: re.Match[str]) -> str:
            key = match.group(1)
            if key == "time" and "time" not in body:
                return epoch_text(time_ns)
            if key in body:
                return _text(body[key])
            return ""

        return (_PLACEHOLDER.sub(fill, self.template) + "\n").encode()
