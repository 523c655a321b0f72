"""Small builders shared by the unit tests."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kubetrail.core.component import ComponentContext
from kubetrail.core.errors import Location
from kubetrail.core.metrics import MetricsRegistry
from kubetrail.core.options import Option, Property, Section, resolve_options
from kubetrail.parsers.registry import ParserRegistry


def section(kind: str, **props: Any) -> Section:
    sec = Section(kind, Location("<test>", 1))
    for key, value in props.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            sec.properties.append(Property(key.replace("__", ".").lower(), str(item), Location("<test>", 2)))
    return sec


def build(cls: Any, common: tuple[Option, ...] = (), parsers: ParserRegistry | None = None, **props: Any) -> Any:
    sec = section("filter", **props)
    values = resolve_options(sec, (*common, *cls.options), cls.plugin_name)
    ctx = ComponentContext(
        component_id=f"{cls.plugin_name}.0",
        metrics=MetricsRegistry().component(f"{cls.plugin_name}.0", "test", cls.plugin_name),
        logger=logging.getLogger("kubetrail.test"),
        parsers=parsers or ParserRegistry(),
        section=sec,
    )
    return cls(ctx, values)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
