"""The ``detect`` filter: Falco's k8s_audit rules on audit records, alerts as new records.

Options: ``rules_file`` (repeatable, globs; loaded in the order given, each glob sorted, as
Falco loads its ``-r`` files: base rules first, then the user's overrides; relative to the
config file), ``alert_tag`` (the tag alerts are emitted under), ``min_priority`` (rules below it
are not evaluated at all), ``rate_limit`` (``N/DURATION`` per rule, e.g. ``10/1m``: alerts over
it are dropped and counted), ``drop_matched`` (the audit records that fired a rule do not go on;
by default every record passes unchanged). A rules file that does not load stops the start with
its file, line and rule (see :mod:`kubetrail.detect`); at run time an event missing what a rule
reads makes that rule false, never an error.

**Alerts** are records in Falco's JSON output shape (``time``, ``rule``, ``priority``,
``source``, ``tags``, ``output``, ``output_fields``, ``hostname``) plus the triggering event's
``k8s.audit.id`` and ``k8s.audit.stage`` and ``trigger_tag``, with the record identity
``(auditID, stage, "detect", rule)``: a sink that writes idempotently (es ``_id``, ...) stores
an alert once however often it is sent.

**Delivered like the records, once per (auditID, stage, rule).** Alerts go through the router's
re-emit path, the one ``rewrite_tag`` uses (:class:`kubetrail.runtime.router.Reemitting`): they
enter the pipeline from the start under ``alert_tag`` (never through this filter again), and
their batch's token holds a reference on the batch they came from. So the audit record's batch
counts as delivered only once its alerts are delivered too: the webhook answers 200, the tail
moves its offset, and the ``kubernetes_audit`` filter records the ``(auditID, stage)`` as
delivered (in its ``db``), only then. Put ``detect`` after ``kubernetes_audit`` (with
``dedupe on`` and a ``db``): an API server retry or a replay after a restart of an event whose
alerts were delivered is removed there before it reaches the rules, and one whose alerts were
not delivered fires them again with the same identity. No second dedupe store is needed.

**Speed.** The rules are indexed by stage, verb, resource and subresource, and no record object
is built for the records that pass. A block the ``kubernetes_audit`` filter's native scan made
carries each line's *detection class* (see :func:`~kubetrail.detect.fields.class_of`: the index
key, user, impersonated user, namespace, decision, response code, whether the event has a
request/response object), found while that scan decoded exactly those members of every event
anyway: a class is decided once, on its first event (:meth:`Engine.decide_class`), and kept for
the scanner's life; a line is decoded in Python only when its class fires a rule that must
still look at the event, or its alert is one the native writer leaves to Python. Alerts of
rules whose output reads only members the scan decodes are written natively
(``kubetrail_native.AlertWriter``), byte for byte what :meth:`_alert` writes. Any other block
(the Python scan, a batch the audit filter changed, a tail's) is read as it is: one msgspec
call decodes the few members most rules read for the whole block. Both ways give the same
alerts in the same order (``tests/unit/test_detect_classes.py``); see ``bench/bench_detect.py``.
"""

from __future__ import annotations

import calendar
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from kubetrail.core.acks import AckToken
from kubetrail.core.component import ComponentContext, Transform
from kubetrail.core.errors import ConfigError
from kubetrail.core.metrics import ComponentMetrics
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.core.values import parse_duration
from kubetrail.detect import Engine, Event, RulesError, decode_block, expand_paths, load_rules, priority_level
from kubetrail.detect.engine import CompiledRule, Decision, native_template
from kubetrail.detect.fields import Lines, class_of, decode_lines_block
from kubetrail.transforms.kubernetes_audit import detect_classes

try:  # optional: the native alert writer (see native/src/alerts.rs)
    from kubetrail_native import AlertWriter, class_counts, lines_of
except ImportError:  # pragma: no cover - depends on the installation
    AlertWriter = class_counts = lines_of = None

NO_CLASS = 0xFFFFFFFF  # a line the native scan gave no detection class: decided by itself


class _RateLimit:
    """At most ``count`` alerts per rule in each fixed window of ``window`` seconds."""

    def __init__(self, text: str) -> None:
        count, slash, window = text.partition("/")
        try:
            self.count = int(count)
            self.window = parse_duration(window) if slash else 1.0
        except ValueError:
            raise ConfigError(f"is N/DURATION (e.g. 10/1m), got {text!r}", key="rate_limit") from None
        if self.count < 1 or self.window <= 0:
            raise ConfigError(f"needs a positive count and window, got {text!r}", key="rate_limit")
        self._windows: dict[str, tuple[float, int]] = {}

    def allow(self, rule: str) -> bool:
        now = time.monotonic()
        start, used = self._windows.get(rule, (now, 0))
        if now - start >= self.window:
            start, used = now, 0
        if used >= self.count:
            self._windows[rule] = (start, used)
            return False
        self._windows[rule] = (start, used + 1)
        return True


class DetectTransform(Transform):
    plugin_name = "detect"
    description = "Evaluates Falco's k8s_audit rules on audit records; alerts are emitted as new records"
    options = (
        Option("rules_file", multiple=True, required=True, help="Falco rules file (globs; repeat: loaded in order)"),
        Option("alert_tag", "str", "alert", help="Tag of the alert records"),
        Option("min_priority", "str", "debug", help="Lowest priority evaluated (emergency ... debug)"),
        Option(
            "rate_limit", "str", "", help="Alerts per rule, N/DURATION (e.g. 10/1m); the excess is dropped and counted"
        ),
        Option("drop_matched", "bool", False, help="Drop the audit records that fired a rule (alerts still go out)"),
        Option("emitter_name", help="Name of the alerts' emitter in metrics (default emitter_for_<filter>)"),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        try:
            self.min_priority = priority_level(config["min_priority"])
        except ValueError as exc:
            raise ConfigError(str(exc), key="min_priority") from None
        paths = [self._path(ctx, p) for p in config["rules_file"]]
        try:
            self.engine: Engine = load_rules(expand_paths(paths))
        except (RulesError, ValueError) as exc:
            raise ConfigError(f"rules: {exc}", key="rules_file") from None
        # Rules below min_priority are never evaluated (nor indexed).
        self.engine.rules = [r for r in self.engine.rules if r.priority <= self.min_priority]
        self.alert_tag: str = config["alert_tag"]
        if not self.alert_tag:
            raise ConfigError("must not be empty", key="alert_tag")
        self.rate_limit = _RateLimit(config["rate_limit"]) if config["rate_limit"] else None
        self.drop_matched: bool = config["drop_matched"]
        self.emitter_name: str | None = config["emitter_name"]
        self.emitter_metrics: ComponentMetrics | None = None  # set by the pipeline
        self.emit: Callable[[Batch, bool], Awaitable[None]] | None = None
        self.m_alerts = self.metrics.counter("kubetrail_detect_alerts", "Alerts emitted", "rule", "priority")
        self.m_limited = self.metrics.counter("kubetrail_detect_rate_limited", "Alerts dropped by rate_limit", "rule")
        self._counters: dict[str, Any] = {}  # rule -> its labelled counter (labels() per alert costs)
        # Per native scanner (there is one per kubernetes_audit filter): class id -> what its
        # events fire, None when its events are decided one by one. Ids are stable for the
        # scanner's life and its table is bounded, so this is too.
        self._classes: dict[int, tuple[Any, dict[int, Decision | None]]] = {}
        # The native alert writer's templates: rule name -> its number (rules whose output reads
        # a field the writer does not have are left to Python).
        self._templates: dict[str, int] = {}
        self._writer: Any = None
        if AlertWriter is not None:
            compiled = [(rule.name, native_template(rule)) for rule in self.engine.rules]
            usable = [(name, template) for name, template in compiled if template is not None]
            self._templates = {name: number for number, (name, _) in enumerate(usable)}
            hostname = b',"hostname":' + orjson.dumps(self.engine.hostname)
            self._writer = AlertWriter([template for _, template in usable], hostname)
        self._tag_json = ("", b'""')
        self.m_class_events = self.metrics.counter(
            "kubetrail_detect_class_events", "Events decided by their detection class, not one by one"
        )
        self.log.info(
            "rules loaded",
            extra={
                "rules": len(self.engine.rules),
                "files": len(paths),
                "other_sources_skipped": sum(self.engine.skipped_sources.values()),
            },
        )

    @staticmethod
    def _path(ctx: ComponentContext, text: str) -> str:
        """Relative to the config file that names it (as the lua filter's ``script``)."""
        path = Path(text)
        if not path.is_absolute() and ctx.section is not None:
            beside = Path(ctx.section.location_of("rules_file").file).parent / path
            if beside.parent.exists() or not path.parent.exists():
                return str(beside)
        return text

    def static_tags(self) -> list[str]:
        return [self.alert_tag]

    # -- the filter --------------------------------------------------------------------------

    def _events(self, batch: Batch) -> tuple[list[Event], list[Record] | None]:
        block = batch.raw_block
        if block is not None and not batch.is_materialized and not self.drop_matched and block.endswith(b"\n"):
            events = decode_lines_block(block, len(batch))
            if events is not None:
                return events, None  # no record object built for what passes
        records = batch.records
        events = decode_block([record.json_bytes() for record in records])
        for event, record in zip(events, records, strict=True):
            event.time_ns = record.time_ns
        return events, records

    def _evaluate(self, batch: Batch) -> tuple[list[_Alert], set[int], list[Record] | None]:
        if not self.drop_matched:
            by_class = self._evaluate_classes(batch)
            if by_class is not None:
                return by_class, set(), None
        events, records = self._events(batch)
        engine = self.engine
        alerts: list[_Alert] = []
        matched: set[int] = set()
        for index, event in enumerate(events):
            fired = engine.match(event)
            if not fired:
                continue
            matched.add(index)
            self._alerts(fired, event, batch.tag, alerts)
        return alerts, matched, records

    def _alerts(self, fired: list[CompiledRule], event: Event, tag: str, alerts: list[_Alert]) -> None:
        for rule in fired:
            if self.rate_limit is not None and not self.rate_limit.allow(rule.name):
                self.m_limited.labels(rule.name).inc()
                continue
            alerts.append(self._alert(rule, event, tag))

    # -- the fast path: the kubernetes_audit filter's detection classes ----------------------

    def _evaluate_classes(self, batch: Batch) -> list[_Alert] | None:
        """The alerts of a block the ``kubernetes_audit`` filter's native scan classified (None:
        it did not): each class of events (same index key, user, namespace, ...; see
        :func:`~kubetrail.detect.fields.class_of`) is decided once, on its first event, for
        every rule that reads only those; its events are decoded only when the class fires or
        has rules that read more. Same alerts, in the same order, as event by event."""
        found = detect_classes(batch)
        if found is None:
            return None
        scanner, id_bytes = found
        ids = memoryview(id_bytes).cast("I")
        block = batch.raw_block
        if len(ids) != len(batch) or block is None:
            return None
        known = self._classes.get(id(scanner))
        if known is None or known[0] is not scanner:
            known = self._classes[id(scanner)] = (scanner, {})
        decisions = known[1]
        lines = Lines(block)
        # Per class, not per line, from here on (a Python loop over the lines is most of the cost).
        counts = dict(class_counts(id_bytes)) if class_counts is not None else Counter(ids)
        new = [class_id for class_id in counts if class_id not in decisions and class_id != NO_CLASS]
        if new:
            self._decide(scanner, new, ids, lines, decisions)
        batch_decisions = {class_id: decisions.get(class_id) for class_id in counts}
        # The lines to look at: those of classes that fire something or are decided per event.
        hot = {class_id for class_id, decision in batch_decisions.items() if decision is None or decision}
        self.m_class_events.inc(
            sum(count for class_id, count in counts.items() if batch_decisions[class_id] is not None)
        )
        if not hot:
            return []
        if lines_of is not None:
            todo = lines_of(id_bytes, list(hot))
        else:
            todo = [index for index, class_id in enumerate(ids) if class_id in hot]
        # Only the events a predicate must still see are decoded here (and those whose alert
        # the native writer leaves to Python, later).
        per_event = {
            class_id
            for class_id in hot
            if (decision := batch_decisions[class_id]) is None or any(p is not None for _, p in decision)
        }
        eventful = [index for index in todo if ids[index] in per_event]
        events = dict(zip(eventful, decode_block(lines.many(eventful)), strict=True))
        items: list[tuple[int, CompiledRule]] = []
        match = self.engine.match
        limit = self.rate_limit
        for index in todo:
            decision = batch_decisions[ids[index]]
            event = events.get(index)
            if decision is None:
                assert event is not None
                fired = match(event)
            elif event is None:
                fired = [rule for rule, _ in decision]
            else:
                fired = [rule for rule, predicate in decision if predicate is None or predicate(event)]
            for rule in fired:
                if limit is not None and not limit.allow(rule.name):
                    self.m_limited.labels(rule.name).inc()
                    continue
                items.append((index, rule))
        return self._write_alerts(items, ids, lines, events, block, batch.tag)

    def _write_alerts(
        self,
        items: list[tuple[int, CompiledRule]],
        ids: memoryview,
        lines: Lines,
        events: dict[int, Event],
        block: bytes,
        tag: str,
    ) -> list[_Alert]:
        """The alerts of ``items`` (line, rule) in order: natively where the rule's output
        reads only what the native writer has (and the line is one the scan decoded), else
        in Python, as event by event."""
        rendered: list[bytes | None] = [None] * len(items)
        writer, templates = self._writer, self._templates
        if writer is not None:
            chosen = [
                (at, (index, number))
                for at, (index, rule) in enumerate(items)
                if (number := templates.get(rule.name)) is not None and ids[index] != NO_CLASS
            ]
            if chosen:
                if self._tag_json[0] != tag:
                    self._tag_json = (tag, orjson.dumps(tag))
                natively = writer.render(block, [pair for _, pair in chosen], self._tag_json[1])
                for (at, _), raw in zip(chosen, natively, strict=True):
                    rendered[at] = raw
        alerts: list[_Alert] = []
        written: dict[str, tuple[CompiledRule, int]] = {}  # counted once per rule and batch
        for (index, rule), raw in zip(items, rendered, strict=True):
            if raw is not None:
                alerts.append((raw, None, None))
                written[rule.name] = (rule, written[rule.name][1] + 1 if rule.name in written else 1)
                continue
            event = events.get(index)
            if event is None:
                event = events[index] = decode_block([lines.line(index)])[0]
            alerts.append(self._alert(rule, event, tag))
        for rule, count in written.values():
            self._count(rule, count)
        return alerts

    def _decide(
        self, scanner: Any, new: list[int], ids: memoryview, lines: Lines, decisions: dict[int, Decision | None]
    ) -> None:
        """Decides the classes ``new`` on their first events in this block. A class whose event
        is not what the native scan said it is (never seen; a safeguard) is decided event by
        event (None)."""
        wanted = set(new)
        firsts: dict[int, int] = {}
        for index, class_id in enumerate(ids):
            if class_id in wanted and class_id not in firsts:
                firsts[class_id] = index
                if len(firsts) == len(wanted):
                    break
        first_events = decode_block(lines.many(list(firsts.values())))
        for class_id, event in zip(firsts, first_events, strict=True):
            light = event.light
            values = scanner.class_values(class_id)
            if light is None or light.auditID is None or class_of(light) != values:
                self.log.warning(
                    "the native scan's detection class differs from the event's decoding: "
                    "its events are decided one by one",
                    extra={"class": values},
                )
                decisions[class_id] = None
            else:
                decisions[class_id] = self.engine.decide_class(event)

    def _count(self, rule: CompiledRule, count: int = 1) -> None:
        counter = self._counters.get(rule.name)
        if counter is None:
            counter = self._counters[rule.name] = self.m_alerts.labels(rule.name, rule.priority_name)
        counter.inc(count)

    def _alert(self, rule: CompiledRule, event: Event, tag: str) -> _Alert:
        body = self.engine.alert_record(self.engine.alert(rule, event), event)
        body["trigger_tag"] = tag
        self._count(rule)
        identity = (body["k8s.audit.id"], body["k8s.audit.stage"], "detect", rule.name)
        return orjson.dumps(body), event.timestamp_ns(), identity

    def process_emitting(self, batch: Batch) -> tuple[Batch, list[Batch]]:
        if not len(batch):
            return batch, []
        alerts, matched, records = self._evaluate(batch)
        out = batch
        if self.drop_matched and matched:
            assert records is not None
            out = batch.derive([r for i, r in enumerate(records) if i not in matched])
        if not alerts:
            return out, []
        return out, [_emitted(self.alert_tag, alerts, batch)]

    def process(self, records: list[Record]) -> list[Record]:
        """Without the router (a direct call): the records that go on (alerts are not made)."""
        if not self.drop_matched:
            return records
        _, matched, _ = self._evaluate(Batch("", records))
        return [r for i, r in enumerate(records) if i not in matched]


# The alert's JSON, its time and its identity; the native writer gives the JSON only (the
# others are read back from it if records are built, see _emitted).
_Alert = tuple[bytes, int | None, tuple[Any, ...] | None]


def _time_and_identity(raw: bytes) -> tuple[int, tuple[Any, ...]]:
    """A natively written alert's time (ns) and identity, read back from its JSON."""
    body = orjson.loads(raw)
    stamp: str = body["time"]  # YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ, UTC (see native/src/alerts.rs)
    whole = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
    at = whole * 1_000_000_000 + int(stamp[20:29])
    return at, (body["k8s.audit.id"], body["k8s.audit.stage"], "detect", body["rule"])


def _emitted(tag: str, alerts: list[_Alert], parent: Batch) -> Batch:
    """The alerts' batch: a block of JSON lines (a sink writing JSON lines takes it as it is; the
    records are built only if something asks). Its token keeps ``parent``'s open until the
    alerts are delivered: the router's re-emit contract, as rewrite_tag's copies."""
    parent_token = parent.ack
    if parent_token is not None:
        parent_token.retain()
    token = AckToken(parent_token.release if parent_token is not None else None)
    block = b"\n".join([raw for raw, _, _ in alerts]) + b"\n"

    def materialize() -> list[Record]:
        records: list[Record] = []
        for raw, at, identity in alerts:
            if at is None or identity is None:
                at, identity = _time_and_identity(raw)
            records.append(Record(tag, at, None, raw, identity))
        return records

    return Batch(tag, None, token, len(block), raw_block=block, materialize=materialize, count=len(alerts))
