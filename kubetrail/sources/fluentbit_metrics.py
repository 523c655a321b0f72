"""The ``fluentbit_metrics`` input: kubetrail's own Prometheus metrics, emitted as records.

Fluent Bit's input scrapes its internal metrics every ``scrape_interval`` (2 s) and, with
``scrape_on_start``, once at start; its records are a metrics chunk that outputs such as
``prometheus_exporter`` print. kubetrail's pipeline carries log records only, so each scrape
becomes one batch with **one record per sample**, in the order the registry lists them:

``{"name": "kubetrail_records_in_total", "type": "counter", "labels": {"component": "tail.0",
"kind": "source", "plugin": "tail"}, "value": 1200.0}``

(histograms give their ``_bucket``/``_sum``/``_count`` samples, ``le`` among the labels). The
metrics are the same ones ``/api/v2/metrics/prometheus`` serves (the pipeline's registry, which
the component context reaches through its metrics). Records are stamped with the scrape time.
A scrape is sent before the next is taken, so a slow pipeline gets fewer scrapes, not a queue.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from kubetrail.core.component import ComponentContext, Emitter, Source
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record


class FluentbitMetricsSource(Source):
    plugin_name = "fluentbit_metrics"
    description = "Emits kubetrail's own metrics as records, one per sample, every scrape_interval"
    options = (
        Option("scrape_interval", "duration", 2.0, help="Seconds between scrapes"),
        Option("scrape_on_start", "bool", False, help="Scrape once at start, before the first interval"),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.tag: str = config["tag"]
        self.interval = float(config["scrape_interval"])
        if self.interval <= 0:
            raise ConfigError("must be more than 0", key="scrape_interval")
        self.on_start: bool = config["scrape_on_start"]
        # The pipeline's registry, shared by every component's metrics.
        self.registry = ctx.metrics.registry
        self.scrapes = 0
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def scrape(self) -> Batch:
        now = time.time_ns()
        records: list[Record] = []
        for family in self.registry.collect():
            for sample in family.samples:
                value: float | str = sample.value
                if not math.isfinite(sample.value):
                    value = str(sample.value)  # +Inf/NaN are not JSON numbers
                body = {"name": sample.name, "type": family.type, "labels": dict(sample.labels), "value": value}
                records.append(Record(self.tag, now, body))
        self.scrapes += 1
        return Batch(self.tag, records, None, 0)

    async def run(self, emitter: Emitter) -> None:
        if self.on_start:
            await emitter.send(self.scrape())
        while True:
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval)
                return
            except TimeoutError:
                pass
            await emitter.send(self.scrape())
