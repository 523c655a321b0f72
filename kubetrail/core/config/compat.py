"""Fluent Bit compatibility facts the config layer needs: plugin names, no-effect options, hints.

Three jobs, all about configs written for Fluent Bit:

* **Unknown plugin names** get the closest name kubetrail has (``difflib``) and are told apart:
  a Fluent Bit plugin kubetrail does not have ("a Fluent Bit input kubetrail does not have"), or
  a name neither knows (a typo, or an external ``.so`` plugin). The lists below are Fluent Bit's
  own plugin names (its ``plugins/`` directory, 4.x/5.x), kept here as data.
* **No-effect options**: a valid Fluent Bit option is never a configuration error. Options that
  change nothing in kubetrail (tuning of Fluent Bit's own engine, legacy switches) are declared
  with :func:`no_effect`, which marks their help text; the pipeline logs once per option that
  is set, saying it has no effect and why.
* **Notices**: things the readers accept but ignore (``metrics:`` / ``traces:`` processors) are
  collected on the config and logged once when the pipeline is built, since config reading
  happens before logging is set up for the pipeline.
"""

from __future__ import annotations

import difflib
from typing import Any

from kubetrail.core.options import Option, OptionKind

NO_EFFECT_MARK = "(no effect in kubetrail) "


def no_effect(name: str, kind: OptionKind = "str", default: Any = None, why: str = "", **kwargs: Any) -> Option:
    """An option Fluent Bit has that changes nothing here: accepted, logged once when set."""
    return Option(name, kind, default, help=NO_EFFECT_MARK + why, **kwargs)


def is_no_effect(option: Option) -> bool:
    return option.help.startswith(NO_EFFECT_MARK)


def _words(text: str) -> list[str]:
    return text.split()


# Fluent Bit's plugin names (plugins/in_*, filter_*, out_*, processor_*), for error messages.
FLUENT_BIT_PLUGINS: dict[str, frozenset[str]] = {
    "input": frozenset(
        _words(
            "blob collectd cpu disk docker docker_events dummy ebpf emitter event_test event_type exec exec_wasi "
            "fluentbit_logs fluentbit_metrics forward gpu_metrics head health http kafka kmsg kubernetes_events "
            "lib mem mqtt netif nginx_metrics node_exporter_metrics opentelemetry podman_metrics proc "
            "process_exporter_metrics prometheus_remote_write prometheus_scrape prometheus_textfile random "
            "serial splunk statsd stdin syslog systemd tail tcp thermal udp unix_socket windows_exporter_metrics "
            "winevtlog winlog winstat elasticsearch calyptia_fleet"
        )
    ),
    "filter": frozenset(
        _words(
            "alter_size aws checklist ecs expect geoip2 grep kubernetes log_to_metrics lua modify multiline nest "
            "nightfall parser record_modifier rewrite_tag stdout sysinfo tensorflow throttle throttle_size "
            "type_converter wasm content_modifier"
        )
    ),
    "output": frozenset(
        _words(
            "azure azure_blob azure_kusto azure_logs_ingestion bigquery chronicle cloudwatch_logs counter "
            "datadog es exit file flowcounter forward gelf http influxdb kafka kafka-rest kinesis_firehose "
            "kinesis_streams lib logdna loki nats nrlogs null opensearch opentelemetry oracle_log_analytics "
            "pgsql plot prometheus_exporter prometheus_remote_write s3 skywalking slack splunk stackdriver "
            "stdout syslog tcp td vivo_exporter websocket cloudwatch elasticsearch"
        )
    ),
}

_KIND_WORD = {"input": "input", "filter": "filter", "output": "output", "processor": "processor"}


def unknown_plugin_message(kind: str, name: str, available: list[str]) -> str:
    """The error for a plugin name kubetrail does not have: closest name, and whose name it is."""
    close = difflib.get_close_matches(name, available, n=1, cutoff=0.7)
    word = _KIND_WORD.get(kind, kind)
    text = f"unknown {word} plugin {name!r}; available: {', '.join(sorted(available))}"
    if close:
        text += f"; did you mean {close[0]!r}?"
    if name in FLUENT_BIT_PLUGINS.get("filter" if kind == "processor" else kind, frozenset()):
        return (
            f"{text} ({name!r} is a Fluent Bit {word} plugin that kubetrail does not have; "
            "docs/migrating-from-fluent-bit.md says what to use instead)"
        )
    return f"{text} ({name!r} is not one of Fluent Bit's own plugins either: a typo, or an external plugin?)"


def external_plugin_message(path: str) -> str:
    return (
        f"external plugin {path!r} (a .so) cannot run in kubetrail; use a built-in plugin, or send the "
        "records with the forward output to a Fluent Bit that loads it"
    )


# [SERVICE] keys of Fluent Bit that change nothing here (the ones that do are in SERVICE_OPTIONS).
FLUENT_BIT_SERVICE_NO_EFFECT: tuple[Option, ...] = (
    no_effect("config_watch", "bool", False, why="restart kubetrail (a rolling update) to load a new config"),
    no_effect("hot_reload", "bool", False, why="restart kubetrail (a rolling update) to load a new config"),
    no_effect("hot_reload.ensure_thread_safety", "bool", True, why="there is no hot reload"),
    no_effect("log_file", why="logs are JSON lines on stderr, for the container runtime to collect"),
    no_effect("streams_file", why="the stream processor is not supported; use filters"),
    no_effect("coro_stack_size", "size", None, why="kubetrail has no coroutine stacks to size"),
    no_effect("dns.mode", why="the system resolver is used"),
    no_effect("dns.resolver", why="the system resolver is used"),
    no_effect("dns.prefer_ipv4", "bool", False, why="the system resolver's order is used"),
    no_effect("json.convert_nan_to_null", "bool", False, why="records are JSON already"),
    no_effect("sp.convert_from_str_to_num", "bool", True, why="the stream processor is not supported"),
    no_effect("storage.delete_irrecoverable_chunks", "bool", False, why="a corrupt buffer tail is cut off and counted"),
    no_effect("storage.trim_files", "bool", False, why="buffer segments are deleted once delivered"),
    no_effect("storage.backlog.flush_on_shutdown", "bool", False, why="outputs always drain on shutdown"),
    no_effect("dns.prefer_ipv6", "bool", False, why="the system resolver's order is used"),
    no_effect("hot_reload.timeout", "int", 0, why="there is no hot reload"),
    no_effect("json.escape_unicode", "bool", True, why="JSON is written as UTF-8"),
    no_effect("multiline_buffer_limit", "size", None, why="buffer_max_size limits a joined message"),
    no_effect("windows.maxstdio", "int", 512, why="kubetrail runs on Linux"),
    no_effect("hc_errors_count", "int", 5, why="/api/v1/health reports whether the pipeline runs"),
    no_effect("hc_retry_failure_count", "int", 5, why="/api/v1/health reports whether the pipeline runs"),
    no_effect("hc_period", "int", 60, why="/api/v1/health reports whether the pipeline runs"),
    no_effect("enable_chunk_trace", "bool", False, why="chunk tracing is Fluent Bit's debugging aid"),
)
