"""Fluent Bit configuration, classic and YAML, read into one typed model.

Users arrive with Fluent Bit configs, so both of its formats are accepted as they are:
:mod:`.classic` reads ``[SECTION]`` files with ``@INCLUDE``/``@SET``, :mod:`.yaml_format` reads
``service``/``pipeline``/``parsers`` YAML. Both produce a :class:`PipelineConfig` whose every
property remembers its file and line, so errors found later (unknown key, bad value) can still
point at the line the user wrote.
"""

from __future__ import annotations

from pathlib import Path

from kubetrail.core.config.model import PipelineConfig
from kubetrail.core.errors import ConfigError

YAML_SUFFIXES = (".yaml", ".yml")


def load_config(path: str | Path) -> PipelineConfig:
    """Read a config file in either format (chosen by extension, as Fluent Bit does)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix.lower() in YAML_SUFFIXES:
        from kubetrail.core.config.yaml_format import read_yaml_config

        return read_yaml_config(path)
    from kubetrail.core.config.classic import read_classic_config

    return read_classic_config(path)


__all__ = ["ConfigError", "PipelineConfig", "load_config"]
