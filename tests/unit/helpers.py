"""Small builders shared by the unit tests."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from kubetrail.core.component import ComponentContext
from kubetrail.core.config import load_config
from kubetrail.core.errors import Location
from kubetrail.core.metrics import MetricsRegistry
from kubetrail.core.options import Option, Property, Section, resolve_options
from kubetrail.parsers.registry import ParserRegistry
from kubetrail.runtime.pipeline import Pipeline
from tests.timing import scaled


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


def tail_input(
    path: Path | str,
    *,
    tag: str = "app",
    parser: str | None = "json",
    db: Path | None = None,
    exit_on_eof: bool | None = True,
    extra: str = "",
) -> str:
    """A classic ``[INPUT]`` section tailing ``path`` from its head (``parser`` None: raw lines;
    ``exit_on_eof`` None: the option left out); extra option lines go in as given."""
    lines = ["[INPUT]", "    name tail", f"    path {path}", f"    tag {tag}"]
    if parser:
        lines.append(f"    parser {parser}")
    lines.append("    read_from_head on")
    if exit_on_eof is not None:
        lines.append(f"    exit_on_eof {'on' if exit_on_eof else 'off'}")
    if db is not None:
        lines.append(f"    db {db}")
    return "\n".join(lines) + "\n" + (extra.rstrip("\n") + "\n" if extra else "")


def file_output(directory: Path, *, match: str = "*", file: str = "out.jsonl", extra: str = "") -> str:
    """A classic ``[OUTPUT]`` section writing plain JSON lines to ``directory/file`` (read them
    with :func:`tests.files.written_json_lines`)."""
    return (
        f"[OUTPUT]\n    name file\n    match {match}\n    path {directory}\n    file {file}\n"
        "    format plain\n    mkdir on\n" + (extra.rstrip("\n") + "\n" if extra else "")
    )


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
    source = tail_input(path, tag=tag, parser=None, db=tmp_path / "tail.db", exit_on_eof=exit_on_eof)
    return write(
        tmp_path / "p.conf",
        f"""
[SERVICE]
    grace {grace}
{service_extra}
{source}{input_extra}
{filters}
{file_output(tmp_path / "out")}{output_extra}
""",
    )


async def run_pipeline(config: Path, timeout: float = 20) -> Pipeline:
    """Build the pipeline of ``config`` and run it until its finite inputs are done (exit 0);
    ``timeout`` as on an idle machine (:func:`tests.timing.scaled`)."""
    pipeline = Pipeline(load_config(config))
    assert await asyncio.wait_for(pipeline.run(), scaled(timeout)) == 0
    return pipeline


def tail_yaml(tmp_path: Path, log: Path, input_extra: str = "", rest: str = "", tag: str = "kube.app") -> Path:
    """``tmp_path/p.yaml``: a YAML pipeline tailing ``log`` (JSON lines) once, to whatever ``rest``
    declares (``filters:``, ``outputs:``); ``input_extra``: more lines of the tail input."""
    return write(
        tmp_path / "p.yaml",
        f"""
service:
  grace: 2
pipeline:
  inputs:
    - name: tail
      path: {log}
      tag: {tag}
      parser: json
      read_from_head: true
      exit_on_eof: true
      db: {tmp_path / "tail.db"}
{input_extra}
{rest}
""",
    )


def file_output_yaml(tmp_path: Path, match: str, name: str, extra: str = "", fmt: str | None = "plain") -> str:
    """One YAML output list item: the file output into ``tmp_path/out/name`` (``fmt`` None:
    Fluent Bit's out_file format, read with :func:`tests.unit.run_helpers.out_file_records`)."""
    form = f"      format: {fmt}\n" if fmt else ""
    return f"""    - name: file
      match: "{match}"
      path: {tmp_path / "out"}
      file: {name}
{form}      mkdir: true
{extra}
"""
