"""A batch of JSON lines that stays one block of bytes until someone needs records.

This is the whole raw-block mechanism; every parser, filter and sink uses it the same way.

**Why.** Per-record Python work is the budget of a Python collector. A tailed file of JSON lines
that no filter changes can go from ``read()`` to ``write()`` as the block it was read as: no
dict, no ``Record`` per line. So a parser that can (``json``; ``regex``, which turns its lines
into JSON lines natively) hands the tail a :class:`LineBlock` instead of records, and
:class:`~kubetrail.core.record.Batch` carries it.

**Following a batch from tail to sink.** A :class:`LineBlock` knows three things:

* ``source``: the lines as read (newline-terminated, one future record per line, no blank
  line: the tail parses a block with blank lines line by line, so ``count`` is exact from the
  start and routing and metrics never need more);
* :meth:`LineBlock.validate`, run at most once, on first need: whether every line is a record of
  this parser, and the block's final bytes (a parser may change them: a ``json`` parser with
  ``time_key`` and ``time_keep off`` cuts the key out of each line natively, a ``regex`` parser
  writes each line's groups as JSON). While doing so it takes each line's time, so ``times`` is
  known without a record;
* :meth:`LineBlock.build`: the records, one per validated line, each with its line as ``raw``.

What asks for what:

* a **sink** writing JSON lines reads ``batch.raw_block``: the validated bytes (``None`` when
  the batch has records that no longer match a block). Formats that frame each line with its
  time (``out_file``, stdout's ``msgpack`` text, the ``json`` family with a date) also read
  ``batch.block_times()``, and so do ``csv``/``ltsv``/``template``, whose fields the native
  writer takes from each line's bytes: none of them builds a record. That writer also sets
  ``keep_members`` before asking, and a parser whose validation walks each line (``json``
  with a ``time_format``) then keeps the lines' top-level member spans in ``members`` for it;
  without them (validated earlier, another parser) the writer walks the lines itself;
* a **filter** that works on records reads ``batch.records``, which validates and builds;
* a **filter that decodes every line itself** (``kubernetes_audit``'s native scan) reads
  ``batch.pending_block()``: the source bytes *before* validation, offered only while they are
  known to be the final bytes too (no parser rewriting them). Its own decoding is then the
  validation, so a line is parsed once; when it meets a line it cannot take, it falls back to
  ``batch.raw_block`` / ``batch.records`` like any filter. Nobody has to declare anything and
  the router does nothing for blocks: validation happens where it is first needed.

**Bad input.** When validation fails (a line that is not JSON, a repeated time key, a time the
native scan cannot decide and the parser must cut), the batch takes ``fallback()`` instead:
the source's line-by-line records, where bad lines are kept under ``log`` and counted. Nothing
is dropped; only the fast path is lost for that block.

**Identities.** ``identity`` is ``(uid, offset of the block's first line)``: built records get
``(uid, offset of their line in source)``, the tail's ``(file uid, byte offset)``.

**Lines with no parser.** A tail with no ``parser`` hands its lines as a :class:`TextBlock`:
each line is the record ``{key: line}``, so validation writes those JSON lines (natively, one
call) and every record has the time the block was read. Its ``source`` is text, not JSON, so
``rewrites`` is set and :meth:`Batch.pending_block` never offers it. A filter that works on
lines of text (``multiline``) reads the block itself (``batch.line_block``, a
:class:`TextBlock` while nobody built its records) and hands on a block of its own output
(:class:`ReadyBlock` with ``times``); anything else reads records or ``raw_block`` as usual.

**Canonical lines.** ``canonical`` says that each line of :meth:`LineBlock.data` is exactly
what orjson writes for its record's body (compact, no member repeated), as the container
joiners and :class:`TextBlock` write them. A filter that only adds members to every record
(``kubernetes``: the pod's metadata) may then splice them in before each line's closing brace
and hand on a canonical block of its own: the record path's bytes, without its records.

**Container runtime pieces** (``multiline.parser cri``, ``docker``). The joiner holds pieces across reads,
so a read's lines are not one record each: the tail's joiner writes the finished records of a
read as JSON lines in one native call and hands on a :class:`ReadyBlock` with their times and a
``build`` that makes each record from its line with its first piece's identity
(:meth:`kubetrail.parsers.multiline.ContainerLogJoiner.process_block`).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from kubetrail.core.record import Batch, Record

try:  # optional (built from native/): a block of text lines as JSON lines in one call
    from kubetrail_native import text_json_lines
except ImportError:  # pragma: no cover - depends on the installation (or an older build)
    text_json_lines = None
try:  # optional (built from native/): UTF-8 validation with SIMD
    from kubetrail_native import valid_utf8 as _native_valid_utf8
except ImportError:  # pragma: no cover - depends on the installation (or an older build)
    _native_valid_utf8 = None


def _valid_utf8(data: bytes) -> bool:
    if data.isascii():  # one C pass, most blocks
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


# Whether ``data`` is UTF-8 throughout. msgspec, which validates the JSON blocks, does not check
# the UTF-8 of the members it skips, while orjson (a record's body) refuses such a line: a block
# that holds one is not taken whole, and the line-by-line path repairs the line. Natively with
# SIMD where built: 300,000 audit lines (266 MB) in blocks just read take 3 ms, 8 ms with isascii.
valid_utf8: Callable[[bytes], bool] = _native_valid_utf8 if _native_valid_utf8 is not None else _valid_utf8


class LineBlock:
    """Newline-terminated JSON lines, one record each; validated and built only on demand.

    Subclasses (a parser's) override :meth:`validate` and :meth:`build`; ``rewrites`` says
    whether validation may change the bytes (then ``Batch.pending_block`` withholds them).
    """

    __slots__ = (
        "_data",
        "canonical",
        "count",
        "fallback",
        "identity",
        "keep_members",
        "members",
        "report",
        "rewrites",
        "source",
        "times",
    )

    def __init__(self, source: bytes, count: int) -> None:
        self.source = source
        self.count = count
        # Each line's time in ns once validated, None before (or when only records know them).
        self.times: array[int] | None = None
        # Set by the source: its line-by-line batch, used when validation fails.
        self.fallback: Callable[[], Batch] | None = None
        # Set by the source: (uid, offset of the first line); records get (uid, line offset).
        self.identity: tuple[Any, int] | None = None
        # Set by the source: called with (kind, count) for bad input found while validating.
        self.report: Callable[[str, int], None] | None = None
        self._data: bytes | bool | None = False  # False: not validated yet
        self.rewrites = False  # True when validation may change the bytes (a parser cuts a key)
        self.canonical = False  # True: each line of data() is orjson's bytes of its record's body
        # Set before validation by a sink whose native writer reads each line's top-level
        # members (``FieldsWriter``: csv, ltsv, template); a parser whose scan walks the lines
        # anyway then keeps them in ``members`` (``kubetrail_native.LineMembers``, of the bytes
        # ``data()`` returns), so the line is not walked a second time. None: not kept.
        self.keep_members = False
        self.members: Any = None

    def validate(self) -> bytes | None:
        """The final bytes when every line is a record as this block expects, else None. Called
        at most once (by :meth:`data`); sets ``times`` when it can."""
        return self.source

    def build(self, data: bytes) -> list[Record]:
        """One record per line of ``data`` (validated), each with that line as its ``raw``."""
        raise NotImplementedError

    def line_times(self) -> Sequence[int] | None:
        """Each line's time in ns after validation, if the block knows them without records."""
        return self.times

    def data(self) -> bytes | None:
        """The validated bytes (None: validation failed, the fallback applies)."""
        data = self._data
        if data is False:
            data = self._data = self.validate()
        return data  # type: ignore[return-value]

    def records(self) -> list[Record] | None:
        """The records (None: validation failed, the fallback applies)."""
        data = self.data()
        if data is None:
            return None
        records = self.build(data)
        if self.identity is not None:
            uid, position = self.identity
            lines = self.source.split(b"\n")
            for record, line in zip(records, lines):  # noqa: B905 - split has one extra b""
                record.identity = (uid, position)
                position += len(line) + 1
        return records


class ReadyBlock(LineBlock):
    """A block already known to be valid, with a function that builds its records (a filter's
    output block, a block read back from the filesystem buffer)."""

    __slots__ = ("_build",)

    def __init__(self, data: bytes, count: int, build: Callable[[], list[Record]]) -> None:
        super().__init__(data, count)
        self._data = data
        self._build = build

    def build(self, data: bytes) -> list[Record]:
        return self._build()


class TextBlock(LineBlock):
    """Lines of text read with no parser: each line is the record ``{key: line}`` (invalid
    UTF-8 replaced by U+FFFD), all with the time the block was read (``time_ns``), as the
    tail's line-by-line path makes them. ``crlf``: the file ends its lines with CRLF (its first
    line does), so each line's ``\\r`` is cut, as on that path; a CRLF block holding a line
    that is only ``\\r`` (a blank line there) must not be made a TextBlock."""

    __slots__ = ("crlf", "key", "tag", "time_ns")

    def __init__(self, source: bytes, count: int, tag: str, key: str, time_ns: int, crlf: bool) -> None:
        super().__init__(source, count)
        self.tag = tag
        self.key = key
        self.time_ns = time_ns
        self.crlf = crlf
        self.rewrites = True  # the source is text; the JSON lines are made by validation
        self.canonical = True  # ... as orjson writes {key: text}

    def json_prefix(self) -> bytes:
        """``{"key":"``: what each record's JSON line starts with (orjson's escaping of the key)."""
        return orjson.dumps({self.key: ""})[:-2]

    def validate(self) -> bytes | None:
        self.times = array("q", [self.time_ns]) * self.count
        if text_json_lines is not None:
            data: bytes = text_json_lines(self.source, self.json_prefix(), self.crlf)
            return data
        dumps, key = orjson.dumps, self.key
        return b"".join([dumps({key: text}) + b"\n" for text in self.texts()])

    def texts(self, lines: list[bytes] | None = None) -> list[str]:
        """Each line's text (of ``lines``, lines of the source; default all), as its record has it."""
        if lines is None:
            lines = self.source.split(b"\n")
            lines.pop()  # the empty string after the final newline
        if self.crlf:
            lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
        return [line.decode("utf-8", "replace") for line in lines]

    def line_records(self, begin: int = 0, end: int | None = None) -> list[Record]:
        """The records of the whole lines in ``source[begin:end]``, with their identities (a
        filter that takes the block holds a few of them: a message open at its start or end)."""
        from kubetrail.core.record import Record  # here: record.py imports this module

        lines = self.source[begin:end].split(b"\n")
        lines.pop()  # the empty string after the final newline
        tag, now, key = self.tag, self.time_ns, self.key
        records = [Record(tag, now, {key: text}) for text in self.texts(lines)]
        if self.identity is not None:
            uid, position = self.identity
            position += begin
            for record, line in zip(records, lines, strict=True):
                record.identity = (uid, position)
                position += len(line) + 1
        return records

    def build(self, data: bytes) -> list[Record]:
        return self.line_records()
