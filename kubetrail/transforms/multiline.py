"""The ``multiline`` filter: join records that belong to one message (stack traces, split lines).

Fluent Bit's options: ``multiline.parser`` (repeatable, comma lists: the built-in ``go``,
``python``, ``java``, ``ruby``, ``docker``, ``cri``, or a ``[MULTILINE_PARSER]`` name),
``multiline.key_content`` (the key holding the text), ``mode`` (``parser``, or
``partial_message`` for the docker fluentd log driver's ``partial_message``/``partial_id``/
``partial_last`` keys), ``buffer``, ``flush_ms``, ``emitter_name``, ``emitter_storage.type``,
``emitter_mem_buf_limit``.

One joiner per kind, no second one: the regex parsers are the state machine of
:mod:`kubetrail.parsers.multiline_rules`; ``cri``/``docker`` feed the text to the container log
joiner the tail uses (:class:`kubetrail.parsers.multiline.ContainerLogJoiner`, which joins
pieces per stream and decodes them once).

**State per tag.** A message is one tag's records in order (Fluent Bit keys its streams the
same way). The joined record is the first piece's record with the joined text under the key.

**Buffering and acknowledgements.** Within a batch, a message that ends there is joined in
place. With ``buffer off`` (Fluent Bit: each chunk on its own) a message still open at the end
of a batch goes out as it is. With ``buffer on`` (the default, as in Fluent Bit) it is held:
the filter keeps one reference on the token of every batch whose records it holds, so those
sources' checkpoints cannot move past them. It ends when a later batch of the tag brings the
line that ends it, or after ``flush_ms`` without one; then the held message and everything that
followed it in that batch go out together, in order, as one re-emitted batch whose token
releases the held references once it is delivered (the router's re-emit path,
:mod:`kubetrail.runtime.router`). Fluent Bit's emitter sends such records back to the start of
the pipeline, so filters before the multiline filter see them twice (its documentation warns
about it); kubetrail's copy continues after this filter instead, through the filters that follow
it on the route. When the inputs finish (``exit_on_eof``, shutdown), held messages are flushed
before the outputs drain; one still held at a crash was never acknowledged and is read again.

**Blocks of lines.** A tail with no parser hands its lines as one
:class:`~kubetrail.core.block.TextBlock` (see :mod:`kubetrail.core.block`). With regex rules
the native module takes (:class:`~kubetrail.parsers.multiline_rules.NativeRules`) and the key
the tail's, the filter walks that block in one native call, from the tag's state and back to
it, and hands on a block of the joined messages' JSON lines with their times and identities:
no record per line unless a later filter asks for records. Only the lines of the message open
at either end of the block become records, the same records the record path holds, so state,
held batches, ``flush_ms`` and ``buffer`` work alike whichever path a batch took (a block with
a blank line comes as records, for one). Anything else (parsed records, ``partial_message``,
``cri``/``docker``, ``endswith``/``equal``) goes through the record path.

``emitter_mem_buf_limit`` has no effect: a held message is bounded by ``flush_ms``, and what it
holds back counts against its input's own ``mem_buf_limit``.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from kubetrail.core.acks import AckToken
from kubetrail.core.block import ReadyBlock, TextBlock
from kubetrail.core.component import ComponentContext, Transform
from kubetrail.core.config.compat import no_effect
from kubetrail.core.errors import ConfigError
from kubetrail.core.metrics import ComponentMetrics
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.core.values import split_list
from kubetrail.parsers.multiline import ContainerLogJoiner, JoinStats
from kubetrail.parsers.multiline_rules import (
    BUILTIN_RULES,
    LineJoiner,
    NativeRules,
    RuleSet,
    builtin,
    from_section,
)

_PARTIAL_KEYS = ("partial_message", "partial_id", "partial_ordinal", "partial_last")


@dataclass
class _Held:
    """A tag's open message between batches, and the batches it holds open."""

    records: list[Record] = field(default_factory=list)  # the pieces (rules, partial_message)
    parents: list[AckToken] = field(default_factory=list)
    since: float = 0.0  # monotonic time the message started
    durable: bool = False


class MultilineTransform(Transform):
    plugin_name = "multiline"
    description = "Joins records of one message: stack traces (go, python, java, ruby, custom) or split lines"
    options = (
        Option("multiline.parser", multiple=True, help="Parsers (comma list, repeatable): go, python, java, ..."),
        Option("multiline.key_content", "str", "log", help="Key holding the text"),
        Option("mode", "choice", "parser", choices=("parser", "partial_message"), help="parser or partial_message"),
        Option("buffer", "bool", True, help="Hold a message open across batches (off: each batch on its own)"),
        Option("flush_ms", "int", 2000, help="A held message goes out after this long without its end"),
        Option("emitter_name", help="Name of the emitter in metrics (default emitter_for_<filter>)"),
        Option("emitter_storage.type", "choice", "memory", choices=("memory", "filesystem")),
        no_effect(
            "emitter_mem_buf_limit",
            "size",
            10 * 1024 * 1024,
            why="a held message is bounded by flush_ms and counts against its input's mem_buf_limit",
        ),
        Option("multiline.key_pattern", help="Accepted for Fluent Bit compatibility"),
        no_effect("debug_flush", "bool", False, why="Fluent Bit's debug switch"),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.key: str = config["multiline.key_content"]
        self.mode: str = config["mode"]
        self.buffer: bool = config["buffer"]
        self.flush_seconds = max(0.001, config["flush_ms"] / 1000)
        self.emitter_name: str | None = config["emitter_name"]
        self.durable_copies = config["emitter_storage.type"] == "filesystem"
        self.emitter_metrics: ComponentMetrics | None = None  # set by the pipeline
        self.emit: Callable[[Batch, bool], Awaitable[None]] | None = None
        self.continues_after = True  # its copies go on after it, not from the start
        names = [name.lower() for text in config["multiline.parser"] for name in split_list(text)]
        self.container: tuple[str, ...] = ()
        self.rulesets: list[RuleSet] = []
        if self.mode == "parser":
            if not names:
                raise ConfigError("mode parser needs multiline.parser (e.g. java, python, go)", key="multiline.parser")
            self._parsers(names, ctx)
        # The rules as the native state machine, for blocks of text lines (None: records only).
        self.native = NativeRules.of(self.rulesets) if self.mode == "parser" and not self.container else None
        self.joiners: dict[str, LineJoiner] = {}
        self.containers: dict[str, ContainerLogJoiner] = {}
        self.held: dict[str, _Held] = {}
        self._pieces: dict[str, list[Record]] = {}  # the open message's records, per tag
        self.m_joined = self.metrics.counter("kubetrail_multiline_joined", "Messages joined from several records")
        self.m_flushed = self.metrics.counter(
            "kubetrail_multiline_flushed", "Held messages sent after flush_ms without their end"
        )
        self._task: asyncio.Task[None] | None = None

    def _parsers(self, names: list[str], ctx: ComponentContext) -> None:
        # [MULTILINE_PARSER] sections, handed over by the pipeline beside the parser registry.
        declared = {s.get("name"): s for s in getattr(ctx.parsers, "multiline_sections", [])}
        container = [n for n in names if n in ("cri", "docker")]
        if container:
            if len(container) != len(names):
                raise ConfigError(
                    "cri and docker join container runtime pieces and cannot be mixed with other parsers here; "
                    "put them in tail's multiline.parser and keep this filter for the others",
                    key="multiline.parser",
                )
            self.container = tuple(container)
            return
        for name in names:
            if name in declared:
                self.rulesets.append(from_section(declared[name]))
            elif name in BUILTIN_RULES:
                self.rulesets.append(builtin(name))
            else:
                known = sorted({*BUILTIN_RULES, "cri", "docker", *(n for n in declared if n)})
                raise ConfigError(
                    f"unknown multiline parser {name!r}; known: {', '.join(known)}", key="multiline.parser"
                )

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self.buffer:
            self._task = asyncio.get_running_loop().create_task(self._timer(), name=f"{self.ctx.component_id}-flush")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _timer(self) -> None:
        while True:
            await asyncio.sleep(min(self.flush_seconds / 2, 1.0))
            await self.flush_held(time.monotonic() - self.flush_seconds)

    async def flush_held(self, older_than: float | None = None) -> None:
        """Send the held messages that started before ``older_than`` (all of them: None)."""
        for tag in list(self.held):
            held = self.held[tag]
            if older_than is not None and held.since > older_than:
                continue
            del self.held[tag]
            records = self._finish_open(tag)
            self.m_flushed.inc()
            batch = self._copy_batch(tag, records, held.parents)
            if self.emit is not None:
                await self.emit(batch, held.durable)
            else:  # not in a pipeline (a direct test): nobody to send to, release what it held
                assert batch.ack is not None
                batch.ack.seal()

    # -- processing --------------------------------------------------------------------------

    def process(self, records: list[Record]) -> list[Record]:
        """Within one list of records, nothing held (``buffer off`` semantics)."""
        if not records:
            return records
        tag = records[0].tag
        out = self._feed(tag, records)
        out.extend(self._finish_open(tag))
        return out

    def process_emitting(self, batch: Batch) -> tuple[Batch, list[Batch]]:
        tag = batch.tag
        held = self.held.pop(tag, None)
        block = self._text_block(batch)
        out = self._feed_block(tag, batch, block) if block is not None else batch.derive(self._feed(tag, batch.records))
        copies: list[Batch] = []
        if held is not None:
            # The held message continued or ended here: it and what followed go out together.
            if len(out):
                if batch.ack is not None:
                    batch.ack.retain()
                    held.parents.append(batch.ack)
                copies.append(self._copy_batch(tag, out, held.parents))
                held = None
            out = batch.derive([])
        if self._is_open(tag):
            if not self.buffer:
                out = batch.derive([*out.records, *self._finish_open(tag)])
            else:
                if held is None:
                    held = _Held(since=time.monotonic())
                if batch.ack is not None:
                    batch.ack.retain()
                    held.parents.append(batch.ack)
                self.held[tag] = held
        elif held is not None:
            # Every record continued the held message, which then ended with nothing after it
            # (it cannot: an end needs a following line); keep the bookkeeping honest anyway.
            copies.append(self._copy_batch(tag, self._finish_open(tag), held.parents))
        return out, copies

    def _copy_batch(self, tag: str, records: list[Record] | Batch, parents: list[AckToken]) -> Batch:
        def release(delivered: bool) -> None:
            for parent in parents:
                parent.release(delivered)

        if isinstance(records, Batch):
            block = records.line_block
            if block is not None:  # a block of joined messages stays one
                return Batch(tag, None, AckToken(release), block=block)
            records = records.records
        return Batch(tag, records, AckToken(release))

    # -- blocks of text lines ------------------------------------------------------------------

    def _text_block(self, batch: Batch) -> TextBlock | None:
        """The batch's lines as the tail read them, when this filter can walk them natively."""
        if self.native is None:
            return None
        block = batch.line_block
        if isinstance(block, TextBlock) and block.key == self.key:
            return block
        return None

    def _feed_block(self, tag: str, batch: Batch, block: TextBlock) -> Batch:
        """:meth:`_feed_rules` of a block of text lines, in one native call: the same messages,
        written as JSON lines. The lines of the message open at the start (the head) or the end
        (the tail) become records, which the tag's state holds as the record path does."""
        native = self.native
        assert native is not None
        joiner = self.joiners.get(tag) or LineJoiner(self.rulesets)
        pieces = self._pieces.pop(tag, [])
        source = block.source
        start = native.state_of(joiner) if pieces else -1
        close = not self.buffer  # buffer off: a message open at the end goes out as it is
        data, offsets, count, head_end, tail_start, state, joined = native.native.join(
            source, block.crlf, block.json_prefix(), start, close, native.search
        )
        if joined:
            self.m_joined.inc(joined)
        lead: Record | None = None  # the message open before the block, if a line here ended it
        if pieces:
            pieces.extend(block.line_records(0, head_end))
            if head_end < len(source):
                lead = self._join(pieces) if len(pieces) > 1 else pieces[0]
                pieces = []
        if tail_start >= 0:
            pieces = block.line_records(tail_start)
        native.set_state(joiner, state)
        if pieces:
            self._pieces[tag] = pieces
            self.joiners[tag] = joiner
        else:
            self.joiners.pop(tag, None)  # nothing open: forget the tag
        if lead is None and not count:
            return batch.derive([])
        times = array("q", [block.time_ns]) * count
        if lead is not None:
            data = lead.json_bytes() + b"\n" + data
            times.insert(0, lead.time_ns)
        starts = array("q")
        starts.frombytes(offsets)
        uid, first = block.identity if block.identity is not None else (None, 0)
        now = block.time_ns

        def build() -> list[Record]:
            lines = data.split(b"\n")
            records = [lead] if lead is not None else []
            identified = block.identity is not None
            records.extend(
                Record(tag, now, None, line, (uid, first + at) if identified else None)
                for line, at in zip(lines[len(records) :], starts, strict=False)  # split has one more
            )
            return records

        ready = ReadyBlock(data, len(times), build)
        ready.times = times
        return Batch(tag, None, batch.ack, batch.size_bytes, batch.created, block=ready)

    # -- the joiners -------------------------------------------------------------------------

    def _is_open(self, tag: str) -> bool:
        if self.container:
            joiner = self.containers.get(tag)
            return bool(joiner and joiner.pending)
        return bool(self._pieces.get(tag))

    def _feed(self, tag: str, records: list[Record]) -> list[Record]:
        if self.container:
            return self._feed_container(tag, records)
        if self.mode == "partial_message":
            return self._feed_partial(tag, records)
        return self._feed_rules(tag, records)

    def _finish_open(self, tag: str) -> list[Record]:
        """The open message of ``tag`` as it is (its end never came)."""
        if self.container:
            container = self.containers.get(tag)
            return container.flush(float("inf"), tag, JoinStats()) if container else []
        pieces = self._pieces.pop(tag, [])
        self.joiners.pop(tag, None)  # the message ended: nothing of the tag is left open
        return [self._join(pieces)] if pieces else []

    def _join(self, pieces: list[Record]) -> Record:
        first = pieces[0]
        if len(pieces) == 1:
            return first
        self.m_joined.inc()
        key = self.key
        if self.mode == "partial_message":
            text = "".join(str(p.body.get(key, "")) for p in pieces)
            body = {k: v for k, v in first.body.items() if k not in _PARTIAL_KEYS}
        else:
            lines = [str(p.body.get(key, "")) for p in pieces]
            text = "\n".join(line[:-1] if line.endswith("\n") else line for line in lines)
            body = dict(first.body)
        body[key] = text
        return Record(first.tag, first.time_ns, body, None, first.identity, first.meta)

    def _feed_rules(self, tag: str, records: list[Record]) -> list[Record]:
        joiner = self.joiners.get(tag)
        if joiner is None:
            joiner = self.joiners[tag] = LineJoiner(self.rulesets)
        # The open message stays a local list while the batch is walked (written back at the
        # end): this loop runs once per line, so it does no dict write, no call per message of
        # one line, and only one method call (the state machine) per record.
        pieces = self._pieces.pop(tag, [])
        out: list[Record] = []
        emit, join, key = out.append, self._join, self.key
        # A value that is not text ("pass") has nothing to join on: it ends the open message
        # and passes as it is, like a line that starts nothing ("alone").
        actions = joiner.feed_many([record.body.get(key) for record in records])
        for record, action in zip(records, actions):  # noqa: B905 - one action per record
            if action == "append" and pieces:
                pieces.append(record)
                continue
            if pieces:
                emit(join(pieces) if len(pieces) > 1 else pieces[0])
            if action == "start":
                pieces = [record]
            else:
                pieces = []
                emit(record)
        if pieces:
            self._pieces[tag] = pieces
        else:
            # Nothing open: forget the tag (tags made from file paths come and go).
            self.joiners.pop(tag, None)
        return out

    def _feed_partial(self, tag: str, records: list[Record]) -> list[Record]:
        """Docker's fluentd log driver: pieces carry ``partial_message: true`` and the same
        ``partial_id``; the piece with ``partial_last: true`` ends the message."""
        pieces = self._pieces.setdefault(tag, [])
        out: list[Record] = []
        for record in records:
            body = record.body
            if str(body.get("partial_message", "")).lower() != "true":
                if pieces:  # a message whose last piece never came
                    out.append(self._join(pieces))
                    pieces = self._pieces[tag] = []
                out.append(record)
                continue
            if pieces and pieces[0].body.get("partial_id") != body.get("partial_id"):
                out.append(self._join(pieces))
                pieces = self._pieces[tag] = []
            pieces.append(record)
            if str(body.get("partial_last", "")).lower() == "true":
                out.append(self._join(pieces))
                pieces = self._pieces[tag] = []
        if not pieces:
            self._pieces.pop(tag, None)
        return out

    def _feed_container(self, tag: str, records: list[Record]) -> list[Record]:
        """cri/docker text under the key: the tail's joiner, fed one line per record."""
        joiner = self.containers.get(tag)
        if joiner is None:
            joiner = self.containers[tag] = ContainerLogJoiner(self.container, 1 << 62, True, self.key)
        out: list[Record] = []
        stats = JoinStats()
        key = self.key
        for record in records:
            text = record.body.get(key)
            if not isinstance(text, str):
                out.append(record)
                continue
            line = text[:-1] if text.endswith("\n") else text
            for joined in joiner.process([line.encode()], 0, tag, stats):
                # The joined record keeps the time the runtime wrote and the first piece's
                # identity is not known here: take the record's own.
                joined.identity = record.identity
                out.append(joined)
        if not joiner.pending:
            del self.containers[tag]  # nothing open: forget the tag
        return out
