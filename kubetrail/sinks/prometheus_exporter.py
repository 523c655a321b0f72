"""The ``prometheus_exporter`` output: serves the metric records routed to it on ``/metrics``.

Fluent Bit's plugin takes *metrics* chunks (from ``fluentbit_metrics``, ``node_exporter_metrics``,
``prometheus_scrape``) and serves the latest value of each series in the Prometheus text format,
with ``add_label`` pairs added to every series. kubetrail's pipeline carries records, and its
metric records are the ``fluentbit_metrics`` input's: one record per sample,
``{"name", "type", "labels", "value"}`` (``value`` a number, or ``"+Inf"``/``"-Inf"``/``"NaN"``).
So this output keeps, per tag, the last batch of metric records (one scrape: a series that is
gone from the next scrape is gone from the page, as in Fluent Bit, which replaces an input's
metrics on each flush) and renders them grouped by metric family with ``# TYPE`` lines;
routing ``fluentbit_metrics`` here serves kubetrail's own metrics, as the Fluent Bit pairing does.

Delivery: a metric record is delivered once its value is stored (scrapers read it from then
on). Log records are not metrics: Fluent Bit never routes them to a metrics output, so here they
are acknowledged without effect and counted (``kubetrail_prometheus_exporter_skipped_total``),
with one warning. A record that claims to be a metric but is malformed (a bad name, labels that
are not a map, a value that is not a number) is rejected on its own with the reason.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from kubetrail.core.component import ComponentContext, Sink
from kubetrail.core.errors import ConfigError, PermanentError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_TYPES = ("counter", "gauge", "histogram", "summary", "untyped", "unknown", "info", "stateset", "gaugehistogram")
# Sample-name suffixes that belong to the family named without them. In the text format 0.0.4 a
# counter's TYPE line names the sample itself (``x_total``), as prometheus_client writes it.
_SUFFIXES = {
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("_sum", "_count"),
}
# OpenMetrics types the text format 0.0.4 does not have, as prometheus_client writes them there.
_TEXT_TYPES = {"unknown": "untyped", "info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram"}
_SPECIAL_VALUES = {"+Inf": math.inf, "Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() or abs(value) >= 1e15 else str(int(value))


def family_name(name: str, kind: str) -> str:
    for suffix in _SUFFIXES.get(kind, ()):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class PrometheusExporterSink(Sink):
    plugin_name = "prometheus_exporter"
    description = "Serves metric records (e.g. from fluentbit_metrics) on /metrics"
    options = (
        Option("host", "str", "0.0.0.0", help="Address to listen on"),
        Option("port", "int", 2021, help="Port to listen on"),
        Option("add_label", multiple=True, help="'name value' added to every series; repeat for several"),
    )

    def __init__(self, ctx: ComponentContext, config: Mapping[str, Any]) -> None:
        super().__init__(ctx, config)
        self.host: str = config["host"]
        self.port: int = config["port"]
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is out of range 1-65535", key="port")
        self.extra: dict[str, str] = {}
        for item in config.get("add_label") or []:
            name, _, value = item.strip().partition(" ")
            if not _LABEL.match(name) or not value.strip():
                message = f"bad label {item!r}; expected 'name value' with a Prometheus label name"
                raise ConfigError(message, key="add_label")
            self.extra[name] = value.strip()
        # tag -> the last batch of metrics from it: family -> (type, {(sample, sorted labels): value})
        self.sets: dict[str, dict[str, tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]]] = {}
        self._runner: web.AppRunner | None = None
        self._skipped = ctx.metrics.counter(
            "kubetrail_prometheus_exporter_skipped", "Log records routed to prometheus_exporter (not metrics)"
        )
        self._warned = False

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.log.info("prometheus_exporter listening", extra={"host": self.host, "port": self.port})

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _store(self, record: Record, families: dict[str, Any]) -> str | None:
        """Put one metric record's value in ``families``; returns why it cannot be one (None:
        stored, or a log record skipped)."""
        body = record.body
        if "name" not in body or "value" not in body:
            self._skipped.inc()
            if not self._warned:
                self._warned = True
                message = "log records reached prometheus_exporter; only metric records are served"
                self.log.warning(message, extra={"tag": record.tag})
            return None
        name, kind, labels, value = body["name"], body.get("type") or "untyped", body.get("labels") or {}, body["value"]
        if not isinstance(name, str) or not _NAME.match(name):
            return f"bad metric name {name!r}"
        if kind not in _TYPES:
            return f"unknown metric type {kind!r}; allowed: {', '.join(_TYPES)}"
        if not isinstance(labels, dict) or not all(isinstance(k, str) and _LABEL.match(k) for k in labels):
            return f"labels must be a map of Prometheus label names, got {labels!r}"
        if isinstance(value, str) and value in _SPECIAL_VALUES:
            number = _SPECIAL_VALUES[value]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        else:
            return f"metric value must be a number, got {value!r}"
        if name.endswith("_created") and kind in ("counter", "histogram", "summary"):
            kind = "gauge"  # a creation time is a gauge family of its own in the text format 0.0.4
        merged = {**{k: str(v) for k, v in labels.items()}, **self.extra}
        family = name if kind == "gauge" else family_name(name, kind)
        _, series = families.setdefault(family, (kind, {}))
        series[(name, tuple(sorted(merged.items())))] = number
        return None

    async def write(self, batch: Batch) -> None:
        rejected = []
        families: dict[str, tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
        for record in batch.records:
            reason = self._store(record, families)
            if reason is not None:
                rejected.append((record, f"not a valid metric record: {reason}"))
        if families:
            # A batch of metrics is one scrape of its source (fluentbit_metrics sends one per
            # interval): it replaces what that tag sent before, so series that went away go.
            self.sets[batch.tag] = families
        if rejected:
            raise PermanentError(f"{len(rejected)} of {len(batch)} metric records rejected: {rejected[0][1]}", rejected)

    def render(self) -> str:
        merged: dict[str, tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
        for families in self.sets.values():
            for family, (kind, series) in families.items():
                known = merged.setdefault(family, (kind, {}))
                if known[0] == kind:  # the same name with another type elsewhere: the first one wins
                    known[1].update(series)
        lines = []
        for family, (kind, series) in merged.items():
            lines.append(f"# TYPE {family} {_TEXT_TYPES.get(kind, kind)}")
            for (name, labels), value in series.items():
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")
        return "\n".join(lines) + "\n"

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.render().encode(), headers={"Content-Type": CONTENT_TYPE})
