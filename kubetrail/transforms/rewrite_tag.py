"""The ``rewrite_tag`` filter: re-emit records under a new tag, keeping or dropping the original.

Fluent Bit's options and semantics: ``rule $KEY REGEX NEW_TAG KEEP`` (repeatable; the rules are
tried in the order written and the first that matches wins), ``emitter_name``,
``emitter_storage.type``, ``emitter_mem_buf_limit``. ``NEW_TAG`` may use ``$TAG`` (the record's
tag), ``$TAG[n]`` (its n-th dot-separated part, empty when there is none), ``$0`` (the whole
match) to ``$9`` (capture groups), and record accessors (``$kubernetes['namespace_name']``);
``${VAR}`` is expanded when the config is read, as everywhere. A regex or tag part that may
contain spaces is written in double quotes.

**Routing and acknowledgements.** A copy enters the pipeline from the start, like a record of a
new input (Fluent Bit's emitter input), through the router's re-emit path
(:mod:`kubetrail.runtime.router`): copies of one batch are grouped per new tag, each group is a
batch whose token holds one reference on the original batch, so the source's checkpoint moves
only once the copy is delivered too. The copy keeps the original's time and identity, extended
with the new tag, so a sink that writes idempotently never takes the copy for a replay of the
original.

**Loops.** Like Fluent Bit's emitter, a copy never passes through the filter it came out of
again, so a new tag matched by the filter's own ``match`` cannot loop (the pipeline logs that it
happens). Fixed new tags that lead two or more rewrite_tag filters into each other are refused
when the config is read; tags built from record values cannot be checked then, and at run time
a copy passes no filter it already came out of, so it cannot loop either.

``emitter_storage.type filesystem`` makes the copies go through the outputs' filesystem buffers
(``storage.path``) as a filesystem input's batches do. ``emitter_mem_buf_limit`` has no effect:
copies are routed within the send of the batch they came from, so that input's own limit and
the outputs' buffers already hold the emitter back.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Awaitable, Callable
from typing import Any

from kubetrail.core.accessor import RecordAccessor, value_as_text
from kubetrail.core.acks import AckToken
from kubetrail.core.component import ComponentContext, Transform
from kubetrail.core.config.compat import no_effect
from kubetrail.core.errors import ConfigError
from kubetrail.core.metrics import ComponentMetrics
from kubetrail.core.options import Option, ruby_to_python_regex
from kubetrail.core.record import Batch, Record
from kubetrail.core.values import parse_bool

_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')
_TEMPLATE = re.compile(
    r"\$TAG\[(\d+)\]|\$TAG|\$(\d)|\$([A-Za-z_][A-Za-z0-9_.\-]*(?:\[\s*(?:'[^']*'|\"[^\"]*\"|\d+)\s*\])*)"
)
# A part of a new tag: a literal, or a function of (tag, tag parts, match, body).
Part = str | Callable[[str, list[str], "re.Match[str]", dict[str, Any]], str]


def split_rule(text: str) -> list[str]:
    """Fluent Bit splits a rule on spaces; a double-quoted token may contain spaces."""
    return [m.group(1) if m.group(1) is not None else m.group(2) for m in _TOKEN.finditer(text)]


def _tag_part(index: int) -> Part:
    def part(tag: str, parts: list[str], match: re.Match[str], body: dict[str, Any]) -> str:
        return parts[index] if index < len(parts) else ""

    return part


def _group(index: int) -> Part:
    def part(tag: str, parts: list[str], match: re.Match[str], body: dict[str, Any]) -> str:
        try:
            return match.group(index) or ""
        except IndexError:
            return ""

    return part


def _field(accessor: RecordAccessor) -> Part:
    def part(tag: str, parts: list[str], match: re.Match[str], body: dict[str, Any]) -> str:
        return value_as_text(accessor.get(body)) or ""

    return part


def _whole_tag(tag: str, parts: list[str], match: re.Match[str], body: dict[str, Any]) -> str:
    return tag


def compile_template(text: str) -> list[Part]:
    parts: list[Part] = []
    position = 0
    for found in _TEMPLATE.finditer(text):
        if found.start() > position:
            parts.append(text[position : found.start()])
        tag_index, group, field = found.groups()
        if tag_index is not None:
            parts.append(_tag_part(int(tag_index)))
        elif group is not None:
            parts.append(_group(int(group)))
        elif field is not None:
            parts.append(_field(RecordAccessor("$" + field)))
        else:
            parts.append(_whole_tag)
        position = found.end()
    if position < len(text):
        parts.append(text[position:])
    return parts


class Rule:
    def __init__(self, text: str) -> None:
        tokens = split_rule(text)
        if len(tokens) != 4:
            raise ConfigError(
                f"a rule is '$KEY REGEX NEW_TAG KEEP' (4 parts; quote a part with spaces), got {len(tokens)} "
                f"in {text!r}",
                key="rule",
            )
        key, pattern, new_tag, keep = tokens
        try:
            self.accessor = RecordAccessor(key if key.startswith("$") else "$" + key)
            self.regex = re.compile(ruby_to_python_regex(pattern))
            self.keep = parse_bool(keep)
        except (ValueError, re.error) as exc:
            raise ConfigError(f"bad rule {text!r}: {exc}", key="rule") from None
        self.template = compile_template(new_tag)
        self.text = new_tag

    @property
    def static_tag(self) -> str | None:
        """The new tag when it depends on nothing in the record, else None."""
        if all(isinstance(part, str) for part in self.template):
            return "".join(part for part in self.template if isinstance(part, str))
        return None

    def new_tag(self, tag: str, match: re.Match[str], body: dict[str, Any]) -> str:
        parts = tag.split(".")
        return "".join(p if isinstance(p, str) else p(tag, parts, match, body) for p in self.template)


class RewriteTagTransform(Transform):
    plugin_name = "rewrite_tag"
    description = "Re-emits records under a new tag from the start of the pipeline (rules: $KEY REGEX NEW_TAG KEEP)"
    options = (
        Option("rule", multiple=True, help="$KEY REGEX NEW_TAG KEEP; the first rule that matches wins"),
        Option("emitter_name", help="Name of the emitter in metrics (default emitter_for_<filter>)"),
        Option(
            "emitter_storage.type",
            "choice",
            "memory",
            choices=("memory", "filesystem"),
            help="filesystem: copies go through the outputs' filesystem buffers (needs storage.path)",
        ),
        no_effect(
            "emitter_mem_buf_limit",
            "size",
            10 * 1024 * 1024,
            why="copies are routed within the send of the batch they came from, so that input's limit applies",
        ),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        if not config["rule"]:
            raise ConfigError("rewrite_tag needs at least one 'rule $KEY REGEX NEW_TAG KEEP'", key="rule")
        self.rules = [Rule(text) for text in config["rule"]]
        self.emitter_name: str | None = config["emitter_name"]
        self.durable_copies = config["emitter_storage.type"] == "filesystem"
        if self.durable_copies and not ctx.service.get("storage.path"):
            raise ConfigError(
                "emitter_storage.type filesystem needs storage.path in [SERVICE]", key="emitter_storage.type"
            )
        self.emitter_metrics: ComponentMetrics | None = None  # set by the pipeline
        self.emit: Callable[[Batch, bool], Awaitable[None]] | None = None
        self.m_empty = self.metrics.counter(
            "kubetrail_rewrite_tag_empty_tags", "Records whose new tag came out empty (kept as they were)"
        )

    def static_tags(self) -> list[str]:
        return [tag for rule in self.rules if (tag := rule.static_tag) is not None]

    def _rewrite(self, record: Record) -> tuple[str, bool] | None:
        body = record.body
        for rule in self.rules:
            text = value_as_text(rule.accessor.get(body))
            if text is None:
                continue
            match = rule.regex.search(text)
            if match is None:
                continue
            return rule.new_tag(record.tag, match, body), rule.keep
        return None

    def process_emitting(self, batch: Batch) -> tuple[Batch, list[Batch]]:
        kept: list[Record] = []
        copies: dict[str, list[Record]] = {}
        empty = 0
        for record in batch.records:
            result = self._rewrite(record)
            if result is None:
                kept.append(record)
                continue
            tag, keep = result
            if not tag:
                empty += 1
                kept.append(record)
                continue
            copies.setdefault(tag, []).append(_copy(record, tag))
            if keep:
                kept.append(record)
        if empty:
            self.m_empty.inc(empty)
        out = batch if len(kept) == len(batch) and not copies else batch.derive(kept)
        emitted = [self._batch(tag, records, batch) for tag, records in copies.items()]
        return out, emitted

    def _batch(self, tag: str, records: list[Record], parent: Batch) -> Batch:
        """A batch of copies whose token keeps ``parent``'s open until the copies are delivered."""
        parent_token = parent.ack
        if parent_token is not None:
            parent_token.retain()
        token = AckToken(parent_token.release if parent_token is not None else None)
        size = sum(len(r.raw) if r.raw is not None else 0 for r in records)
        return Batch(tag, records, token, size or parent.size_bytes * len(records) // max(1, len(parent)))

    def process(self, records: list[Record]) -> list[Record]:
        """Without the router (a direct call): the records that stay under their tag."""
        return [r for r in records if (res := self._rewrite(r)) is None or res[1] or not res[0]]


def _copy(record: Record, tag: str) -> Record:
    identity = (*record.identity, "rewrite_tag", tag) if record.identity is not None else None
    if record.raw is not None:  # immutable bytes: shared, parsed again on demand
        return Record(tag, record.time_ns, None, record.raw, identity, copy.copy(record.meta))
    return Record(tag, record.time_ns, copy.deepcopy(record.body_), None, identity, copy.copy(record.meta))
