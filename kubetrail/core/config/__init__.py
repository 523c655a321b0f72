"""Fluent Bit configuration, classic and YAML, read into one typed model.

Users arrive with Fluent Bit configs, so both of its formats are accepted as they are:
:mod:`.classic` reads ``[SECTION]`` files with ``@INCLUDE``/``@SET``, :mod:`.yaml_format` reads
``service``/``pipeline``/``parsers`` YAML. Both produce a :class:`PipelineConfig` whose every
property remembers its file and line, so errors found later (unknown key, bad value) can still
point at the line the user wrote.

:func:`load_config` also refuses two plugins keeping state in one file
(:func:`kubetrail.core.state.check_state_files`): what would otherwise show up only as mixed-up
data (one tail's files under another's tag) is a configuration error before anything starts.
"""

from __future__ import annotations

from pathlib import Path

from kubetrail.core.config.model import PipelineConfig
from kubetrail.core.errors import ConfigError
from kubetrail.core.state import check_state_files

YAML_SUFFIXES = (".yaml", ".yml")


def load_config(path: str | Path) -> PipelineConfig:
    """Read a config file in either format (chosen by extension, as Fluent Bit does)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix.lower() in YAML_SUFFIXES:
        from kubetrail.core.config.yaml_format import read_yaml_config

        config = read_yaml_config(path)
    else:
        from kubetrail.core.config.classic import read_classic_config

        config = read_classic_config(path)
    check_state_files(config)
    return config


__all__ = ["ConfigError", "PipelineConfig", "load_config"]
