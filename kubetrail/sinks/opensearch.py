"""The ``opensearch`` output: OpenSearch's ``_bulk`` API with Fluent Bit's option names.

OpenSearch speaks Elasticsearch 7's bulk protocol, so the whole behaviour (ids from record
identity, ``create`` for idempotent replays, per-item retries and rejections, index names from
time and tag) is :class:`~kubetrail.sinks.es.EsSink`'s; only the plugin's name and its options
differ (no Elastic ``http_api_key``), as in Fluent Bit.
"""

from __future__ import annotations

from kubetrail.sinks.es import EsSink, es_options


class OpenSearchSink(EsSink):
    plugin_name = "opensearch"
    description = "OpenSearch _bulk API, one document per record, idempotent with record ids"
    options = es_options("fluent-bit")
