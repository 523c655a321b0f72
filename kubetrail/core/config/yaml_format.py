"""Fluent Bit's YAML format: ``env``, ``includes``, ``service``, ``parsers``,
``multiline_parsers`` and ``pipeline: {inputs, filters, outputs}``.

PyYAML's node tree is walked directly (rather than ``safe_load``) so that every value keeps its
line number for error messages. A list value becomes a repeated property, which is how the
YAML format spells keys that repeat in the classic one (``regex``, ``add``, ``rule``).

``processors:`` on an input or output (Fluent Bit 3+: ``{logs: [...], metrics: [...], traces:
[...]}``) is read into filter sections kept beside their owner (``PipelineConfig.processors``);
``metrics`` and ``traces`` are accepted and ignored with a notice, since kubetrail carries logs
only. ``plugins:`` (external ``.so`` plugins) is refused by name: they cannot run in Python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from kubetrail.core.config.compat import external_plugin_message
from kubetrail.core.config.condition import parse_condition
from kubetrail.core.config.model import PipelineConfig, expand_variables
from kubetrail.core.errors import ConfigError, Location
from kubetrail.core.options import Property, Section

_TOP_KEYS = ("env", "includes", "service", "parsers", "multiline_parsers", "pipeline", "plugins")
_SIGNALS = ("logs", "metrics", "traces")
_PIPELINE_KEYS = {"inputs": "input", "filters": "filter", "outputs": "output"}


def read_yaml_config(path: Path) -> PipelineConfig:
    config = PipelineConfig()
    variables: dict[str, str] = {}
    _read_document(path, config, variables, depth=0)
    from kubetrail.core.config.classic import check_plugins_files, load_parsers_files

    load_parsers_files(config, path.parent, variables)
    check_plugins_files(config, variables)
    return config


def read_yaml_plugins(path: Path, variables: dict[str, str]) -> None:
    """A YAML ``plugins_file``: ``plugins: [paths]``; any listed plugin is refused."""
    for key_node, value_node in _mapping_items(_compose(path), path):
        if key_node.value == "plugins":
            _refuse_plugins(value_node, path, variables)


def read_yaml_parsers(path: Path, config: PipelineConfig, variables: dict[str, str]) -> None:
    root = _compose(path)
    config.files.append(str(path))
    for key_node, value_node in _mapping_items(root, path):
        key = key_node.value
        if key == "parsers":
            _read_sections(value_node, "parser", path, config, variables)
        elif key == "multiline_parsers":
            _read_sections(value_node, "multiline_parser", path, config, variables)
        else:
            raise ConfigError(
                f"unknown key {key!r} in a parsers file; allowed: parsers, multiline_parsers", _loc(path, key_node)
            )


def _compose(path: Path) -> yaml.Node:
    try:
        with path.open("r", encoding="utf-8") as handle:
            node = yaml.compose(handle, Loader=yaml.SafeLoader)
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc}", Location(str(path), 0)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"YAML does not parse: {problem}", Location(str(path), line)) from None
    if node is None:
        return yaml.MappingNode("tag:yaml.org,2002:map", [])
    return node


def _loc(path: Path, node: yaml.Node) -> Location:
    return Location(str(path), node.start_mark.line + 1)


def _mapping_items(node: yaml.Node, path: Path) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError("expected a mapping (key: value)", _loc(path, node))
    items = []
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise ConfigError("keys must be plain strings", _loc(path, key_node))
        items.append((key_node, value_node))
    return items


def _read_document(path: Path, config: PipelineConfig, variables: dict[str, str], depth: int) -> None:
    if depth > 16:
        raise ConfigError("includes nested deeper than 16 levels (a cycle?)", Location(str(path), 0))
    root = _compose(path)
    config.files.append(str(path))
    items = _mapping_items(root, path)
    # env first: later sections may use its variables wherever they appear in the file.
    for key_node, value_node in items:
        if key_node.value == "env":
            for name_node, val_node in _mapping_items(value_node, path):
                variables[name_node.value] = _scalar(val_node, path, variables)
    for key_node, value_node in items:
        key = key_node.value
        if key == "env":
            continue
        if key == "includes":
            if not isinstance(value_node, yaml.SequenceNode):
                raise ConfigError("'includes' must be a list of files", _loc(path, value_node))
            for item in value_node.value:
                target = Path(_scalar(item, path, variables))
                if not target.is_absolute():
                    target = path.parent / target
                if not target.exists():
                    raise ConfigError(f"included file not found: {target}", _loc(path, item))
                _read_document(target, config, variables, depth + 1)
        elif key == "service":
            section = Section("service", _loc(path, key_node))
            section.properties.extend(_service_properties(value_node, path, variables))
            config.add(section)
        elif key == "parsers":
            _read_sections(value_node, "parser", path, config, variables)
        elif key == "multiline_parsers":
            _read_sections(value_node, "multiline_parser", path, config, variables)
        elif key == "plugins":
            _refuse_plugins(value_node, path, variables)
        elif key == "pipeline":
            for pipe_key, pipe_value in _mapping_items(value_node, path):
                kind = _PIPELINE_KEYS.get(pipe_key.value)
                if kind is None:
                    raise ConfigError(
                        f"unknown key {pipe_key.value!r} under pipeline; allowed: inputs, filters, outputs",
                        _loc(path, pipe_key),
                    )
                _read_sections(pipe_value, kind, path, config, variables)
        else:
            raise ConfigError(f"unknown top-level key {key!r}; allowed: {', '.join(_TOP_KEYS)}", _loc(path, key_node))


def _read_sections(node: yaml.Node, kind: str, path: Path, config: PipelineConfig, variables: dict[str, str]) -> None:
    if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
        return
    if not isinstance(node, yaml.SequenceNode):
        raise ConfigError(f"expected a list of {kind}s", _loc(path, node))
    for item in node.value:
        section = Section(kind, _loc(path, item))
        processors: yaml.Node | None = None
        if kind == "filter" and isinstance(item, yaml.MappingNode):
            for key_node, _value in item.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value.lower() == "processors":
                    raise ConfigError(
                        "processors belong to inputs and outputs, not filters (a filter is matched by tag already)",
                        _loc(path, key_node),
                        "processors",
                    )
        if kind in ("input", "output") and isinstance(item, yaml.MappingNode):
            kept = []
            for key_node, value_node in item.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value.lower() == "processors":
                    processors = value_node
                else:
                    kept.append((key_node, value_node))
            item = yaml.MappingNode(item.tag, kept, item.start_mark, item.end_mark)
        section.properties.extend(_properties(item, path, variables, kind))
        config.add(section)
        if processors is not None:
            config.processors[id(section)] = _read_processors(processors, path, config, variables)


def _read_processors(node: yaml.Node, path: Path, config: PipelineConfig, variables: dict[str, str]) -> list[Section]:
    """``processors: {logs: [{name: ..., ...}]}`` -> filter sections, in the order written."""
    sections: list[Section] = []
    for signal_node, list_node in _mapping_items(node, path):
        signal = signal_node.value.lower()
        if signal not in _SIGNALS:
            raise ConfigError(
                f"unknown key {signal_node.value!r} under processors; allowed: {', '.join(_SIGNALS)}",
                _loc(path, signal_node),
            )
        if not isinstance(list_node, yaml.SequenceNode):
            raise ConfigError(f"processors.{signal} must be a list of processors", _loc(path, list_node))
        if signal != "logs":
            config.notices.append(
                f"{_loc(path, signal_node)}: processors.{signal} ignored: kubetrail carries logs only"
            )
            continue
        for item in list_node.value:
            section = Section("filter", _loc(path, item))
            condition: yaml.Node | None = None
            if isinstance(item, yaml.MappingNode):
                kept = []
                for key_node, value_node in item.value:
                    if isinstance(key_node, yaml.ScalarNode) and key_node.value.lower() == "condition":
                        condition = value_node
                    else:
                        kept.append((key_node, value_node))
                item = yaml.MappingNode(item.tag, kept, item.start_mark, item.end_mark)
            section.properties.extend(_properties(item, path, variables, "filter"))
            sections.append(section)
            if condition is not None:
                data = _expand_all(SafeConstructor().construct_document(condition), variables, _loc(path, condition))
                config.conditions[id(section)] = parse_condition(data, _loc(path, condition))
    return sections


def _expand_all(data: Any, variables: dict[str, str], location: Location) -> Any:
    """``${VAR}`` in every string of a structure read with its YAML types (a condition)."""
    if isinstance(data, str):
        return expand_variables(data, variables, location)
    if isinstance(data, list):
        return [_expand_all(item, variables, location) for item in data]
    if isinstance(data, dict):
        return {key: _expand_all(value, variables, location) for key, value in data.items()}
    return data


def _refuse_plugins(node: yaml.Node, path: Path, variables: dict[str, str]) -> None:
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    for item in items:
        if isinstance(item, yaml.ScalarNode) and item.value in ("", "~", "null"):
            continue
        name = _scalar(item, path, variables)
        raise ConfigError(external_plugin_message(name), _loc(path, item), "plugins")


def _properties(node: yaml.Node, path: Path, variables: dict[str, str], kind: str = "") -> list[Property]:
    props: list[Property] = []
    for key_node, value_node in _mapping_items(node, path):
        name = key_node.value.lower()
        location = _loc(path, key_node)
        if kind == "multiline_parser" and name == "rules":
            props.extend(_multiline_rules(value_node, path, variables))
            continue
        if isinstance(value_node, yaml.SequenceNode):
            for item in value_node.value:
                props.append(Property(name, _scalar(item, path, variables), _loc(path, item)))
        else:
            props.append(Property(name, _scalar(value_node, path, variables), location))
    return props


def _service_properties(node: yaml.Node, path: Path, variables: dict[str, str], prefix: str = "") -> list[Property]:
    """``service`` keys; a nested mapping is Fluent Bit's grouped form (``storage: {path: ...}``
    is ``storage.path``, ``http_server: ...`` stays as it is)."""
    props: list[Property] = []
    for key_node, value_node in _mapping_items(node, path):
        name = prefix + key_node.value.lower()
        if isinstance(value_node, yaml.MappingNode):
            props.extend(_service_properties(value_node, path, variables, name + "."))
        elif isinstance(value_node, yaml.SequenceNode):
            props.extend(Property(name, _scalar(item, path, variables), _loc(path, item)) for item in value_node.value)
        else:
            props.append(Property(name, _scalar(value_node, path, variables), _loc(path, key_node)))
    return props


def _multiline_rules(node: yaml.Node, path: Path, variables: dict[str, str]) -> list[Property]:
    """YAML ``rules: [{state, regex, next_state}]`` -> classic ``rule "state" "/regex/" "next"``."""
    if not isinstance(node, yaml.SequenceNode):
        raise ConfigError("'rules' must be a list of {state, regex, next_state}", _loc(path, node))
    props = []
    for item in node.value:
        fields = {k.value: _scalar(v, path, variables) for k, v in _mapping_items(item, path)}
        missing = {"state", "regex", "next_state"} - set(fields)
        if missing:
            raise ConfigError(f"rule is missing {', '.join(sorted(missing))}", _loc(path, item))
        regex = fields["regex"]
        if not (len(regex) >= 2 and regex.startswith("/") and regex.endswith("/")):
            regex = f"/{regex}/"  # Fluent Bit's docs write it with the slashes, or without
        value = f'"{fields["state"]}" "{regex}" "{fields["next_state"]}"'
        props.append(Property("rule", value, _loc(path, item)))
    return props


def _scalar(node: yaml.Node, path: Path, variables: dict[str, str]) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError("expected a single value here, not a list or mapping", _loc(path, node))
    return expand_variables(str(node.value), variables, _loc(path, node))
