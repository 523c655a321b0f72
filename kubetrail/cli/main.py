"""kubetrail's command line (click).

Exit codes: 0 success, 1 runtime failure, 2 configuration error (nothing started), 3 (``run``)
stopped with undelivered data at the end of the grace period (replayed on the next start: not
lost, but the run did not finish its work, which a supervisor and an SRE must see).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from kubetrail import __version__
from kubetrail.core.config import PipelineConfig, load_config
from kubetrail.core.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).with_name("default.conf")


def _load(config_path: str | None) -> PipelineConfig:
    return load_config(config_path or DEFAULT_CONFIG)


def _config_error(exc: ConfigError) -> None:
    click.echo(f"kubetrail: configuration error: {exc}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kubetrail")
def main() -> None:
    """kubetrail records Kubernetes Events, audit records and container logs and delivers them
    with nothing lost and nothing repeated. It reads Fluent Bit configuration files."""


@main.command(
    epilog=(
        "Exit status: 0 stopped with everything delivered; 1 runtime failure (e.g. the monitoring port or a "
        "filesystem buffer cannot be used); 2 configuration error (nothing started); 3 the grace period ended "
        "with data not delivered (an error line names each output with its records and batches; they are "
        "read again from the inputs' checkpoints or replayed from the filesystem buffers on the next start); "
        "128+N a second signal N stopped it at once."
    )
)
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help=f"Config file, Fluent Bit classic or YAML (default: {DEFAULT_CONFIG.name}, container logs to stdout)",
)
@click.option("--log-level", default=None, help="Override the service log_level")
def run(config_path: str | None, log_level: str | None) -> None:
    """Run the pipeline until SIGTERM/SIGINT (or until every finite input is done)."""
    from kubetrail.runtime.logging_setup import setup_logging
    from kubetrail.runtime.pipeline import Pipeline

    try:
        config = _load(config_path)
        pipeline = Pipeline(config)
    except ConfigError as exc:
        _config_error(exc)
        return
    setup_logging(log_level or pipeline.service["log_level"])
    # What start-up made (modules, plugins, the config) lives as long as the process: out of the
    # collector's sight, each full collection walks only what the pipeline makes. Measured: 8%
    # less CPU for a tail -> file run of 300,000 lines (docs/benchmarks.md, issue 18).
    gc.freeze()
    sys.exit(asyncio.run(_run(pipeline)))


async def _run(pipeline: Any) -> int:
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            # A second signal means "now": exit without draining (undelivered data is replayed).
            os._exit(128 + signum)
        pipeline.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    result: int = await pipeline.run()
    return result


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="Config file to validate")
@click.option(
    "--in-cluster",
    is_flag=True,
    help="Also check, from where it runs, the files, API access (RBAC) and outputs the config needs; "
    "one line per check, exit 1 if any fails",
)
@click.option("--expect-url", multiple=True, help="With --in-cluster: also require this URL to answer 2xx")
@click.option(
    "--checks",
    default="files,api,outputs,urls",
    show_default=True,
    help="With --in-cluster: which kinds of checks to run, comma-separated",
)
def check(config_path: str | None, in_cluster: bool, expect_url: tuple[str, ...], checks: str) -> None:
    """Validate a config and print the resolved pipeline (exit 2 on errors)."""
    from kubetrail.runtime.pipeline import Pipeline

    try:
        pipeline = Pipeline(_load(config_path))
    except ConfigError as exc:
        _config_error(exc)
        return
    if in_cluster:
        from kubetrail.runtime.preflight import KINDS, run_preflight

        kinds = [k.strip() for k in checks.split(",") if k.strip()]
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise click.BadParameter(
                f"unknown {', '.join(unknown)}; choose from {', '.join(KINDS)}", param_hint="--checks"
            )
        results = asyncio.run(run_preflight(pipeline, expect_url, kinds))
        for result in results:
            click.echo(result.line())
        failed = sum(not c.ok for c in results)
        click.echo(f"{len(results) - failed} checks ok, {failed} failed" if results else "nothing to check", err=True)
        sys.exit(1 if failed else 0)
    click.echo(yaml.safe_dump(pipeline.describe(), sort_keys=False, default_flow_style=False), nl=False)
    click.echo("configuration is valid", err=True)


@main.command()
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--to", "target", type=click.Choice(["yaml", "classic"]), default="yaml", show_default=True)
def convert(config_file: str, target: str) -> None:
    """Convert a Fluent Bit config (classic or YAML) to YAML (or classic), includes resolved."""
    from kubetrail.core.config.convert import to_classic, to_yaml

    try:
        config = load_config(config_file)
        text = to_yaml(config) if target == "yaml" else to_classic(config)  # classic: no processors
    except ConfigError as exc:
        _config_error(exc)
        return
    click.echo(text, nl=False)


@main.command()
@click.argument("name", required=False)
def plugins(name: str | None) -> None:
    """List every plugin with its options and defaults (or just NAME's)."""
    from kubetrail.runtime import plugins as registry

    groups: list[tuple[str, dict[str, Any], tuple[Any, ...]]] = [
        ("input", dict(registry.SOURCES), registry.COMMON_INPUT_OPTIONS),
        ("filter", dict(registry.TRANSFORMS), registry.COMMON_FILTER_OPTIONS),
        ("output", dict(registry.SINKS), registry.COMMON_OUTPUT_OPTIONS),
    ]
    found = False
    for kind, classes, common in groups:
        for plugin_name, cls in sorted(classes.items()):
            if name and plugin_name != name:
                continue
            found = True
            click.echo(f"{kind} {plugin_name}: {cls.description}")
            for opt in (*cls.options, *common):
                default = "" if opt.default in (None, []) else f" (default: {opt.default})"
                required = " (required)" if opt.required else ""
                click.echo(f"    {opt.name:<22} {opt.kind:<9} {opt.help}{default}{required}")
            click.echo("")
    if name and not found:
        click.echo(f"no plugin named {name!r}", err=True)
        sys.exit(2)


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(f"kubetrail {__version__}")


from kubetrail.cli.rules import rules as _rules  # noqa: E402 - `kubetrail rules check|test`

main.add_command(_rules)

from kubetrail.cli.history import COMMANDS as _history_commands  # noqa: E402 - history, who, search, ui

for _command in _history_commands:
    main.add_command(_command)

if __name__ == "__main__":
    main()
