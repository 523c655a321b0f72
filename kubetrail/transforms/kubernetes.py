"""The ``kubernetes`` filter: pod and namespace metadata on container log records.

Fluent Bit's filter of the same name looks a pod up with one GET per cache miss (with
``Connection: close``), keeps 256 entries evicted at random and caches no misses, so a node
with many pods, or one pod it cannot find, puts a steady load on the API server. Here:

* **Watches, not lookups.** One pod LIST + WATCH for this node
  (``fieldSelector=spec.nodeName=<node_name>``) and, only when namespace labels or annotations
  are asked for, one namespace LIST + WATCH (:mod:`kubetrail.kube.informer`). The number of
  requests does not depend on the number of pods or lines; there is never a GET per pod.
* **Startup.** :meth:`start` (called by the pipeline before any input runs) waits up to
  ``kube_meta_sync_timeout`` for the first lists. A record whose pod is not (yet) known is never
  held or dropped: it goes on with what its tag says (pod, namespace, container, container ID),
  and is counted (``kubetrail_k8s_metadata_misses_total{reason}``).
* **Misses are cached.** A pod that cannot be found is remembered with a backoff (1 s doubling
  to 5 min) so it is reported once per period, not once per line; the watch adding the pod
  clears it at once.
* **Deleted pods** stay for ``deleted_pod_grace`` (default 5 min): the lines a pod wrote just
  before it was deleted are usually read after, and still get its metadata. Pods are found by
  container ID first, so a recreated pod with the same name (StatefulSet) never lends its
  metadata to its predecessor's lines.
* **Memory is bounded**: only the fields used are kept (labels, annotations, owners, node,
  IP, containers), for this node's pods; deleted pods and cached misses have fixed caps.
* **Per batch, not per record.** A batch from ``tail`` is one file, so one tag: the metadata is
  resolved once per tag and the same prepared dict is set on every record (treat it as
  read-only). Only ``merge_log`` costs per record, and only for lines that start with ``{``.
* **A block stays a block** (:meth:`KubernetesTransform.process_batch`). Where the batch is
  still a block of canonical JSON lines (``LineBlock.canonical``: the container joiners' CRI and
  docker records, lines read with no parser) and the filter would only add members to its
  records (no exclude or parser annotation for any stream, no ``merge_log`` work: no ``log``
  starting with ``{``, no ``merge_parser``), the metadata's JSON, encoded once per tag, is
  spliced in before each line's closing brace: the bytes orjson writes for the record path's
  bodies, without a record per line (tail + cri + kubernetes -> file, 500,000 lines of 500
  pods: 2.5-2.8 s of CPU on the record path, 1.0-1.5 s so; docs/benchmarks.md, issue 7's
  table). Any other batch takes the record path.

Record shape (Fluent Bit's): ``kubernetes`` = ``{pod_name, namespace_name, pod_id, labels,
annotations, host, pod_ip, container_name, docker_id, container_hash, container_image,
ownerReferences}`` (missing parts omitted; labels/annotations/ownerReferences per options), and
with ``namespace_labels`` / ``namespace_annotations``: ``kubernetes_namespace`` = ``{name,
labels, annotations}``.

Pod annotations (with ``k8s-logging.parser`` / ``k8s-logging.exclude`` on), ``kubetrail.io/``
first, then Fluent Bit's ``fluentbit.io/``: ``parser``, ``parser_<stream>``, ``parser-<container>``,
``parser_<stream>-<container>``, and the same for ``exclude`` (value ``true``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from typing import Any

import orjson

from kubetrail.core.block import ReadyBlock
from kubetrail.core.component import ApiAccess, ComponentContext, Transform
from kubetrail.core.config.compat import no_effect
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record
from kubetrail.kube.client import KubeClient
from kubetrail.kube.config import CONNECTION_OPTIONS, connection_from_options
from kubetrail.kube.informer import Informer

# Fluent Bit's tag regex for /var/log/containers names (after kube_tag_prefix).
TAG_REGEX = re.compile(
    r"(?P<pod_name>[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*)"
    r"_(?P<namespace_name>[^_]+)_(?P<container_name>.+)-(?P<docker_id>[a-z0-9]{64})\.log$"
)
ANNOTATION_PREFIXES = ("kubetrail.io/", "fluentbit.io/")
MAX_DELETED = 10_000
MAX_MISSES = 10_000
MAX_TAGS = 50_000
MISS_BACKOFF_MAX = 300.0


class PodInfo:
    """The parts of a Pod the filter uses; built once per watch event."""

    __slots__ = (
        "annotations",
        "built",
        "containers",
        "deleted_at",
        "labels",
        "name",
        "namespace",
        "node",
        "owners",
        "pod_ip",
        "uid",
    )

    def __init__(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        self.name: str = meta.get("name") or ""
        self.namespace: str = meta.get("namespace") or ""
        self.uid: str = meta.get("uid") or ""
        self.labels: dict[str, str] = meta.get("labels") or {}
        self.annotations: dict[str, str] = meta.get("annotations") or {}
        self.owners: list[dict[str, Any]] = meta.get("ownerReferences") or []
        self.node: str | None = spec.get("nodeName")
        self.pod_ip: str | None = status.get("podIP")
        # container name -> (image, imageID, containerID without the runtime prefix)
        self.containers: dict[str, tuple[str | None, str | None, str | None]] = {}
        for key in ("initContainers", "containers", "ephemeralContainers"):
            for c in spec.get(key) or []:
                self.containers[c.get("name", "")] = (c.get("image"), None, None)
        for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
            for cs in status.get(key) or []:
                cid = cs.get("containerID") or ""
                self.containers[cs.get("name", "")] = (
                    cs.get("image"),
                    cs.get("imageID") or None,
                    cid.split("://", 1)[-1] or None,
                )
        self.deleted_at: float | None = None
        self.built: dict[tuple[str, str], dict[str, Any]] = {}

    def container_ids(self) -> list[str]:
        return [cid for _, _, cid in self.containers.values() if cid]

    def annotation(self, name: str, stream: str | None, container: str) -> str | None:
        """Most specific first: ``name_<stream>-<container>``, ``name-<container>``,
        ``name_<stream>``, ``name``; kubetrail.io before fluentbit.io."""
        keys = []
        if stream:
            keys.append(f"{name}_{stream}-{container}")
        keys.append(f"{name}-{container}")
        if stream:
            keys.append(f"{name}_{stream}")
        keys.append(name)
        for key in keys:
            for prefix in ANNOTATION_PREFIXES:
                value = self.annotations.get(prefix + key)
                if value is not None:
                    return value
        return None


class PodStore:
    """This node's pods, by (namespace, name) and by container ID, plus recently deleted ones."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.pods: dict[tuple[str, str], PodInfo] = {}
        self.by_container: dict[str, PodInfo] = {}
        self.deleted: OrderedDict[str, PodInfo] = OrderedDict()  # uid -> pod, oldest first
        self.deleted_by_name: dict[tuple[str, str], PodInfo] = {}
        self._listed: set[tuple[str, str]] | None = None
        self.version = 0  # bumped on every change: resolved tags are re-resolved

    def begin_list(self) -> None:
        self._listed = set()

    def end_list(self) -> None:
        listed = self._listed or set()
        for key in [k for k in self.pods if k not in listed]:
            self._delete(self.pods[key])
        self._listed = None

    def apply(self, kind: str, obj: dict[str, Any]) -> None:
        pod = PodInfo(obj)
        key = (pod.namespace, pod.name)
        if kind == "DELETED":
            current = self.pods.get(key)
            if current is not None and current.uid == pod.uid:
                del self.pods[key]
            self._delete(pod)
            return
        if self._listed is not None:
            self._listed.add(key)
        old = self.pods.get(key)
        if old is not None and old.uid != pod.uid:
            self._delete(old)  # replaced by a new pod of the same name
        self.pods[key] = pod
        for cid in pod.container_ids():
            self.by_container[cid] = pod
        self.version += 1

    def _delete(self, pod: PodInfo) -> None:
        """Keep a deleted pod for the grace period: its last lines are often read after."""
        if self.pods.get((pod.namespace, pod.name)) is pod:
            del self.pods[(pod.namespace, pod.name)]
        pod.deleted_at = time.monotonic()
        self.deleted[pod.uid] = pod
        self.deleted.move_to_end(pod.uid)
        self.deleted_by_name[(pod.namespace, pod.name)] = pod
        for cid in pod.container_ids():
            self.by_container[cid] = pod
        while len(self.deleted) > MAX_DELETED:
            self._expire(self.deleted.popitem(last=False)[1])
        self.version += 1

    def sweep(self, now: float) -> None:
        while self.deleted:
            pod = next(iter(self.deleted.values()))
            if pod.deleted_at is not None and now - pod.deleted_at < self.grace:
                break
            self.deleted.popitem(last=False)
            self._expire(pod)

    def _expire(self, pod: PodInfo) -> None:
        for cid in pod.container_ids():
            if self.by_container.get(cid) is pod:
                del self.by_container[cid]
        if self.deleted_by_name.get((pod.namespace, pod.name)) is pod:
            del self.deleted_by_name[(pod.namespace, pod.name)]
        self.version += 1

    def find(self, namespace: str, name: str, container_id: str) -> PodInfo | None:
        # The container ID is exact (it also tells a deleted pod from its same-name successor);
        # by name covers pods whose status has no IDs yet (a container not reported started).
        pod = self.by_container.get(container_id)
        if pod is not None:
            return pod
        pod = self.pods.get((namespace, name))
        if pod is not None:
            return pod
        return self.deleted_by_name.get((namespace, name))

    def __len__(self) -> int:
        return len(self.pods)


class NamespaceStore:
    def __init__(self, labels: bool, annotations: bool) -> None:
        self.want_labels = labels
        self.want_annotations = annotations
        self.namespaces: dict[str, dict[str, Any]] = {}
        self._listed: set[str] | None = None
        self.version = 0

    def begin_list(self) -> None:
        self._listed = set()

    def end_list(self) -> None:
        listed = self._listed or set()
        for name in [n for n in self.namespaces if n not in listed]:
            del self.namespaces[name]
        self._listed = None
        self.version += 1

    def apply(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        name = meta.get("name") or ""
        if kind == "DELETED":
            self.namespaces.pop(name, None)  # its pods are gone too; records keep what they got
            self.version += 1
            return
        if self._listed is not None:
            self._listed.add(name)
        info: dict[str, Any] = {"name": name}
        if self.want_labels and meta.get("labels"):
            info["labels"] = meta["labels"]
        if self.want_annotations and meta.get("annotations"):
            info["annotations"] = meta["annotations"]
        self.namespaces[name] = info
        self.version += 1


class _Resolved:
    """What one tag resolves to, reused for every record with that tag."""

    __slots__ = ("container", "exclude", "found", "kubernetes", "members", "namespace", "parsers", "pod", "version")

    def __init__(self) -> None:
        self.kubernetes: dict[str, Any] | None = None
        self.members: bytes | None = None  # ',"kubernetes":{..}[,"kubernetes_namespace":{..}]' once encoded
        self.namespace: dict[str, Any] | None = None
        self.exclude: dict[str | None, bool] = {}
        self.parsers: dict[str | None, Any] = {}
        self.pod: PodInfo | None = None
        self.container = ""
        self.found = False
        self.version = (-1, -1)


class KubernetesTransform(Transform):
    plugin_name = "kubernetes"
    description = "Pod and namespace metadata from one pod watch per node and one namespace watch"
    options = (
        *CONNECTION_OPTIONS,
        Option("kube_tag_prefix", "str", "kube.var.log.containers.", help="Tag prefix before the file name"),
        Option("merge_log", "bool", False, help="Parse a JSON (or annotated) 'log' and merge its fields"),
        Option("merge_log_key", help="Put the merged fields under this key instead of the top level"),
        Option("keep_log", "bool", True, help="Keep 'log' after merging it"),
        Option("labels", "bool", True, help="Add pod labels"),
        Option("annotations", "bool", True, help="Add pod annotations"),
        Option("namespace_labels", "bool", False, help="Add namespace labels (starts the namespace watch)"),
        Option("namespace_annotations", "bool", False, help="Add namespace annotations (namespace watch)"),
        Option("owner_references", "bool", False, help="Add the pod's ownerReferences"),
        Option("k8s-logging.parser", "bool", False, help="Honour the parser pod annotations"),
        Option("k8s-logging.exclude", "bool", False, help="Honour the exclude pod annotations"),
        Option(
            "buffer_size", "size", 32 * 1024, help="Accepted for Fluent Bit compatibility (watch lines are not cut)"
        ),
        Option("kube_meta_cache_ttl", "duration", 0.0, help="Accepted; watches keep the metadata current"),
        Option("use_kubelet", "bool", False, help="Not supported: the pod watch already costs one request"),
        Option("kubelet_port", "int", 10250, help="Accepted for Fluent Bit compatibility"),
        Option("node_name", help="This node's name: only its pods are watched (default: all pods, more memory)"),
        Option("kube_meta_sync_timeout", "duration", 10.0, help="How long start waits for the first lists"),
        Option("deleted_pod_grace", "duration", 300.0, help="How long a deleted pod's metadata is kept"),
        Option("kube_watch_timeout", "duration", 600.0, help="Watch length; randomised, resumed without re-list"),
        Option("merge_log_trim", "bool", True, help="Remove trailing \\n and \\r from the merged string values"),
        Option("merge_parser", help="Parser for 'log' with merge_log (instead of JSON detection)"),
        no_effect("cache_use_docker_id", "bool", False, why="pods are always matched by container ID first"),
        no_effect("use_journal", "bool", False, why="metadata is resolved from the tag of tailed container logs"),
        no_effect("dummy_meta", "bool", False, why="Fluent Bit's test switch; metadata comes from the API server"),
        no_effect("regex_parser", why="the tag is read with the kube_tag_prefix and kubelet's file name format"),
        no_effect("kube_meta_preload_cache_dir", why="metadata comes from a watch, never from files"),
        no_effect("kube_meta_namespace_cache_ttl", "duration", 900.0, why="the namespace watch keeps it current"),
        no_effect("kube_token_command", why="use kube_token_file or kubeconfig"),
        no_effect("dns_retries", "int", 6, why="connection errors are retried with backoff"),
        no_effect("dns_wait_time", "int", 30, why="connection errors are retried with backoff"),
        no_effect("use_tag_for_meta", "bool", False, why="metadata is always resolved from the tag and the pod watch"),
        no_effect("kubelet_host", why="use_kubelet is not supported"),
        no_effect("namespace_metadata_only", "bool", False, why="pod metadata is always added"),
        no_effect("tls.verify_hostname", "bool", False, why="tls.verify checks the host name"),
        no_effect("set_platform", why="Fluent Bit's EKS/k8s platform label"),
        no_effect("aws_use_pod_association", "bool", False, why="AWS pod association is not supported"),
        no_effect("aws_pod_association_endpoint", why="AWS pod association is not supported"),
        no_effect("aws_pod_association_host_server_ca_file", why="AWS pod association is not supported"),
        no_effect("aws_pod_association_host_client_cert_file", why="AWS pod association is not supported"),
        no_effect("aws_pod_association_host_client_key_file", why="AWS pod association is not supported"),
        no_effect("aws_pod_association_host_tls_debug", why="AWS pod association is not supported"),
        no_effect("aws_pod_association_host_tls_verify", why="AWS pod association is not supported"),
        no_effect("aws_pod_service_map_ttl", why="AWS pod association is not supported"),
        no_effect("aws_pod_service_map_refresh_interval", why="AWS pod association is not supported"),
        no_effect("aws_pod_service_preload_cache_dir", why="AWS pod association is not supported"),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        if config["use_kubelet"]:
            raise ConfigError(
                "use_kubelet is not supported: metadata comes from one pod watch per node", key="use_kubelet"
            )
        self.connection = connection_from_options(config)
        self.prefix: str = config["kube_tag_prefix"]
        self.merge_log: bool = config["merge_log"]
        self.merge_key: str | None = config["merge_log_key"]
        self.keep_log: bool = config["keep_log"]
        self.merge_trim: bool = config["merge_log_trim"]
        self.merge_parser = None
        if config["merge_parser"]:
            self.merge_parser = ctx.parsers.get(config["merge_parser"])
            if self.merge_parser is None:
                raise ConfigError(
                    f"unknown parser {config['merge_parser']!r}; known: {', '.join(ctx.parsers.names())}",
                    key="merge_parser",
                )
        self.want_labels: bool = config["labels"]
        self.want_annotations: bool = config["annotations"]
        self.want_owners: bool = config["owner_references"]
        self.use_parser_annotations: bool = config["k8s-logging.parser"]
        self.use_exclude_annotations: bool = config["k8s-logging.exclude"]
        self.node_name: str | None = config["node_name"] or None
        self.sync_timeout: float = config["kube_meta_sync_timeout"]
        self.watch_timeout: float = config["kube_watch_timeout"]
        self.pods = PodStore(config["deleted_pod_grace"])
        want_ns = config["namespace_labels"] or config["namespace_annotations"]
        self.namespaces = (
            NamespaceStore(config["namespace_labels"], config["namespace_annotations"]) if want_ns else None
        )
        self.client: KubeClient | None = None
        self.informers: list[Informer] = []
        self._tasks: list[asyncio.Task[None]] | None = None
        self._stop = asyncio.Event()
        self._tags: dict[str, _Resolved | None] = {}
        self._misses: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()  # -> (next log, backoff)
        self._last_sweep = time.monotonic()
        m = self.metrics
        self.m_misses = m.counter("kubetrail_k8s_metadata_misses", "Records without pod metadata, by reason", "reason")
        self.m_merge_failed = m.counter("kubetrail_k8s_metadata_merge_failed", "Logs merge_log could not parse")
        self.m_pods = m.gauge("kubetrail_k8s_metadata_pods", "Pods held (live)")
        self.m_requests = m.gauge("kubetrail_k8s_metadata_api_requests", "Requests sent to the API server")

    def api_access(self) -> list[ApiAccess]:
        needed = [ApiAccess(verb, "pods") for verb in ("list", "watch")]
        if self.namespaces is not None:
            needed += [ApiAccess(verb, "namespaces") for verb in ("list", "watch")]
        return needed

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the watches and wait (briefly) for their first lists."""
        self._start_watches()
        waits = [asyncio.ensure_future(informer.synced.wait()) for informer in self.informers]
        _done, pending = await asyncio.wait(waits, timeout=self.sync_timeout)
        for waiter in pending:
            waiter.cancel()
        if pending:
            self.log.warning(
                "pod metadata not synced yet; records go on with what their tag says until it is",
                extra={"timeout": self.sync_timeout, "url": self.connection.url},
            )
        else:
            self.log.info("pod metadata synced", extra={"pods": len(self.pods), "node": self.node_name or "*"})

    def _start_watches(self) -> None:
        if self._tasks is not None:
            return
        loop = asyncio.get_running_loop()  # raises (before anything is built) without one
        self.client = KubeClient(self.connection, self.log, metrics=self.metrics)
        params = {"fieldSelector": f"spec.nodeName={self.node_name}"} if self.node_name else {}
        if not self.node_name:
            self.log.warning("node_name not set: watching every pod in the cluster (set it on a DaemonSet)")
        self.informers = [
            Informer(self.client, "/api/v1/pods", self.pods, self.log, params, watch_timeout=self.watch_timeout)
        ]
        if self.namespaces is not None:
            self.informers.append(
                Informer(self.client, "/api/v1/namespaces", self.namespaces, self.log, watch_timeout=self.watch_timeout)
            )
        self._tasks = [
            loop.create_task(informer.run(self._stop), name=f"{self.ctx.component_id}-watch")
            for informer in self.informers
        ]

    async def close(self) -> None:
        self._stop.set()
        if self._tasks:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.close()

    @property
    def synced(self) -> bool:
        return bool(self.informers) and all(i.synced.is_set() for i in self.informers)

    # -- per batch ---------------------------------------------------------------------------

    def _begin(self) -> tuple[int, int]:
        """Per batch: the watches started, housekeeping due; the stores' version for _resolve."""
        if self._tasks is None:
            try:
                self._start_watches()  # used without the pipeline's start(): begin now, unsynced
            except RuntimeError:
                pass  # no running loop (a synchronous caller): metadata from tags only
        now = time.monotonic()
        if now - self._last_sweep >= 1.0:
            self._housekeeping(now)
        return (self.pods.version, self.namespaces.version if self.namespaces else 0)

    def process_batch(self, batch: Batch) -> Batch:
        """A block of canonical JSON lines whose records would only gain members gets them
        spliced into its bytes (see the module docstring); anything else: :meth:`process`."""
        block = batch.line_block
        if block is None or not block.canonical:
            return batch.derive(self.process(batch.records))
        resolved = self._resolve(batch.tag, self._begin())
        if resolved is None:
            return batch  # not a container log tag: passed on as it is
        data = block.data() if self._only_adds(resolved) else None
        if (
            data is None
            or b'"kubernetes":' in data  # a member of that name (in a string its quotes are escaped)
            or b'"kubernetes_namespace":' in data
            or (self.merge_log and b'"log":"{' in data)  # a log merge_log would parse
        ):
            return batch.derive(self.process(batch.records))
        if not resolved.found:
            self.m_misses.labels("not_synced" if not self.synced else "not_found").inc(block.count)
        members = resolved.members
        if members is None:
            members = b',"kubernetes":' + orjson.dumps(resolved.kubernetes)
            if resolved.namespace is not None:
                members += b',"kubernetes_namespace":' + orjson.dumps(resolved.namespace)
            resolved.members = members
        # A raw newline ends each line (one inside a string is escaped), so "}\n" is each line's end.
        spliced = data.replace(b"}\n", members + b"}\n")

        def build() -> list[Record]:
            lines = spliced.split(b"\n")  # one more than the records: the b"" after the last newline
            return [
                Record(r.tag, r.time_ns, None, line, r.identity, r.meta)
                for r, line in zip(batch.records, lines, strict=False)
            ]

        ready = ReadyBlock(spliced, block.count, build)
        ready.canonical = True
        ready.times = block.times  # set by validation (data() above) where the block knows them
        return Batch(batch.tag, None, batch.ack, batch.size_bytes, batch.created, block=ready)

    def _only_adds(self, resolved: _Resolved) -> bool:
        """Whether the record path would only add the metadata to this tag's records, whatever
        their stream: no exclude annotation, no parser for merge_log."""
        if self.merge_log and self.merge_parser is not None:
            return False
        if resolved.pod is None:
            return True
        for stream in ("stdout", "stderr", None):
            if self.use_exclude_annotations and self._excluded(resolved, stream):
                return False
            if self.merge_log and self.use_parser_annotations and self._parser_for(resolved, stream) is not None:
                return False
        return True

    def _excluded(self, resolved: _Resolved, stream: str | None) -> bool:
        excluded = resolved.exclude.get(stream)
        if excluded is None:
            assert resolved.pod is not None
            value = resolved.pod.annotation("exclude", stream, resolved.container)
            excluded = resolved.exclude[stream] = (value or "").strip().lower() in ("true", "on", "yes", "1")
        return excluded

    def _parser_for(self, resolved: _Resolved, stream: str | None) -> Any:
        """The parser a pod annotation names for this stream (cached per tag), or None."""
        if stream in resolved.parsers:
            return resolved.parsers[stream]
        assert resolved.pod is not None
        name = resolved.pod.annotation("parser", stream, resolved.container)
        parser = resolved.parsers[stream] = self.ctx.parsers.get(name) if name else None
        return parser

    def process(self, records: list[Record]) -> list[Record]:
        version = self._begin()
        out: list[Record] = []
        append = out.append
        last_tag: str | None = None
        resolved: _Resolved | None = None
        misses = 0
        merge = self.merge_log
        for record in records:
            tag = record.tag
            if tag != last_tag:
                last_tag = tag
                resolved = self._resolve(tag, version)
            if resolved is None:
                append(record)  # not a container log tag: passed on as it is
                continue
            if not resolved.found:
                misses += 1
            body = record.mutable_body()
            if (
                self.use_exclude_annotations
                and resolved.pod is not None
                and self._excluded(resolved, body.get("stream"))
            ):
                continue
            body["kubernetes"] = resolved.kubernetes
            if resolved.namespace is not None:
                body["kubernetes_namespace"] = resolved.namespace
            if merge:
                self._merge(record, body, resolved)
            append(record)
        if misses:
            self.m_misses.labels("not_synced" if not self.synced else "not_found").inc(misses)
        return out

    def _merge(self, record: Record, body: dict[str, Any], resolved: _Resolved) -> None:
        log = body.get("log")
        if not isinstance(log, str) or not log:
            return
        parsed: dict[str, Any] | None = None
        parser = None
        if self.use_parser_annotations and resolved.pod is not None:
            parser = self._parser_for(resolved, body.get("stream"))
        if parser is None:
            parser = self.merge_parser
        if parser is not None:
            parsed_records, failed = parser.parse_lines([log.rstrip("\n").encode()], record.tag)
            if not failed and parsed_records:
                parsed = parsed_records[0].body
        elif log[0] == "{":
            try:
                value = orjson.loads(log)
            except orjson.JSONDecodeError:
                value = None
            if isinstance(value, dict):
                parsed = value
        if parsed is None:
            if parser is not None or log[0] == "{":
                self.m_merge_failed.inc()
            return
        # Fluent Bit's merge_log_trim (on by default): string values lose trailing \n / \r. A JSON
        # log without a backslash has no escaped \n or \r in it, so nothing to trim.
        if self.merge_trim and (parser is not None or "\\" in log):
            parsed = {k: v.rstrip("\r\n") if isinstance(v, str) else v for k, v in parsed.items()}
        if self.merge_key:
            body[self.merge_key] = parsed
        elif "kubernetes" in parsed or "kubernetes_namespace" in parsed:
            for key, value in parsed.items():
                if key not in ("kubernetes", "kubernetes_namespace"):  # a log cannot overwrite metadata
                    body[key] = value
        else:
            body.update(parsed)
        if not self.keep_log:
            body.pop("log", None)

    def _resolve(self, tag: str, version: tuple[int, int]) -> _Resolved | None:
        resolved = self._tags.get(tag)
        if resolved is not None and resolved.version == version:
            return resolved
        if resolved is None and tag in self._tags:
            return None  # known not to be a container log tag
        name = tag[len(self.prefix) :] if tag.startswith(self.prefix) else tag
        match = TAG_REGEX.search(name)
        if len(self._tags) > MAX_TAGS:
            self._tags.clear()
        if match is None:
            self._tags[tag] = None
            return None
        pod_name, namespace, container, docker_id = match.group(
            "pod_name", "namespace_name", "container_name", "docker_id"
        )
        resolved = _Resolved()
        resolved.version = version
        resolved.container = container
        pod = self.pods.find(namespace, pod_name, docker_id)
        resolved.pod = pod
        resolved.found = pod is not None
        if pod is None:
            self._note_miss(namespace, pod_name)
            resolved.kubernetes = {
                "pod_name": pod_name,
                "namespace_name": namespace,
                "container_name": container,
                "docker_id": docker_id,
            }
        else:
            self._misses.pop((namespace, pod_name), None)
            built = pod.built.get((container, docker_id))
            if built is None:
                built = pod.built[(container, docker_id)] = self._build(pod, container, docker_id)
            resolved.kubernetes = built
        if self.namespaces is not None:
            resolved.namespace = self.namespaces.namespaces.get(namespace)
        self._tags[tag] = resolved
        return resolved

    def _build(self, pod: PodInfo, container: str, docker_id: str) -> dict[str, Any]:
        meta: dict[str, Any] = {"pod_name": pod.name, "namespace_name": pod.namespace, "pod_id": pod.uid}
        if self.want_labels and pod.labels:
            meta["labels"] = pod.labels
        if self.want_annotations and pod.annotations:
            meta["annotations"] = pod.annotations
        if pod.node:
            meta["host"] = pod.node
        if pod.pod_ip:
            meta["pod_ip"] = pod.pod_ip
        meta["container_name"] = container
        meta["docker_id"] = docker_id
        image, image_id, _cid = pod.containers.get(container, (None, None, None))
        if image_id:
            meta["container_hash"] = image_id
        if image:
            meta["container_image"] = image
        if self.want_owners and pod.owners:
            meta["ownerReferences"] = pod.owners
        return meta

    def _note_miss(self, namespace: str, name: str) -> None:
        """A pod not found: logged once per backoff period (1 s doubling to 5 min), never fetched."""
        now = time.monotonic()
        key = (namespace, name)
        entry = self._misses.get(key)
        if entry is not None and now < entry[0]:
            return
        backoff = min(MISS_BACKOFF_MAX, entry[1] * 2) if entry is not None else 1.0
        self._misses[key] = (now + backoff, backoff)
        self._misses.move_to_end(key)
        while len(self._misses) > MAX_MISSES:
            self._misses.popitem(last=False)
        if self.synced:
            self.log.warning(
                "no metadata for pod on this node; records keep what their tag says",
                extra={"namespace": namespace, "pod": name, "next_report_in": backoff},
            )

    def _housekeeping(self, now: float) -> None:
        self._last_sweep = now
        self.pods.sweep(now)
        self.m_pods.set(len(self.pods))
        if self.client is not None:
            self.m_requests.set(self.client.requests)
