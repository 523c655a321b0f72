"""Plugin names -> classes, and the options every instance of a kind shares.

Adding a plugin: write one module under ``sources/``, ``transforms/`` or ``sinks/`` with a
class declaring ``plugin_name``, ``description`` and ``options``, and list it here.
"""

from __future__ import annotations

from kubetrail.core.component import Sink, Source, Transform
from kubetrail.core.options import Option
from kubetrail.sinks.file import FileSink
from kubetrail.sinks.stdout import StdoutSink
from kubetrail.sources.kubernetes_audit import KubernetesAuditSource
from kubetrail.sources.kubernetes_events import KubernetesEventsSource
from kubetrail.sources.tail import TailSource
from kubetrail.transforms.grep import GrepTransform
from kubetrail.transforms.kubernetes import KubernetesTransform
from kubetrail.transforms.kubernetes_audit import KubernetesAuditTransform
from kubetrail.transforms.modify import ModifyTransform

SOURCES: dict[str, type[Source]] = {
    cls.plugin_name: cls for cls in (TailSource, KubernetesEventsSource, KubernetesAuditSource)
}
TRANSFORMS: dict[str, type[Transform]] = {
    cls.plugin_name: cls for cls in (GrepTransform, ModifyTransform, KubernetesAuditTransform, KubernetesTransform)
}
SINKS: dict[str, type[Sink]] = {cls.plugin_name: cls for cls in (StdoutSink, FileSink)}

SERVICE_OPTIONS: tuple[Option, ...] = (
    Option("flush", "duration", 1.0, help="Accepted for Fluent Bit compatibility; batches are flushed as they form"),
    Option("grace", "duration", 5.0, help="Seconds to drain and flush after SIGTERM before exiting"),
    Option("log_level", "choice", "info", choices=("off", "error", "warn", "warning", "info", "debug", "trace")),
    Option("http_server", "bool", False, help="Serve health, uptime and Prometheus metrics"),
    Option("http_listen", "str", "0.0.0.0", help="Address of the monitoring server"),
    Option("http_port", "int", 2020, help="Port of the monitoring server"),
    Option("parsers_file", multiple=True, help="File(s) with [PARSER] sections, relative to the config"),
    Option("daemon", "bool", False, help="Not supported: run kubetrail under a supervisor instead"),
    Option("storage.path", help="Directory for filesystem buffers (issue: filesystem buffering)"),
    Option("health_check", "bool", False, help="Accepted for Fluent Bit compatibility"),
)

COMMON_INPUT_OPTIONS: tuple[Option, ...] = (
    Option("tag", help="Tag of the records; '*' in tail's tag is replaced by the file path"),
    Option("alias", help="Name of this instance in logs and metrics (default plugin.N)"),
    Option("log_level", "choice", None, choices=("off", "error", "warn", "warning", "info", "debug", "trace")),
    Option("mem_buf_limit", "size", None, help="Memory the input may hold before it pauses"),
    Option("storage.type", "choice", "memory", choices=("memory",), help="Only memory buffering for now"),
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
