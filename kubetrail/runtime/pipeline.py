"""The whole lifecycle of a pipeline: build from config, run, stop, drain, exit.

Build validates everything before anything starts (unknown plugin or option, bad value ->
:class:`ConfigError`). Run starts the sink workers, then the sources. Stop (SIGTERM, or every
finite source finished) proceeds in the only order that loses nothing:

1. sources stop reading; what they already emitted stays in sink buffers;
2. sinks drain their buffers (bounded by the service ``grace`` period);
3. sources close, storing checkpoints that by construction cover only acknowledged data.

Anything still undelivered when ``grace`` runs out is simply not checkpointed, so it is
read again on the next start: at-least-once, with identities for sinks to deduplicate. That
run still did not finish its work, so it ends with :data:`EXIT_UNDELIVERED` (3) and one error
line naming each output with what it did not deliver: a supervisor or an SRE sees it, where a
0 would say all is well.

Fluent Bit compatibility at build time: YAML processors are built as filters bound to their
input or output (see :mod:`.router`); options Fluent Bit has that change nothing here are
accepted and logged once (:func:`kubetrail.core.config.compat.no_effect`); an unknown plugin
names the closest one kubetrail has; rewrite_tag filters whose fixed new tags feed each other
in a cycle are refused before anything starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetrail import __version__
from kubetrail.core import secrets
from kubetrail.core.acks import AckToken
from kubetrail.core.component import ComponentContext, Sink, Source, Transform
from kubetrail.core.config import PipelineConfig
from kubetrail.core.config.compat import NO_EFFECT_MARK, is_no_effect, unknown_plugin_message
from kubetrail.core.dead_letter import DeadLetters
from kubetrail.core.errors import ConfigError
from kubetrail.core.metrics import ComponentMetrics, MetricsRegistry
from kubetrail.core.options import Option, Section, resolve_options, shown_value
from kubetrail.core.record import Batch
from kubetrail.parsers.multiline_rules import from_section
from kubetrail.parsers.registry import ParserRegistry
from kubetrail.runtime.disk_buffer import DiskQueue, StorageError
from kubetrail.runtime.logging_setup import LEVELS
from kubetrail.runtime.plugins import (
    COMMON_FILTER_OPTIONS,
    COMMON_INPUT_OPTIONS,
    COMMON_OUTPUT_OPTIONS,
    SERVICE_OPTIONS,
    SINKS,
    SOURCES,
    TRANSFORMS,
    parse_retry_limit,
)
from kubetrail.runtime.router import Reemitting, RoutedSink, RoutedTransform, Router
from kubetrail.runtime.routing import TagMatcher
from kubetrail.runtime.sink_runner import SinkRunner

log = logging.getLogger("kubetrail.pipeline")

SOURCE_RESTART_CAP = 60.0
# `kubetrail run`'s exit status when the grace period ended with records not delivered (they are
# replayed on the next start); 1 and 2 are a runtime failure and a configuration error.
EXIT_UNDELIVERED = 3


@dataclass
class BuiltComponent:
    component_id: str
    kind: str
    plugin: str
    config: dict[str, Any]
    instance: Any
    dead_letters: DeadLetters | None = None  # also in the component's context


class _SourceEmitter:
    """The emitter a source sends to: routing plus the source's own metrics.

    ``durable``: the source has ``storage.type filesystem``. ``mem_limit``: ``mem_buf_limit``
    for sources that do not pause themselves (``tail`` stops reading before it reads; the others
    are paused here: ``send`` waits while the bytes emitted but not yet acknowledged are over the
    limit, so the Events watch stops reading its stream and the audit webhook answers 429).
    """

    def __init__(
        self,
        router: Router,
        metrics: ComponentMetrics,
        durable: bool = False,
        mem_limit: int | None = None,
        processors: list[RoutedTransform] | None = None,
    ) -> None:
        self._router = router
        self._processors = processors or []
        self._metrics = metrics
        self._durable = durable
        self._mem_limit = mem_limit
        self._in_flight = 0
        self._below = asyncio.Event()
        self._below.set()
        self._paused = (
            metrics.counter("kubetrail_input_mem_buf_paused", "Times an input paused on mem_buf_limit")
            if mem_limit
            else None
        )

    async def send(self, batch: Batch, *, after: Awaitable[None] | None = None) -> None:
        self._metrics.records_in.inc(len(batch))
        self._metrics.bytes_in.inc(batch.size_bytes)
        if self._mem_limit:
            if self._in_flight >= self._mem_limit:
                assert self._paused is not None
                self._paused.inc()
                while self._in_flight >= self._mem_limit:
                    self._below.clear()
                    await self._below.wait()
            self._track(batch)
        await self._router.send(batch, self._metrics, self._durable, after=after, processors=self._processors)

    def _track(self, batch: Batch) -> None:
        """Count the batch against mem_buf_limit until its token completes."""
        size = batch.size_bytes
        original = batch.ack
        self._in_flight += size

        def done(delivered: bool) -> None:
            self._in_flight -= size
            if self._in_flight < (self._mem_limit or 0):
                self._below.set()
            if original is not None:
                original.release(delivered)  # the reference the router would have sealed

        batch.ack = AckToken(done)


class Pipeline:
    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.service = resolve_options(config.service, SERVICE_OPTIONS, "[SERVICE]")
        # Compatibility notes (no-effect options, ignored processors, ...): logged once when the
        # pipeline runs (logging is set up after the build) and shown by ``kubetrail check``.
        self.notes: list[str] = list(config.notices)
        self._noted: set[tuple[str, str]] = set()
        self._note_no_effect(config.service, SERVICE_OPTIONS, "")
        if self.service["daemon"]:
            raise ConfigError(
                "daemon mode is not supported; run kubetrail under systemd or Kubernetes",
                config.service.location_of("daemon"),
                "daemon",
            )
        self.metrics = MetricsRegistry()
        self.metrics.build_info.labels(__version__).set(1)
        self.parsers = ParserRegistry()
        for section in config.parsers:
            self.parsers.add_section(section)
        for section in config.multiline_parsers:
            from_section(section)  # validated here, with its location, even if nothing uses it
        # The multiline filter finds [MULTILINE_PARSER] sections beside the parsers.
        setattr(self.parsers, "multiline_sections", list(config.multiline_parsers))  # noqa: B010
        self._counts: dict[str, int] = defaultdict(int)
        self.sources: list[BuiltComponent] = []
        self.transforms: list[BuiltComponent] = []
        self.sinks: list[BuiltComponent] = []
        routed_transforms: list[RoutedTransform] = []
        routed_sinks: list[RoutedSink] = []
        self.processors: dict[str, list[RoutedTransform]] = {}  # input/output id -> its processors
        storage_path = self.service["storage.path"]
        keep_rejected = self.service["storage.keep.rejected"]
        if keep_rejected and not storage_path:
            raise ConfigError(
                "needs storage.path (the dead-letter directory is under it)",
                config.service.location_of("storage.keep.rejected"),
                "storage.keep.rejected",
            )
        if keep_rejected is None:
            keep_rejected = bool(storage_path)
        # Inputs and outputs get their dead-letter writer in their context (see _build).
        self._rejected_dir = Path(storage_path) / self.service["storage.rejected.path"] if keep_rejected else None
        for section in config.inputs:
            built = self._build(section, "input", SOURCES, COMMON_INPUT_OPTIONS)
            if self.service["storage.inherit"] and self.service["storage.type"] and not section.get("storage.type"):
                built.config["storage.type"] = self.service["storage.type"]  # Fluent Bit's storage.inherit
            if built.config["storage.type"] == "memrb":
                built.config["storage.type"] = "memory"
                self.notes.append(
                    f"{section.location}: {built.component_id}: storage.type memrb is memory here: a full buffer "
                    "pauses the input instead of dropping the oldest records"
                )
            self.sources.append(built)
            self.processors[built.component_id] = self._build_processors(config.processors_of(section))
        for section in config.filters:
            built = self._build(section, "filter", TRANSFORMS, COMMON_FILTER_OPTIONS)
            self.transforms.append(built)
            routed_transforms.append(
                RoutedTransform(
                    built.instance, _matcher(section, built.config), built.instance.metrics, built.component_id
                )
            )
        self.notes.extend(_check_rewrite_loops(routed_transforms, config.filters))
        self.runners: list[SinkRunner] = []
        for source in self.sources:
            if source.config["storage.type"] == "filesystem" and not storage_path:
                section = config.inputs[self.sources.index(source)]
                raise ConfigError(
                    "storage.type filesystem needs storage.path in [SERVICE] (the directory of the buffers)",
                    section.location_of("storage.type"),
                    "storage.type",
                )
        for section in config.outputs:
            built = self._build(section, "output", SINKS, COMMON_OUTPUT_OPTIONS)
            try:
                retry_limit = parse_retry_limit(built.config["retry_limit"])
            except ValueError:
                raise ConfigError(
                    f"bad value {built.config['retry_limit']!r}; expected a number, no_limits, false or no_retries",
                    section.location_of("retry_limit"),
                    "retry_limit",
                ) from None
            if built.config["workers"] < 1:
                raise ConfigError(
                    f"bad value {built.config['workers']}; expected at least 1",
                    section.location_of("workers"),
                    "workers",
                )
            spool = None
            if storage_path:
                spool = DiskQueue(
                    Path(storage_path) / f"out.{built.component_id}",
                    built.instance.metrics,
                    built.instance.log,
                    sync=self.service["storage.sync"],
                    total_limit=built.config["storage.total_limit_size"],
                    mem_limit=self.service["storage.backlog.mem_limit"],
                )
            runner = SinkRunner(
                built.instance,
                built.component_id,
                built.instance.metrics,
                built.instance.log,
                retry_limit,
                built.config["workers"],
                backoff_base=max(0.001, float(self.service["scheduler.base"])),
                backoff_cap=float(self.service["scheduler.cap"]),
                spool=spool,
                dead_letters=built.dead_letters,
            )
            self.sinks.append(built)
            self.runners.append(runner)
            processors = self.processors[built.component_id] = self._build_processors(config.processors_of(section))
            routed_sinks.append(RoutedSink(runner, _matcher(section, built.config), processors))
        if not self.sources:
            raise ConfigError("the pipeline has no inputs", config.service.location)
        if not self.sinks:
            raise ConfigError("the pipeline has no outputs", config.service.location)
        self.router = Router(routed_transforms, routed_sinks, log)
        for routed in [*routed_transforms, *(p for chain in self.processors.values() for p in chain)]:
            self._attach_emitter(routed)
        self._stop = asyncio.Event()
        self._stopping = False
        self.http: Any = None
        self.started_at = time.time()

    def _build(
        self,
        section: Section,
        kind: str,
        registry: Mapping[str, Any],
        common: tuple[Option, ...],
        label: str = "",
    ) -> BuiltComponent:
        plugin = section.plugin_name
        if not plugin:
            raise ConfigError(f"[{kind.upper()}] has no 'name' (the plugin to use)", section.location, "name")
        try:
            cls = registry.get(plugin)
        except ImportError as exc:  # a plugin whose module cannot load here (a missing dependency)
            raise ConfigError(
                f"{kind} plugin {plugin!r} cannot load: {exc}", section.location_of("name"), "name"
            ) from None
        if cls is None:
            raise ConfigError(
                unknown_plugin_message(label or kind, plugin, list(registry)), section.location_of("name"), "name"
            )
        options = (*common, *cls.options)
        values = resolve_options(section, options, f"{label or kind} plugin '{plugin}'")
        self._note_no_effect(section, options, plugin)
        index = self._counts[f"{kind}:{plugin}"]
        self._counts[f"{kind}:{plugin}"] += 1
        component_id = values.get("alias") or f"{plugin}.{index}"
        if kind == "input" and not values.get("tag"):
            values["tag"] = component_id  # Fluent Bit's default tag is the instance name
        logger = logging.getLogger(f"kubetrail.{kind}.{component_id}")
        if values.get("log_level"):
            logger.setLevel(LEVELS[values["log_level"]])
        metrics_kind = {"input": "source", "filter": "transform", "output": "sink"}[kind]
        metrics = self.metrics.component(component_id, metrics_kind, plugin)
        dead_letters = None
        if self._rejected_dir is not None and kind != "filter":
            dead_letters = DeadLetters(self._rejected_dir, component_id, metrics, logger)
        ctx = ComponentContext(
            component_id=component_id,
            metrics=metrics,
            logger=logger,
            parsers=self.parsers,
            service=self.service,
            section=section,
            dead_letters=dead_letters,
        )
        try:
            instance = cls(ctx, values)
        except ConfigError as exc:
            if exc.location is None:
                key = exc.key or "name"
                raise ConfigError(exc.message, section.location_of(key), exc.key) from None
            raise
        secrets.bind(values, logger, metrics)  # ${file:...} credentials log and count as this plugin
        return BuiltComponent(component_id, kind, plugin, values, instance, dead_letters)

    def _build_processors(self, sections: list[Section]) -> list[RoutedTransform]:
        """An input's or output's ``processors.logs``: filter plugins bound to it (no match)."""
        chain = []
        for section in sections:
            built = self._build(section, "filter", TRANSFORMS, COMMON_FILTER_OPTIONS, label="processor")
            if built.config.get("match") or built.config.get("match_regex") is not None:
                self.notes.append(
                    f"{section.location}: processor {built.component_id}: its match is ignored: a processor sees "
                    "every record of the input or output it is on"
                )
            if built.plugin == "multiline" and built.instance.buffer:
                # A processor joins within each batch: a message held across batches would be
                # re-emitted through the routing, and from an output's processors it would
                # reach the other outputs too.
                built.instance.buffer = False
                self.notes.append(
                    f"{section.location}: processor {built.component_id}: buffer has no effect in a processor; "
                    "each batch is joined on its own (use the multiline filter to join across batches)"
                )
            condition = self.config.conditions.get(id(section))
            if condition is not None and isinstance(built.instance, Reemitting):
                raise ConfigError(
                    f"a condition on a {built.plugin} processor is not supported (it emits records of its own); "
                    "put the condition in its rules, or select the records with a grep processor before it",
                    section.location_of("name"),
                    "condition",
                )
            self.transforms.append(built)
            chain.append(
                RoutedTransform(
                    built.instance, TagMatcher(pattern="*"), built.instance.metrics, built.component_id, condition
                )
            )
        return chain

    def _attach_emitter(self, routed: RoutedTransform) -> None:
        """Filters that re-emit records (rewrite_tag, multiline) get the metrics of their emitter
        (Fluent Bit shows it as an input, ``emitter_for_<filter>`` unless ``emitter_name``) and
        the router's re-emit entry point for what they emit on a timer."""
        instance = routed.transform
        if not isinstance(instance, Reemitting):
            return
        name = getattr(instance, "emitter_name", None) or f"emitter_for_{routed.component_id}"
        instance.emitter_metrics = self.metrics.component(name, "source", "emitter")
        router = self.router

        async def emit(batch: Batch, durable: bool = False) -> None:
            await router.reemit(batch, routed, durable, frozenset({id(instance)}))

        instance.emit = emit  # type: ignore[attr-defined]

    def _note_no_effect(self, section: Section, options: tuple[Option, ...], plugin: str) -> None:
        """Log once per plugin and option that the user set an option with no effect here."""
        declared = {opt.name: opt for opt in options}
        for prop in section.properties:
            opt = declared.get(prop.name)
            if opt is None or not is_no_effect(opt) or (plugin, prop.name) in self._noted:
                continue
            self._noted.add((plugin, prop.name))
            self.notes.append(
                f"{prop.location}: option {prop.name!r} of {plugin or 'the service'} has no effect in kubetrail: "
                f"{opt.help[len(NO_EFFECT_MARK) :]}"
            )

    def describe(self) -> dict[str, Any]:
        """The resolved pipeline, for ``kubetrail check``."""

        def shown(config: dict[str, Any]) -> dict[str, Any]:
            return {
                k: shown_value(k, v.pattern if hasattr(v, "pattern") else v)
                for k, v in config.items()
                if v not in (None, [])
            }

        in_chains = {id(p.transform) for chain in self.processors.values() for p in chain}

        def with_processors(c: BuiltComponent) -> dict[str, Any]:
            out = {"id": c.component_id, "plugin": c.plugin, **shown(c.config)}
            chain = self.processors.get(c.component_id)
            if chain:
                out["processors"] = [p.component_id for p in chain]
            return out

        return {
            "service": shown(dict(self.service)),
            "inputs": [with_processors(c) for c in self.sources],
            "filters": [
                {"id": c.component_id, "plugin": c.plugin, **shown(c.config)}
                for c in self.transforms
                if id(c.instance) not in in_chains
            ],
            "processors": [
                {"id": c.component_id, "plugin": c.plugin, **shown(c.config)}
                for c in self.transforms
                if id(c.instance) in in_chains
            ],
            "outputs": [with_processors(c) for c in self.sinks],
            "parsers": self.parsers.names(),
            "notes": self.notes,
        }

    def request_stop(self) -> None:
        if not self._stopping:
            log.info("stopping: sources stop reading, sinks drain")
        self._stopping = True
        self._stop.set()

    async def run(self) -> int:
        for note in self.notes:
            log.info(note)
        if self.service["http_server"]:
            from kubetrail.runtime.http_server import MonitoringServer  # aiohttp costs 0.2 s to import

            self.http = MonitoringServer(
                self.metrics, self.service["http_listen"], self.service["http_port"], lambda: not self._stopping
            )
            try:
                await self.http.start()
            except OSError as exc:
                log.error(
                    "cannot start the monitoring server",
                    extra={"listen": self.service["http_listen"], "port": self.service["http_port"], "error": str(exc)},
                )
                return 1
            log.info("monitoring server listening", extra={"port": self.http.bound_port})
        for index, runner in enumerate(self.runners):
            try:
                runner.open()
            except StorageError as exc:
                log.error(f"cannot open the filesystem buffer: {exc}", extra={"output": runner.component_id})
                for opened in self.runners[:index]:
                    opened.cancel()
                if self.http is not None:
                    await self.http.stop()
                return 1
        for runner in self.runners:
            runner.start()
        for component in self.transforms:
            await _quietly(component.instance.start(), component.component_id)
        tasks = [
            asyncio.create_task(self._supervise(c.instance, c.component_id), name=c.component_id) for c in self.sources
        ]
        log.info(
            "pipeline started",
            extra={"inputs": len(self.sources), "filters": len(self.transforms), "outputs": len(self.sinks)},
        )
        all_sources: asyncio.Future[list[Any]] = asyncio.ensure_future(asyncio.gather(*tasks, return_exceptions=True))
        stop_wait: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([all_sources, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        if not self._stop.is_set():
            log.info("every source has finished; draining")
        self._stopping = True
        for component in self.sources:
            component.instance.stop()
        grace = float(self.service["grace"])
        deadline = time.monotonic() + grace
        clean = await self._within(all_sources, deadline, "sources did not stop")
        for component in self.transforms:
            # Messages a filter holds open (multiline buffer) go out before the outputs drain.
            flush = getattr(component.instance, "flush_held", None)
            if flush is not None:
                await _quietly(flush(), component.component_id)
        for task in tasks:
            task.cancel()
        drains = asyncio.gather(*(runner.drain() for runner in self.runners))
        clean = await self._within(drains, deadline, "sinks did not drain; the rest is replayed on restart") and clean
        left = _undelivered(self.runners)
        for runner in self.runners:
            runner.cancel()
        for component in self.sinks:
            await _quietly(component.instance.close(), component.component_id)
        for component in self.sources:
            await _quietly(component.instance.close(), component.component_id)
        for component in self.transforms:
            await _quietly(component.instance.close(), component.component_id)
        stop_wait.cancel()
        if self.http is not None:
            await self.http.stop()
        if left:
            # An SRE (or systemd, or a Job's backoff) must see this run did not finish its work.
            log.error(
                "stopped with undelivered data at the end of the grace period; nothing is lost: it is read "
                "again from the inputs' checkpoints (memory buffers) or replayed from the filesystem buffers "
                "on the next start",
                extra={
                    "outputs": "; ".join(left),
                    "records": sum(r.undelivered for r in self.runners),
                    "batches": sum(r.undelivered_batches for r in self.runners),
                    "grace": self.service["grace"],
                    "exit_code": EXIT_UNDELIVERED,
                },
            )
            return EXIT_UNDELIVERED
        log.info("stopped", extra={"clean": clean})
        return 0

    async def _within(self, awaitable: asyncio.Future[Any], deadline: float, message: str) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(awaitable), max(0.0, deadline - time.monotonic()))
            return True
        except TimeoutError:
            log.warning(message, extra={"grace": self.service["grace"]})
            awaitable.cancel()
            # Nobody awaits it any more: fetch its outcome so asyncio does not report it.
            awaitable.add_done_callback(lambda f: f.cancelled() or f.exception())
            return False

    async def _supervise(self, source: Source, component_id: str) -> None:
        """Run a source; if it crashes, log it and restart with backoff rather than die."""
        config = source.config
        emitter = _SourceEmitter(
            self.router,
            source.metrics,
            durable=config.get("storage.type") == "filesystem",
            mem_limit=None if getattr(source, "handles_mem_buf_limit", False) else config.get("mem_buf_limit"),
            processors=self.processors.get(component_id),
        )
        delay = 1.0
        while True:
            try:
                await source.run(emitter)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                source.metrics.error(type(exc).__name__)
                log.exception("source failed; restarting", extra={"component": component_id, "retry_in": delay})
                if self._stopping:
                    return
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                    return
                except TimeoutError:
                    delay = min(SOURCE_RESTART_CAP, delay * 2)


def _undelivered(runners: list[SinkRunner]) -> list[str]:
    """Log what each output did not deliver by the end of the grace period; one line each.

    Not lost: the sources' checkpoints did not move past those records (a filesystem buffer keeps
    its own on disk), so they are read and sent again after the restart."""
    left = []
    for runner in runners:
        if not runner.undelivered and not runner.spooled_bytes:
            continue
        detail = f"{runner.component_id} ({runner.undelivered} records in {runner.undelivered_batches} batches"
        if runner.spooled_bytes:
            detail += f"; {runner.spooled_bytes} bytes kept in its filesystem buffer"
        left.append(detail + ")")
        log.warning(
            "undelivered at shutdown; sent again after a restart",
            extra={
                "component": runner.component_id,
                "records": runner.undelivered,
                "batches": runner.undelivered_batches,
                "filesystem_buffer_bytes": runner.spooled_bytes,
            },
        )
    return left


def _matcher(section: Section, values: dict[str, Any]) -> TagMatcher:
    if values.get("match_regex") is not None:
        return TagMatcher(regex=values["match_regex"])
    if values.get("match"):
        return TagMatcher(pattern=values["match"])
    raise ConfigError(
        "needs 'match' (tag pattern with *) or 'match_regex', otherwise it receives nothing",
        section.location,
        "match",
    )


def _check_rewrite_loops(routed: list[RoutedTransform], sections: list[Section]) -> list[str]:
    """rewrite_tag filters whose fixed new tags feed each other in a cycle would re-emit forever
    in Fluent Bit (each emitter skips only its own filter). kubetrail's router cannot loop (a
    copy never passes a filter it came out of), but such a config is still a mistake: refuse it.
    A filter whose new tag matches its own ``match`` is fine (Fluent Bit's emitter does not hand
    a filter its own output, nor does kubetrail's router) and noted."""
    notes: list[str] = []
    rewriters = [(r, s) for r, s in zip(routed, sections, strict=True) if hasattr(r.transform, "static_tags")]
    edges: dict[int, list[int]] = {}
    for index, (source, section) in enumerate(rewriters):
        tags: list[str] = source.transform.static_tags()  # type: ignore[attr-defined]
        for tag in tags:
            if source.matcher.matches(tag):
                notes.append(
                    f"{section.location}: {source.component_id}: new tag {tag!r} matches the filter's own match; "
                    "like Fluent Bit's emitter, the rewritten records do not pass through it again"
                )
        edges[index] = [
            other
            for other, (target, _) in enumerate(rewriters)
            if other != index and any(target.matcher.matches(tag) for tag in tags)
        ]
    for start in edges:
        path = [start]
        stack = [iter(edges[start])]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                path.pop()
                continue
            if child == start:
                names = " -> ".join(rewriters[i][0].component_id for i in [*path, start])
                raise ConfigError(
                    f"rewrite_tag filters re-emit into each other in a loop ({names}): each one's new tag is "
                    "matched by the next; change a match or a rule's new tag",
                    rewriters[start][1].location_of("rule"),
                    "rule",
                )
            if child not in path:
                path.append(child)
                stack.append(iter(edges[child]))
    return notes


async def _quietly(awaitable: Any, component_id: str) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("error while closing", extra={"component": component_id})


__all__ = ["Pipeline", "Sink", "Source", "Transform"]
