"""The ``kubernetes_events`` input: every Event occurrence, delivered exactly once.

Fluent Bit's input of the same name loses repeats (it dedupes by uid), re-lists everything every
10 minutes, and must run as a single instance. Here:

* **An occurrence is ``(uid, resourceVersion)``.** A repeated event is the same object PATCHed
  with a new count/series and a new resourceVersion: a watch MODIFIED that is delivered, not
  swallowed. DELETED (TTL expiry) is emitted only with ``emit_deleted on``.
* **List once, then watch.** The resume point is the *list's* resourceVersion (items are
  unordered), then the last one seen on the watch, BOOKMARKs included. The watch times out after
  a randomised ``kube_watch_timeout`` and resumes where it was: no periodic re-list.
* **410 Gone, in all three forms** (HTTP 410, an in-stream ERROR with code 410, or for Events a
  200 stream closing at once with nothing in it) means "history compacted": list again, and send
  only what the delivered keys do not already cover.
* **Checkpoints follow acknowledgements.** Batches carry tokens from an ordered tracker; the
  stored resourceVersion moves only when a batch and all before it are delivered, and delivered
  keys are recorded per batch in ``db`` (see :mod:`.kubernetes_events_state`).
* **High availability** (``leader_election on``): replicas compete for a Lease; the leader also
  writes its checkpoint into the Lease, so a new leader elsewhere resumes where the old one
  stopped. A leader that cannot renew within ``renew_deadline`` stops before the lease expires.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from typing import Any

import aiohttp

from kubetrail.core.acks import OrderedAcks
from kubetrail.core.component import ApiAccess, ComponentContext, Emitter, Source
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.core.state import DB_OPTIONS, StateDB
from kubetrail.kube.backoff import Backoff
from kubetrail.kube.client import ApiError, KubeClient
from kubetrail.kube.config import CONNECTION_OPTIONS, connection_from_options
from kubetrail.kube.credentials import CredentialError
from kubetrail.kube.leader import LeaderElector
from kubetrail.parsers.timefmt import TimeParser
from kubetrail.sources.kubernetes_events_state import EventsState, Key

API_PATHS = {"core/v1": "/api/v1", "events.k8s.io/v1": "/apis/events.k8s.io/v1"}
API_VERSIONS = {"core/v1": "v1", "events.k8s.io/v1": "events.k8s.io/v1"}
MAX_BATCH = 500
EMPTY_CLOSE_SECONDS = 1.0
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

_TIMES = TimeParser()


def occurrence_time_ns(event: dict[str, Any]) -> int | None:
    """The time of the occurrence an Event (either API) reports, with microseconds.

    ``series.lastObservedTime``, else ``lastTimestamp`` / ``deprecatedLastTimestamp``, else
    ``eventTime``, else ``firstTimestamp`` / ``deprecatedFirstTimestamp``, else creation.
    """
    series = event.get("series") or {}
    for value in (
        series.get("lastObservedTime"),
        event.get("lastTimestamp") or event.get("deprecatedLastTimestamp"),
        event.get("eventTime"),
        event.get("firstTimestamp") or event.get("deprecatedFirstTimestamp"),
        (event.get("metadata") or {}).get("creationTimestamp"),
    ):
        if value:
            try:
                return _TIMES.parse_ns(value)
            except (ValueError, TypeError):
                continue
    return None


class _Gone(Exception):
    """The server no longer has the history to resume from (one of the three 410 forms)."""

    def __init__(self, form: str) -> None:
        super().__init__(form)
        self.form = form


class _Stopped(Exception):
    """Raised inside a list when the source is asked to stop."""


async def _next_or_stop(
    queue: asyncio.Queue[dict[str, Any] | None], stopping: asyncio.Future[Any]
) -> dict[str, Any] | None:
    """The next watch event, or None once ``stopping`` is done (or the stream ended)."""
    if not queue.empty() or stopping.done():
        return queue.get_nowait() if not queue.empty() else None
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait({getter, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    return None


class KubernetesEventsSource(Source):
    plugin_name = "kubernetes_events"
    description = "Kubernetes Events by list + watch, each occurrence exactly once, resumable, HA"
    options = (
        *CONNECTION_OPTIONS,
        Option("kube_request_limit", "int", 500, help="List page size (0: Fluent Bit's unpaginated; we page at 500)"),
        Option("kube_retention_time", "duration", 3600.0, help="How long delivered keys are kept (>= --event-ttl)"),
        Option("kube_namespace", "list", [], help="Namespaces to watch, comma-separated (default: all)"),
        Option("kube_api", "choice", "core/v1", choices=("core/v1", "events.k8s.io/v1")),
        Option("field_selector", help="Server-side selector, e.g. type=Warning"),
        Option("kube_watch_timeout", "duration", 600.0, help="Watch length; randomised, resumed without re-list"),
        Option("interval_sec", "int", 0, help="Reconnect delay, seconds part (Fluent Bit)"),
        Option("interval_nsec", "int", 500_000_000, help="Reconnect delay, nanoseconds part (Fluent Bit)"),
        Option("emit_deleted", "bool", False, help="Also emit DELETED (TTL expiry)"),
        Option("strip_managed_fields", "bool", True),
        Option("cluster_name", help="Cluster name made available to outputs (record metadata and cluster_name_key)"),
        Option("cluster_name_key", help="Add cluster_name to each record under this key"),
        Option("watch_type_key", help="Add the watch type (ADDED, MODIFIED, DELETED) under this key"),
        Option("leader_election", "bool", False, help="Run N replicas; one leader collects"),
        Option("leader_election.lease_name", "str", "kubetrail-events"),
        Option("leader_election.lease_namespace", "str", "kubetrail"),
        Option("leader_election.lease_duration", "duration", 15.0),
        Option("leader_election.renew_deadline", "duration", 10.0),
        Option("leader_election.retry_period", "duration", 2.0),
        Option("leader_election.identity", help="Holder identity (default: hostname-pid-random)"),
        *DB_OPTIONS,
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.api: str = config["kube_api"]
        self.tag: str = config["tag"]
        self.connection = connection_from_options(config)
        self.namespaces: list[str] = config["kube_namespace"] or [""]
        self.field_selector: str | None = config["field_selector"]
        self.page_size = config["kube_request_limit"] or 500
        self.watch_timeout = max(10.0, config["kube_watch_timeout"])
        self.reconnect = max(0.05, config["interval_sec"] + config["interval_nsec"] / 1e9)
        self.emit_deleted: bool = config["emit_deleted"]
        self.strip_managed: bool = config["strip_managed_fields"]
        self.cluster_name: str | None = config["cluster_name"]
        self.cluster_key: str | None = config["cluster_name_key"]
        self.type_key: str | None = config["watch_type_key"]
        if self.cluster_key and not self.cluster_name:
            raise ConfigError("cluster_name_key needs cluster_name", key="cluster_name_key")
        self.retention: float = config["kube_retention_time"]
        self.config_values = config
        self.leader_election: bool = config["leader_election"]
        le = config
        if self.leader_election and not le["leader_election.renew_deadline"] < le["leader_election.lease_duration"]:
            raise ConfigError(
                "renew_deadline must be shorter than lease_duration", key="leader_election.renew_deadline"
            )
        self._stop = asyncio.Event()
        self.client: KubeClient | None = None
        self.db: StateDB | None = None
        self.states: dict[str, EventsState] = {}
        self.elector: LeaderElector | None = None
        m = self.metrics
        self.m_lists = m.counter("kubetrail_k8s_events_lists", "Event lists started")
        self.m_pages = m.counter("kubetrail_k8s_events_list_pages", "Event list pages read")
        self.m_watches = m.counter("kubetrail_k8s_events_watches", "Watches started, by reason", "reason")
        self.m_gone = m.counter("kubetrail_k8s_events_gone", "410 Gone answers, by form", "form")
        self.m_bookmarks = m.counter("kubetrail_k8s_events_bookmarks", "Watch bookmarks received")
        self.m_emitted = m.counter("kubetrail_k8s_events_emitted", "Event occurrences emitted")
        self.m_duplicates = m.counter("kubetrail_k8s_events_duplicates_suppressed", "Occurrences already delivered")
        self.m_invalid = m.counter("kubetrail_k8s_events_invalid", "Objects without uid or resourceVersion")
        self.m_bad_lines = m.counter("kubetrail_k8s_events_bad_lines", "Undecodable watch stream lines skipped")
        self.m_lag = m.histogram("kubetrail_k8s_events_lag_seconds", "Occurrence time to emission", LAG_BUCKETS)
        self.m_leader = m.gauge("kubetrail_k8s_events_leader", "1 while this replica is the leader")

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        if self.elector is not None:
            await self.elector.release()
        if self.client is not None:
            await self.client.close()
        if self.db is not None:
            self.db.close()
            self.db = None

    async def run(self, emitter: Emitter) -> None:
        self.client = KubeClient(
            self.connection, self.log, on_bad_line=lambda _m: self.m_bad_lines.inc(), metrics=self.metrics
        )
        if self.db is None:
            self.db = StateDB.from_options(self.config_values)
        for namespace in self.namespaces:
            scope = f"{self.api}|{namespace or '*'}|{self.field_selector or ''}"
            self.states[namespace] = EventsState(self.db, scope, self.retention)
        if self.db is None and not self.leader_election:
            self.log.warning("no db and no leader_election: a restart will re-send the Events still in the cluster")
        if not self.leader_election:
            await self._follow_all(emitter)
            return
        cfg = self.config_values
        self.elector = LeaderElector(
            self.client,
            namespace=cfg["leader_election.lease_namespace"],
            name=cfg["leader_election.lease_name"],
            identity=cfg["leader_election.identity"]
            or f"{socket.gethostname()}-{_pid()}-{random.randrange(1 << 32):08x}",
            lease_duration=cfg["leader_election.lease_duration"],
            renew_deadline=cfg["leader_election.renew_deadline"],
            retry_period=cfg["leader_election.retry_period"],
            logger=self.log,
            checkpoint=self._cluster_checkpoint,
        )
        while not self._stop.is_set():
            acquired = await self.elector.acquire(self._stop)
            if not acquired:
                return
            self.m_leader.set(1)
            self._adopt_cluster_checkpoint(self.elector.adopted_checkpoint)
            work = asyncio.create_task(self._follow_all(emitter))
            lost = asyncio.create_task(self.elector.hold(self._stop))
            await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
            work.cancel()  # leadership lost (or stopping): stop emitting at once
            await asyncio.gather(work, return_exceptions=True)
            lost.cancel()
            await asyncio.gather(lost, return_exceptions=True)
            self.m_leader.set(0)
            for state in self.states.values():
                state.in_flight.clear()

    def _cluster_checkpoint(self) -> dict[str, str]:
        return {state.scope: state.checkpoint for state in self.states.values() if state.checkpoint}

    def _adopt_cluster_checkpoint(self, stored: dict[str, str]) -> None:
        for state in self.states.values():
            rv = stored.get(state.scope)
            if rv and rv != state.checkpoint:
                self.log.info("resuming from the checkpoint in the Lease", extra={"scope": state.scope, "rv": rv})
                state.checkpoint = rv
                state.adopted_from_lease = True

    async def _follow_all(self, emitter: Emitter) -> None:
        await asyncio.gather(*(self._follow(ns, state, emitter) for ns, state in self.states.items()))

    def api_access(self) -> list[ApiAccess]:
        group = "" if self.api == "core/v1" else "events.k8s.io"
        needed = [ApiAccess(verb, "events", group, ns) for ns in self.namespaces for verb in ("list", "watch")]
        if self.leader_election:
            # create cannot name its object; get and update touch only our own Lease.
            lease_ns = self.config["leader_election.lease_namespace"]
            lease = self.config["leader_election.lease_name"]
            needed.append(ApiAccess("create", "leases", "coordination.k8s.io", lease_ns))
            needed += [ApiAccess(v, "leases", "coordination.k8s.io", lease_ns, lease) for v in ("get", "update")]
        return needed

    # -- list + watch ----------------------------------------------------------------------------

    def _path(self, namespace: str) -> str:
        base = API_PATHS[self.api]
        return f"{base}/namespaces/{namespace}/events" if namespace else f"{base}/events"

    async def _follow(self, namespace: str, state: EventsState, emitter: Emitter) -> None:
        def advance(resource_version: str) -> None:
            state.set_checkpoint(resource_version)
            if self.elector is not None:
                self.elector.checkpoint_changed()

        acks: OrderedAcks[str] = OrderedAcks(advance)
        backoff = Backoff(initial=self.reconnect, maximum=30.0)
        resume = state.checkpoint
        reason = "start"
        while not self._stop.is_set():
            try:
                if resume is None:
                    resume = await self._relist(namespace, state, acks, emitter)
                self.m_watches.labels(reason).inc()
                resume = await self._watch(namespace, state, acks, emitter, resume)
                reason = "timeout"
                backoff.reset()
                continue
            except _Stopped:
                return
            except _Gone as gone:
                self.m_gone.labels(gone.form).inc()
                self.log.info("history gone; listing again", extra={"form": gone.form, "namespace": namespace or "*"})
                resume, reason = None, "gone"
                continue
            except ApiError as exc:
                reason = f"http_{exc.status}"
                if exc.status == 410:
                    self.m_gone.labels("expired_continue" if "continue" in exc.message else "http").inc()
                    resume, reason = None, "gone"
                    continue
                self._log_api_error(exc, namespace)
            except CredentialError as exc:
                reason = "credentials"
                self.metrics.error("credentials")
                self.log.error(str(exc))
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                reason = "connection"
                self.metrics.error("connection")
                self.log.warning(
                    "API server unreachable",
                    extra={"error": str(exc) or type(exc).__name__, "url": self.connection.url},
                )
            delay = backoff.next()
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
            except TimeoutError:
                pass

    def _log_api_error(self, exc: ApiError, namespace: str) -> None:
        self.metrics.error(f"http_{exc.status}")
        where = f"in namespace {namespace}" if namespace else "cluster-wide"
        group = "" if self.api == "core/v1" else "events.k8s.io"
        if exc.status == 403:
            self.log.error(
                f"forbidden: this identity needs 'list' and 'watch' on 'events' (apiGroup {group!r}) {where}",
                extra={"server_message": exc.message},
            )
        elif exc.status == 401:
            self.log.error(
                "unauthorized: the token was refused (re-read once already)",
                extra={"token_file": self.connection.token_file},
            )
        else:
            self.log.warning("API error", extra={"status": exc.status, "reason": exc.reason, "error": exc.message})

    async def _relist(self, namespace: str, state: EventsState, acks: OrderedAcks[str], emitter: Emitter) -> str:
        assert self.client is not None
        self.m_lists.inc()
        params = {"fieldSelector": self.field_selector} if self.field_selector else {}
        list_rv = ""
        fresh: list[dict[str, Any]] = []
        floor = _int_rv(state.checkpoint) if state.adopted_from_lease else None
        async for page in self.client.list_pages(self._path(namespace), params, self.page_size):
            self.m_pages.inc()
            list_rv = (page.get("metadata") or {}).get("resourceVersion") or list_rv
            if self._stop.is_set():
                raise _Stopped  # a long first list must not hold up a shutdown
            for item in page.get("items") or []:
                key = self._key(item)
                if key is None:
                    continue
                if state.seen(key) or (floor is not None and (_int_rv(key[1]) or 0) <= floor):
                    self.m_duplicates.inc()
                    continue
                fresh.append(item)
                if len(fresh) >= MAX_BATCH:
                    await self._emit(state, acks, emitter, [("ADDED", o) for o in fresh], None)
                    fresh = []
        if not list_rv:
            raise ApiError(200, "NotKubernetes", "list answer without metadata.resourceVersion")
        # The list's resourceVersion is the resume point, reached when every item is delivered.
        await self._emit(state, acks, emitter, [("ADDED", o) for o in fresh], list_rv)
        state.adopted_from_lease = False
        self.log.info("listed events; watching", extra={"namespace": namespace or "*", "resource_version": list_rv})
        return list_rv

    async def _watch(
        self, namespace: str, state: EventsState, acks: OrderedAcks[str], emitter: Emitter, resume: str
    ) -> str:
        assert self.client is not None
        params = {"resourceVersion": resume, "allowWatchBookmarks": "true"}
        if self.field_selector:
            params["fieldSelector"] = self.field_selector
        timeout = int(self.watch_timeout * random.uniform(0.5, 1.0))
        started = time.monotonic()
        seen_any = False
        pending: list[tuple[str, dict[str, Any]]] = []
        last_rv = resume
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=MAX_BATCH * 2)

        async def reader() -> None:
            try:
                async for event in self.client.watch(self._path(namespace), params, timeout):  # type: ignore[union-attr]
                    await queue.put(event)  # a full queue stops reading the stream: backpressure
            finally:
                await queue.put(None)

        task = asyncio.create_task(reader())
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            while True:
                event = await _next_or_stop(queue, stopping)
                if event is None and self._stop.is_set():
                    # Stop between batches: what was emitted is acknowledged as usual, the rest
                    # of the stream is read again from the checkpoint next time.
                    return last_rv
                while event is not None:
                    last_rv = self._take(event, pending, last_rv)
                    seen_any = True
                    if len(pending) >= MAX_BATCH or queue.empty():
                        break  # emit what arrived together; under load that is a full batch
                    event = queue.get_nowait()
                if pending or last_rv != resume:
                    await self._emit(state, acks, emitter, pending, last_rv)
                    pending = []
                    resume = last_rv
                if event is None:
                    break
            await asyncio.wait([task])
            failure = task.exception()
            if failure is not None:
                raise failure
        finally:
            stopping.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if not seen_any and time.monotonic() - started < EMPTY_CLOSE_SECONDS:
            raise _Gone("empty_stream")
        return last_rv

    def _take(self, event: dict[str, Any], pending: list[tuple[str, dict[str, Any]]], last_rv: str) -> str:
        kind = event.get("type")
        obj = event["object"]
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Gone("watch_error")
            raise ApiError(int(code or 500), str(obj.get("reason") or ""), str(obj.get("message") or ""))
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            self.m_bookmarks.inc()
            return rv or last_rv
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            pending.append((kind, obj))
            return rv or last_rv
        return last_rv

    def _key(self, obj: dict[str, Any]) -> Key | None:
        meta = obj.get("metadata") or {}
        uid, rv = meta.get("uid"), meta.get("resourceVersion")
        if not uid or not rv:
            self.m_invalid.inc()
            self.log.warning(
                "Event without uid or resourceVersion skipped",
                extra={"event": meta.get("name"), "namespace": meta.get("namespace")},
            )
            return None
        return (uid, rv)

    async def _emit(
        self,
        state: EventsState,
        acks: OrderedAcks[str],
        emitter: Emitter,
        events: list[tuple[str, dict[str, Any]]],
        position: str | None,
    ) -> None:
        records: list[Record] = []
        keys: list[Key] = []
        now = time.time_ns()
        for kind, obj in events:
            if kind == "DELETED" and not self.emit_deleted:
                continue
            key = self._key(obj)
            if key is None:
                continue
            if state.seen(key):
                self.m_duplicates.inc()
                continue
            state.in_flight.add(key)
            keys.append(key)
            records.append(self._record(kind, obj, now))
        if not records and position is None:
            return

        def done(delivered: bool) -> None:
            if delivered:
                state.mark_delivered(keys)
            else:
                state.forget_in_flight(keys)

        token = acks.token(position, done)
        if not records:
            token.seal()  # a bookmark or an empty list: the checkpoint may still move
            return
        self.m_emitted.inc(len(records))
        for record in records:
            self.m_lag.observe(max(0.0, (now - record.time_ns) / 1e9))
        await emitter.send(Batch(self.tag, records, token, sum(len(str(r.identity)) for r in records)))

    def _record(self, kind: str, obj: dict[str, Any], now: int) -> Record:
        obj.setdefault("kind", "Event")
        obj.setdefault("apiVersion", API_VERSIONS[self.api])
        meta = obj.get("metadata") or {}
        if self.strip_managed:
            meta.pop("managedFields", None)
        if self.type_key:
            obj[self.type_key] = kind
        if self.cluster_key:
            obj[self.cluster_key] = self.cluster_name
        time_ns = occurrence_time_ns(obj) or now
        return Record(
            self.tag,
            time_ns,
            obj,
            identity=(meta.get("uid"), meta.get("resourceVersion")),
            meta={"watch_type": kind, "cluster": self.cluster_name},
        )


def _int_rv(rv: str | None) -> int | None:
    """resourceVersions are opaque; only for a failover re-list (no local keys) is the etcd
    revision compared as a number, and only when it is one."""
    try:
        return int(rv) if rv else None
    except ValueError:
        return None


def _pid() -> int:
    import os

    return os.getpid()
