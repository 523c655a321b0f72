"""The three component kinds (sources, transforms, sinks) and what the runtime gives them.

A component is one module that declares its options, builds itself from the validated values
and exposes a few coroutines; the runtime does routing, buffering, retries, acknowledgements
and metrics around it. Plugins depend only on this module and the rest of ``core``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from kubetrail.core.dead_letter import DeadLetters
from kubetrail.core.metrics import ComponentMetrics
from kubetrail.core.options import Option, Section
from kubetrail.core.record import Batch, Record


class ParserLookup(Protocol):
    def get(self, name: str) -> Any: ...

    def names(self) -> list[str]: ...


@dataclass
class ComponentContext:
    """What the runtime hands a component when it is built."""

    component_id: str  # alias, or plugin name + index as Fluent Bit names instances (tail.0)
    metrics: ComponentMetrics
    logger: logging.Logger
    parsers: ParserLookup
    service: Mapping[str, Any] = field(default_factory=dict)
    # The config section as written, for plugins whose semantics depend on the order of
    # repeated keys (modify applies its rules in the order they appear).
    section: Section | None = None
    # Where records this component will never pass on are kept (service storage.path +
    # storage.rejected.path, <component id>.jsonl); None when storage.keep.rejected is off.
    # Given to inputs and outputs, so a plugin never works out the runtime's policy itself.
    dead_letters: DeadLetters | None = None


@dataclass(frozen=True)
class ApiAccess:
    """One Kubernetes API permission a component's code uses. ``kubetrail check --in-cluster``
    asks the API server about each (SelfSubjectAccessReview), and the Helm chart's roles grant
    exactly these, so the list is the single statement of what a plugin needs."""

    verb: str
    resource: str
    group: str = ""  # "" is the core API group
    namespace: str = ""  # "" means cluster-wide
    name: str = ""  # one object only (a role may then limit it with resourceNames)

    def rule(self) -> str:
        """The RBAC rule that grants it, as a user would paste it into a (Cluster)Role."""
        names = f', resourceNames: ["{self.name}"]' if self.name else ""
        return f'{{apiGroups: ["{self.group}"], resources: ["{self.resource}"]{names}, verbs: ["{self.verb}"]}}'


class Component:
    plugin_name: ClassVar[str]
    description: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, ctx: ComponentContext, config: Mapping[str, Any]) -> None:
        self.ctx = ctx
        self.config = config
        self.log = ctx.logger
        self.metrics = ctx.metrics

    def api_access(self) -> list[ApiAccess]:
        """The Kubernetes API calls this instance makes with its configuration (none by default).
        A component that returns some also has a ``connection`` (kube.config.ConnectionConfig)."""
        return []


class Emitter(Protocol):
    """Where a source sends batches. ``send`` waits while downstream buffers are full.

    ``after``: the source's previous send, when the source does not wait for one send before it
    makes the next (the tail, so that reading overlaps filters working in threads). The batch
    goes through the filters at once but into the sink buffers only after that send finished:
    the order of a source's batches is kept.
    """

    async def send(self, batch: Batch, *, after: Awaitable[None] | None = None) -> None: ...


class Source(Component):
    """Produces batches until stopped (or, for a finite source, until its input is used up)."""

    async def run(self, emitter: Emitter) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Ask :meth:`run` to return soon; anything emitted but not acknowledged is replayed later."""

    async def close(self) -> None:
        """Release resources (state files) after every sink has drained."""


class Transform(Component):
    """Changes or drops records. Synchronous: transforms are CPU work on a batch in memory."""

    def process(self, records: list[Record]) -> list[Record]:
        raise NotImplementedError

    def process_batch(self, batch: Batch) -> Batch:
        """The batch after this filter. The default runs :meth:`process` on its records.

        A filter that can work on a lazy batch's block as a whole (without a record per line;
        see :mod:`kubetrail.core.block`) overrides this and returns a lazy batch of its own.
        """
        return batch.derive(self.process(batch.records))

    async def process_batch_async(self, batch: Batch) -> Batch:
        """What the router calls: :meth:`process_batch`, unless the filter overrides this to run
        its heavy part in a thread of its own, so the event loop's thread (which reads the
        sources) goes on meanwhile. The result and its order are the same either way."""
        return self.process_batch(batch)

    async def start(self) -> None:
        """Background work a filter needs (e.g. watches), started before any source runs."""

    async def close(self) -> None:
        """Stop that background work, after the sinks have drained."""


class Sink(Component):
    """Delivers batches durably. ``write`` returns only once the batch is safe (fsync, 2xx, ack).

    It raises :class:`~kubetrail.core.errors.RetryableError` for failures worth retrying and
    :class:`~kubetrail.core.errors.PermanentError` for payloads the destination will never take.
    """

    async def start(self) -> None:
        """Open files or connections; failures here are retried by the runtime like writes."""

    async def write(self, batch: Batch) -> None:
        raise NotImplementedError

    def group_key(self, batch: Batch) -> object | None:
        """Batches with the same key, queued one after the other, may be written by one
        :meth:`write_group` call (a file output: one fsync for all). None: never grouped."""
        return None

    async def write_group(self, batches: list[Batch]) -> None:
        """Writes ``batches`` (same :meth:`group_key`) in order, all or none: on failure nothing
        of them may stay behind, since each is then written again on its own."""
        raise NotImplementedError

    async def close(self) -> None:
        """Flush and release resources at shutdown."""
