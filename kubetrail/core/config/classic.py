"""Fluent Bit's classic format: ``[SECTION]`` headers, ``key value`` lines, ``@INCLUDE``, ``@SET``.

Keys are case-insensitive. ``Parsers_File`` entries of ``[SERVICE]`` are read after the main
file, relative to it, and may hold ``[PARSER]`` and ``[MULTILINE_PARSER]`` sections.
"""

from __future__ import annotations

import glob
from pathlib import Path

from kubetrail.core.config.compat import external_plugin_message
from kubetrail.core.config.model import SECTION_KINDS, PipelineConfig, expand_variables
from kubetrail.core.errors import ConfigError, Location
from kubetrail.core.options import Property, Section

_MAX_INCLUDE_DEPTH = 16


def read_classic_config(path: Path) -> PipelineConfig:
    config = PipelineConfig()
    variables: dict[str, str] = {}
    _read_file(path, config, variables, depth=0)
    load_parsers_files(config, path.parent, variables)
    check_plugins_files(config, variables)
    return config


def check_plugins_files(config: PipelineConfig, variables: dict[str, str]) -> None:
    """``plugins_file`` lists external ``.so`` plugins (``[PLUGINS]`` sections, ``path`` keys, or a
    YAML ``plugins:`` list). A file that lists none is fine; each listed one is refused by name."""
    for prop in config.service.get_all("plugins_file"):
        target = Path(prop.value)
        if not target.is_absolute():
            target = Path(prop.location.file).parent / target
        if not target.exists():
            raise ConfigError(f"plugins file not found: {target}", prop.location, "plugins_file")
        if target.suffix.lower() in (".yaml", ".yml"):
            from kubetrail.core.config.yaml_format import read_yaml_plugins

            read_yaml_plugins(target, variables)
            continue
        try:
            text = target.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read plugins file: {exc}", prop.location, "plugins_file") from None
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#") or line.startswith("["):
                continue
            key, _, value = line.partition(" ")
            if key.lower() == "path" and value.strip():
                location = Location(str(target), number)
                raise ConfigError(
                    external_plugin_message(expand_variables(value.strip(), variables, location)), location, "path"
                )


def load_parsers_files(config: PipelineConfig, base: Path, variables: dict[str, str]) -> None:
    """Read each ``parsers_file`` of the service section (either format)."""
    for prop in config.service.get_all("parsers_file"):
        target = Path(prop.value)
        if not target.is_absolute():
            target = Path(prop.location.file).parent / target
        if not target.exists():
            raise ConfigError(f"parsers file not found: {target}", prop.location, "parsers_file")
        if target.suffix.lower() in (".yaml", ".yml"):
            from kubetrail.core.config.yaml_format import read_yaml_parsers

            read_yaml_parsers(target, config, variables)
        else:
            _read_file(target, config, variables, depth=0, parsers_only=True)


def _read_file(
    path: Path, config: PipelineConfig, variables: dict[str, str], depth: int, parsers_only: bool = False
) -> None:
    if depth > _MAX_INCLUDE_DEPTH:
        raise ConfigError(f"@INCLUDE nested deeper than {_MAX_INCLUDE_DEPTH} levels (a cycle?)", Location(str(path), 0))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file: {exc}", Location(str(path), 0)) from None
    config.files.append(str(path))
    section: Section | None = None
    for number, raw_line in enumerate(text.splitlines(), start=1):
        location = Location(str(path), number)
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            command, _, argument = line.partition(" ")
            command = command.upper()
            argument = argument.strip()
            if command == "@INCLUDE":
                _include(path, argument, config, variables, depth, location)
                section = None
            elif command == "@SET":
                name, eq, value = argument.partition("=")
                if not eq or not name.strip():
                    raise ConfigError("@SET expects KEY=VALUE", location)
                variables[name.strip()] = expand_variables(value.strip(), variables, location)
            else:
                raise ConfigError(f"unknown command {command}; allowed: @INCLUDE, @SET", location)
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ConfigError(f"section header not closed: {line!r}", location)
            kind = line[1:-1].strip().lower()
            if kind not in SECTION_KINDS:
                allowed = ", ".join(f"[{k.upper()}]" for k in SECTION_KINDS)
                raise ConfigError(f"unknown section [{line[1:-1].strip()}]; allowed: {allowed}", location)
            if parsers_only and kind not in ("parser", "multiline_parser"):
                raise ConfigError(f"a parsers file may hold only [PARSER] and [MULTILINE_PARSER], not {line}", location)
            section = Section(kind, location)
            config.add(section)
            continue
        if section is None:
            raise ConfigError(f"property outside of a section: {line!r}", location)
        key, _, value = line.partition(" ")
        if "\t" in key:
            key, _, rest = key.partition("\t")
            value = rest + " " + value
        value = expand_variables(value.strip(), variables, location)
        prop = Property(expand_variables(key, variables, location).lower(), value, location)
        if section.kind == "service":
            config.service.properties.append(prop)
        else:
            section.properties.append(prop)


def _include(
    including: Path, pattern: str, config: PipelineConfig, variables: dict[str, str], depth: int, location: Location
) -> None:
    if not pattern:
        raise ConfigError("@INCLUDE needs a file name or glob", location)
    pattern = expand_variables(pattern, variables, location)
    full = pattern if Path(pattern).is_absolute() else str(including.parent / pattern)
    matches = sorted(glob.glob(full))
    if not matches and not glob.has_magic(full):
        raise ConfigError(f"@INCLUDE file not found: {full}", location)
    for match in matches:
        _read_file(Path(match), config, variables, depth + 1)
