"""Writing a config model back out, for ``kubetrail convert``."""

from __future__ import annotations

from typing import Any

import yaml

from kubetrail.core.config.model import PipelineConfig
from kubetrail.core.options import Section


def _as_mapping(section: Section) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for prop in section.properties:
        if prop.name in out:
            existing = out[prop.name]
            out[prop.name] = [*existing, prop.value] if isinstance(existing, list) else [existing, prop.value]
        else:
            out[prop.name] = prop.value
    return out


def _with_processors(config: PipelineConfig, section: Section) -> dict[str, Any]:
    out = _as_mapping(section)
    processors = config.processors_of(section)
    if processors:
        out["processors"] = {"logs": [_processor(config, p) for p in processors]}
    return out


def _processor(config: PipelineConfig, section: Section) -> dict[str, Any]:
    out = _as_mapping(section)
    condition = config.conditions.get(id(section))
    if condition is not None:
        out["condition"] = condition.source
    return out


def to_yaml(config: PipelineConfig) -> str:
    doc: dict[str, Any] = {}
    service = _as_mapping(config.service)
    service.pop("parsers_file", None)  # parsers are inlined below
    if service:
        doc["service"] = service
    if config.parsers:
        doc["parsers"] = [_as_mapping(s) for s in config.parsers]
    if config.multiline_parsers:
        doc["multiline_parsers"] = [_as_mapping(s) for s in config.multiline_parsers]
    pipeline: dict[str, Any] = {}
    for key, sections in (("inputs", config.inputs), ("filters", config.filters), ("outputs", config.outputs)):
        if sections:
            pipeline[key] = [_with_processors(config, s) for s in sections]
    doc["pipeline"] = pipeline
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True)


def to_classic(config: PipelineConfig) -> str:
    """Processors have no classic form (Fluent Bit reads them from YAML only): converting a
    config that has them is refused rather than silently dropping them."""
    if any(config.processors.values()):
        from kubetrail.core.errors import ConfigError

        raise ConfigError("processors exist only in the YAML format; convert to yaml, or use filters instead")
    lines: list[str] = []
    groups = [
        ("SERVICE", [config.service]),
        ("PARSER", config.parsers),
        ("MULTILINE_PARSER", config.multiline_parsers),
        ("INPUT", config.inputs),
        ("FILTER", config.filters),
        ("OUTPUT", config.outputs),
    ]
    for header, sections in groups:
        for section in sections:
            props = [p for p in section.properties if not (header == "SERVICE" and p.name == "parsers_file")]
            if not props:
                continue
            lines.append(f"[{header}]")
            width = max(len(p.name) for p in props)
            lines.extend(f"    {p.name.ljust(width)} {p.value}" for p in props)
            lines.append("")
    return "\n".join(lines)
