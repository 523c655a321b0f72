"""The format-independent config model both readers produce."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from kubetrail.core.config.condition import Condition
from kubetrail.core.errors import ConfigError, Location
from kubetrail.core.options import Section

SECTION_KINDS = ("service", "input", "filter", "output", "parser", "multiline_parser")


@dataclass
class PipelineConfig:
    service: Section = field(default_factory=lambda: Section("service", Location("<default>", 0)))
    inputs: list[Section] = field(default_factory=list)
    filters: list[Section] = field(default_factory=list)
    outputs: list[Section] = field(default_factory=list)
    parsers: list[Section] = field(default_factory=list)
    multiline_parsers: list[Section] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    # YAML ``processors: {logs: [...]}`` of an input or output, keyed by ``id()`` of its
    # section (the section lists keep them alive). Each processor is a filter section.
    processors: dict[int, list[Section]] = field(default_factory=dict)
    # Things read and deliberately ignored, logged once when the pipeline is built.
    notices: list[str] = field(default_factory=list)
    # A processor's ``condition:`` (Fluent Bit 4+), keyed by ``id()`` of the processor's section.
    conditions: dict[int, Condition] = field(default_factory=dict)

    def processors_of(self, section: Section) -> list[Section]:
        return self.processors.get(id(section), [])

    def add(self, section: Section) -> None:
        if section.kind == "service":
            # Several [SERVICE] sections merge, later keys winning, as in Fluent Bit.
            self.service.properties.extend(section.properties)
            if self.service.location.line == 0:
                self.service.location = section.location
            return
        target = {
            "input": self.inputs,
            "filter": self.filters,
            "output": self.outputs,
            "parser": self.parsers,
            "multiline_parser": self.multiline_parsers,
        }[section.kind]
        target.append(section)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_variables(text: str, variables: Mapping[str, str], location: Location) -> str:
    """``${NAME}`` from ``@SET``/``env`` variables, then the process environment.

    An undefined variable is an error rather than Fluent Bit's silent empty string: an empty
    ``path`` or ``match`` is never what the user meant.
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in variables:
            return variables[name]
        if name in os.environ:
            return os.environ[name]
        raise ConfigError(f"variable ${{{name}}} is not defined (use @SET, env: or the environment)", location)

    return _VAR.sub(replace, text) if "${" in text else text
