"""The same metrics for every component, as Vector does it.

Every source, transform and sink gets a :class:`ComponentMetrics` bound to its labels
(``component`` = alias or ``plugin.N``, ``kind``, ``plugin``). Counters are bumped once per
batch, never per record, so metrics cost nothing measurable on the hot path.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LABELS = ("component", "kind", "plugin")
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class MetricsRegistry:
    """One Prometheus registry per pipeline (tests build several pipelines in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.records_in = Counter("kubetrail_records_in", "Records received by a component", _LABELS, registry=r)
        self.records_out = Counter("kubetrail_records_out", "Records sent on by a component", _LABELS, registry=r)
        self.bytes_in = Counter("kubetrail_bytes_in", "Bytes received by a component", _LABELS, registry=r)
        self.bytes_out = Counter("kubetrail_bytes_out", "Bytes sent on by a component", _LABELS, registry=r)
        self.dropped = Counter(
            "kubetrail_records_dropped", "Records dropped, by reason", (*_LABELS, "reason"), registry=r
        )
        self.errors = Counter("kubetrail_errors", "Errors, by type", (*_LABELS, "type"), registry=r)
        self.retries = Counter("kubetrail_retries", "Delivery attempts retried", _LABELS, registry=r)
        self.batch_latency = Histogram(
            "kubetrail_batch_latency_seconds",
            "Time from a batch's creation at the source to its delivery by a sink",
            _LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.buffer_records = Gauge(
            "kubetrail_buffer_records", "Records waiting in a sink's buffer", _LABELS, registry=r
        )
        self.buffer_bytes = Gauge("kubetrail_buffer_bytes", "Bytes waiting in a sink's buffer", _LABELS, registry=r)
        self.uptime = Gauge("kubetrail_uptime_seconds", "Seconds since the pipeline started", registry=r)
        self.build_info = Gauge("kubetrail_build_info", "Build information", ("version",), registry=r)
        self._plugin_metrics: dict[str, Counter | Gauge | Histogram] = {}

    def component(self, component: str, kind: str, plugin: str) -> ComponentMetrics:
        return ComponentMetrics(self, component, kind, plugin)

    def plugin_metric(
        self, cls: type[Counter | Gauge | Histogram], name: str, doc: str, labels: tuple[str, ...], **kwargs: object
    ) -> Counter | Gauge | Histogram:
        """A plugin-specific metric, created once per pipeline (several instances share it)."""
        existing = self._plugin_metrics.get(name)
        if existing is None:
            existing = cls(name, doc, (*_LABELS, *labels), registry=self.registry, **kwargs)  # type: ignore[arg-type]
            self._plugin_metrics[name] = existing
        return existing


class ComponentMetrics:
    """Metric children pre-bound to one component's labels."""

    def __init__(self, parent: MetricsRegistry, component: str, kind: str, plugin: str) -> None:
        labels = (component, kind, plugin)
        self._parent = parent
        self._labels = labels
        self.records_in = parent.records_in.labels(*labels)
        self.records_out = parent.records_out.labels(*labels)
        self.bytes_in = parent.bytes_in.labels(*labels)
        self.bytes_out = parent.bytes_out.labels(*labels)
        self.retries = parent.retries.labels(*labels)
        self.batch_latency = parent.batch_latency.labels(*labels)
        self.buffer_records = parent.buffer_records.labels(*labels)
        self.buffer_bytes = parent.buffer_bytes.labels(*labels)

    @property
    def registry(self) -> CollectorRegistry:
        """The pipeline's whole registry (every component's metrics), for a plugin that reads or
        exports them all: the ``fluentbit_metrics`` input scrapes it."""
        return self._parent.registry

    def counter(self, name: str, doc: str, *labels: str) -> Counter:
        """A plugin's own counter with this component's labels bound; more labels via .labels()."""
        metric = self._parent.plugin_metric(Counter, name, doc, labels)
        return metric.labels(*self._labels) if not labels else _Partial(metric, self._labels)  # type: ignore[return-value]

    def gauge(self, name: str, doc: str) -> Gauge:
        return self._parent.plugin_metric(Gauge, name, doc, ()).labels(*self._labels)  # type: ignore[return-value]

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        metric = self._parent.plugin_metric(Histogram, name, doc, (), buckets=buckets)
        return metric.labels(*self._labels)  # type: ignore[return-value]

    def dropped(self, count: int, reason: str) -> None:
        if count:
            self._parent.dropped.labels(*self._labels, reason).inc(count)

    def error(self, kind: str, count: int = 1) -> None:
        self._parent.errors.labels(*self._labels, kind).inc(count)


class _Partial:
    """A labelled metric with the component labels already given: ``.labels(reason).inc()``."""

    def __init__(self, metric: Counter | Gauge | Histogram, bound: tuple[str, ...]) -> None:
        self._metric = metric
        self._bound = bound

    def labels(self, *values: str) -> Counter:
        return self._metric.labels(*self._bound, *values)  # type: ignore[return-value]
