"""Plugin names -> classes, and the options every instance of a kind shares.

Adding a plugin: write one module under ``sources/``, ``transforms/`` or ``sinks/`` with a
class declaring ``plugin_name``, ``description`` and ``options``, and list it here by its
``module:Class`` path (imported when a configuration uses it).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from kubetrail.core.component import Component, Sink, Source, Transform
from kubetrail.core.config.compat import FLUENT_BIT_SERVICE_NO_EFFECT
from kubetrail.core.options import Option

C = TypeVar("C", bound=Component)


class LazyPlugins(Mapping[str, type[C]], Generic[C]):
    """Plugin name -> class, importing the plugin's module only when the plugin is used: a
    pipeline writing to a file never imports aiohttp and the network sinks (a third of start-up)."""

    def __init__(self, paths: dict[str, str]) -> None:
        self._paths = paths  # name -> "module:Class"
        self._loaded: dict[str, type[C]] = {}

    def __getitem__(self, name: str) -> type[C]:
        cls = self._loaded.get(name)
        if cls is None:
            module, _, attr = self._paths[name].partition(":")  # KeyError: not a plugin
            cls = self._loaded[name] = getattr(importlib.import_module(module), attr)
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


SOURCES: LazyPlugins[Source] = LazyPlugins(
    {
        "tail": "kubetrail.sources.tail:TailSource",
        "kubernetes_events": "kubetrail.sources.kubernetes_events:KubernetesEventsSource",
        "kubernetes_audit": "kubetrail.sources.kubernetes_audit:KubernetesAuditSource",
        "systemd": "kubetrail.sources.systemd:SystemdSource",
        "tcp": "kubetrail.sources.tcp:TcpSource",
        "http": "kubetrail.sources.http:HttpSource",
        "dummy": "kubetrail.sources.dummy:DummySource",
        "fluentbit_metrics": "kubetrail.sources.fluentbit_metrics:FluentbitMetricsSource",
        "forward": "kubetrail.sources.forward:ForwardSource",
        "syslog": "kubetrail.sources.syslog:SyslogSource",
        "kafka": "kubetrail.sources.kafka:KafkaSource",
        "cpu": "kubetrail.sources.cpu:CpuSource",
        "mem": "kubetrail.sources.mem:MemSource",
    }
)
TRANSFORMS: LazyPlugins[Transform] = LazyPlugins(
    {
        "grep": "kubetrail.transforms.grep:GrepTransform",
        "modify": "kubetrail.transforms.modify:ModifyTransform",
        "kubernetes_audit": "kubetrail.transforms.kubernetes_audit:KubernetesAuditTransform",
        "kubernetes": "kubetrail.transforms.kubernetes:KubernetesTransform",
        "stdout": "kubetrail.transforms.stdout:StdoutTransform",
        "content_modifier": "kubetrail.transforms.content_modifier:ContentModifierTransform",
        "rewrite_tag": "kubetrail.transforms.rewrite_tag:RewriteTagTransform",
        "multiline": "kubetrail.transforms.multiline:MultilineTransform",
        "detect": "kubetrail.transforms.detect:DetectTransform",
        "lua": "kubetrail.transforms.lua:LuaTransform",
        "parser": "kubetrail.transforms.parser:ParserTransform",
        "throttle": "kubetrail.transforms.throttle:ThrottleTransform",
        "nest": "kubetrail.transforms.nest:NestTransform",
        "record_modifier": "kubetrail.transforms.record_modifier:RecordModifierTransform",
        "aws": "kubetrail.transforms.aws:AwsTransform",
    }
)
SINKS: LazyPlugins[Sink] = LazyPlugins(
    {
        "stdout": "kubetrail.sinks.stdout:StdoutSink",
        "file": "kubetrail.sinks.file:FileSink",
        "sqlite": "kubetrail.sinks.sqlite:SqliteSink",
        "http": "kubetrail.sinks.http:HttpOutputSink",
        "es": "kubetrail.sinks.es:EsSink",
        "elasticsearch": "kubetrail.sinks.es:ElasticsearchSink",
        "opensearch": "kubetrail.sinks.opensearch:OpenSearchSink",
        "splunk": "kubetrail.sinks.splunk:SplunkSink",
        "loki": "kubetrail.sinks.loki:LokiSink",
        "opentelemetry": "kubetrail.sinks.opentelemetry:OpenTelemetrySink",
        "syslog": "kubetrail.sinks.syslog:SyslogSink",
        "forward": "kubetrail.sinks.forward:ForwardSink",
        "null": "kubetrail.sinks.null:NullSink",
        "counter": "kubetrail.sinks.counter:CounterSink",
        "cloudwatch_logs": "kubetrail.sinks.cloudwatch_logs:CloudWatchLogsSink",
        "cloudwatch": "kubetrail.sinks.cloudwatch_logs:CloudWatchSink",
        "s3": "kubetrail.sinks.s3:S3Sink",
        "gelf": "kubetrail.sinks.gelf:GelfSink",
        "prometheus_exporter": "kubetrail.sinks.prometheus_exporter:PrometheusExporterSink",
        "kafka": "kubetrail.sinks.kafka:KafkaSink",
    }
)

SERVICE_OPTIONS: tuple[Option, ...] = (
    Option("flush", "duration", 1.0, help="Accepted for Fluent Bit compatibility; batches are flushed as they form"),
    Option("grace", "duration", 5.0, help="Seconds to drain and flush after SIGTERM before exiting"),
    Option("log_level", "choice", "info", choices=("off", "error", "warn", "warning", "info", "debug", "trace")),
    Option("http_server", "bool", False, help="Serve health, uptime and Prometheus metrics"),
    Option("http_listen", "str", "0.0.0.0", help="Address of the monitoring server"),
    Option("http_port", "int", 2020, help="Port of the monitoring server"),
    Option("parsers_file", multiple=True, help="File(s) with [PARSER] sections, relative to the config"),
    Option("daemon", "bool", False, help="Not supported: run kubetrail under a supervisor instead"),
    Option("storage.path", help="Directory of the filesystem buffers (one queue per output) and dead letters"),
    Option(
        "storage.sync",
        "choice",
        "normal",
        choices=("normal", "full"),
        help="normal: a buffered batch is acknowledged once written (survives kill -9); full: once fsynced",
    ),
    Option("storage.backlog.mem_limit", "size", 5 * 1024 * 1024, help="Memory per output for buffered data"),
    Option(
        "storage.keep.rejected",
        "bool",
        None,
        help="Write records an output rejects for good to a dead-letter file (default: on when storage.path is set)",
    ),
    Option("storage.rejected.path", "str", "rejected", help="Dead-letter directory, relative to storage.path"),
    Option("storage.checksum", "bool", False, help="Accepted for Fluent Bit compatibility; frames always have crc32"),
    Option("storage.metrics", "bool", False, help="Accepted for Fluent Bit compatibility; always on"),
    Option("storage.max_chunks_up", "int", 128, help="Accepted for Fluent Bit compatibility; see backlog.mem_limit"),
    Option("scheduler.base", "duration", 1.0, help="Retry backoff base in seconds (Fluent Bit: 5)"),
    Option("scheduler.cap", "duration", 60.0, help="Longest wait between retries in seconds (Fluent Bit: 2000)"),
    Option("health_check", "bool", False, help="Accepted for Fluent Bit compatibility"),
    Option("plugins_file", multiple=True, help="External plugins: refused by name when the file lists any"),
    Option(
        "storage.type", "choice", None, choices=("memory", "filesystem", "memrb"), help="Default for storage.inherit"
    ),
    Option("storage.inherit", "bool", False, help="Inputs without storage.type take the service's storage.type"),
    *FLUENT_BIT_SERVICE_NO_EFFECT,
)

COMMON_INPUT_OPTIONS: tuple[Option, ...] = (
    Option("tag", help="Tag of the records; '*' in tail's tag is replaced by the file path"),
    Option("alias", help="Name of this instance in logs and metrics (default plugin.N)"),
    Option("log_level", "choice", None, choices=("off", "error", "warn", "warning", "info", "debug", "trace")),
    Option("mem_buf_limit", "size", None, help="Bytes emitted but not yet acknowledged before the input pauses"),
    Option(
        "storage.type",
        "choice",
        "memory",
        choices=("memory", "filesystem", "memrb"),
        help="filesystem: batches are acknowledged once in the outputs' disk queues (needs storage.path); "
        "memrb (Fluent Bit's dropping ring buffer) is memory here",
    ),
    Option("storage.pause_on_chunks_overlimit", "bool", True, help="Accepted for Fluent Bit compatibility; always on"),
    Option("threaded", "bool", False, help="Accepted for Fluent Bit compatibility; kubetrail is asyncio"),
)

COMMON_FILTER_OPTIONS: tuple[Option, ...] = (
    Option("match", help="Tag pattern with * wildcards"),
    Option("match_regex", "regex", help="Regular expression searched in the tag"),
    Option("alias", help="Name of this instance in logs and metrics"),
    Option("log_level", "choice", None, choices=("off", "error", "warn", "warning", "info", "debug", "trace")),
)

COMMON_OUTPUT_OPTIONS: tuple[Option, ...] = (
    Option("match", help="Tag pattern with * wildcards"),
    Option("match_regex", "regex", help="Regular expression searched in the tag"),
    Option("alias", help="Name of this instance in logs and metrics"),
    Option("log_level", "choice", None, choices=("off", "error", "warn", "warning", "info", "debug", "trace")),
    Option(
        "retry_limit",
        "str",
        "no_limits",
        help="Retries before a batch is dropped: a number, no_limits/false (default), or no_retries",
    ),
    Option("workers", "int", 1, help="Concurrent deliveries"),
    Option(
        "storage.total_limit_size",
        "size",
        None,
        help="Most bytes this output's filesystem buffer may hold; inputs pause at the limit (Fluent Bit drops)",
    ),
)


def parse_retry_limit(text: str) -> int | None:
    word = text.strip().lower()
    if word in ("no_limits", "false", "off", "unlimited"):
        return None
    if word == "no_retries":
        return 0
    value = int(word)
    if value < 0:
        raise ValueError("must not be negative")
    return value
