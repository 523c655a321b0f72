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


def tail_file_config(
    tmp_path: Path,
    path: Path | str,
    *,
    tag: str = "app",
    input_extra: str = "",
    filters: str = "",
    output_extra: str = "",
    service_extra: str = "",
    exit_on_eof: bool = True,
    grace: int = 2,
) -> Path:
    """``tmp_path/p.conf``: tail ``path`` from its head (offsets in ``tmp_path/tail.db``) into
    ``tmp_path/out/out.jsonl`` (plain JSON lines); extra option lines go in as given."""
    return write(
        tmp_path / "p.conf",
        f"""
[SERVICE]
    grace {grace}
{service_extra}
[INPUT]
    name tail
    path {path}
    tag {tag}
    read_from_head on
    exit_on_eof {"on" if exit_on_eof else "off"}
    db {tmp_path / "tail.db"}
{input_extra}
{filters}
[OUTPUT]
    name file
    match *
    path {tmp_path / "out"}
    file out.jsonl
    format plain
    mkdir on
{output_extra}
""",
    )
