"""``kubetrail rules check|test``: Falco rules files without running a pipeline.

``check FILE...`` loads the files in order (as the ``detect`` filter does) and reports the first
error with file, line and rule, or what was loaded and the warnings (lists and macros never
used, a value that reads like an undefined list's name). ``test --rules FILE... --events FILE``
runs the rules on audit events (JSON lines as in the API server's log, an ``EventList`` or a
JSON array, as the webhook posts them), like running Falco on a trace file: one line per alert
in Falco's text form, or with ``--json`` one alert record per line (the ``detect`` filter's
record). Exit codes: 0 rules loaded (and events read), whatever fired; 1 events unreadable or,
with ``check --strict``, warnings; 2 a rules error.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import click
import orjson


def _load(files: tuple[str, ...]) -> Any:
    from kubetrail.detect import RulesError, expand_paths, load_rules

    try:
        return load_rules(expand_paths(list(files)))
    except (RulesError, ValueError) as exc:
        click.echo(f"kubetrail: rules error: {exc}", err=True)
        sys.exit(2)


@click.group()
def rules() -> None:
    """Check Falco rules files and test them on audit events."""


@rules.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--strict", is_flag=True, help="Exit 1 when there are warnings")
def check(files: tuple[str, ...], strict: bool) -> None:
    """Load FILES in order (base rules first, then overrides) and report errors and warnings."""
    engine = _load(files)
    ruleset = engine.ruleset
    other = engine.skipped_sources
    skipped = ", ".join(f"{source}: {count}" for source, count in sorted(other.items()))
    click.echo(
        f"{len(engine.rules)} k8s_audit rules compiled ({engine.disabled} disabled), "
        f"{len(ruleset.macros)} macros, {len(ruleset.lists)} lists"
        + (f"; rules of other sources skipped ({skipped})" if skipped else "")
    )
    for warning in engine.warnings:
        click.echo(f"warning: {warning}")
    sys.exit(1 if strict and engine.warnings else 0)


def _read_events(path: str) -> tuple[list[bytes], int]:
    """The events of a file as JSON bytes each, and how many lines were not JSON objects."""
    try:
        data = open(path, "rb").read()  # noqa: SIM115 - read whole, closed by refcount
    except OSError as exc:
        click.echo(f"kubetrail: cannot read events file: {exc}", err=True)
        sys.exit(1)
    stripped = data.strip()
    if stripped[:1] in (b"[", b"{"):
        try:
            whole = orjson.loads(stripped)
        except orjson.JSONDecodeError:
            whole = None  # JSON lines, most likely
        if isinstance(whole, list):
            return [orjson.dumps(item) for item in whole if isinstance(item, dict)], sum(
                not isinstance(item, dict) for item in whole
            )
        if isinstance(whole, dict):
            items = whole.get("items") if whole.get("kind") == "EventList" else None
            if isinstance(items, list):
                return [orjson.dumps(item) for item in items if isinstance(item, dict)], 0
            return [orjson.dumps(whole)], 0
    events: list[bytes] = []
    bad = 0
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            bad += 1
            click.echo(f"{path}:{number}: not JSON, skipped ({exc})", err=True)
            continue
        if not isinstance(value, dict):
            bad += 1
            click.echo(f"{path}:{number}: not a JSON object, skipped", err=True)
            continue
        events.append(line.strip())
    return events, bad


@rules.command()
@click.option("--rules", "rule_files", multiple=True, required=True, help="Rules file (repeat: loaded in order)")
@click.option("--events", "events_file", required=True, help="Audit events: JSON lines, an EventList or a JSON array")
@click.option("--json", "as_json", is_flag=True, help="Print each alert as one JSON line (the alert record)")
@click.option("--min-priority", default="debug", show_default=True, help="Lowest priority evaluated")
def test(rule_files: tuple[str, ...], events_file: str, as_json: bool, min_priority: str) -> None:
    """Run the rules on the events and print which rules fire on which events."""
    from kubetrail.detect import decode_block, priority_level

    engine = _load(rule_files)
    try:
        level = priority_level(min_priority)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--min-priority") from None
    engine.rules = [rule for rule in engine.rules if rule.priority <= level]
    raw_events, bad = _read_events(events_file)
    fired: Counter[str] = Counter()
    not_audit = 0
    for event in decode_block(raw_events):
        if not event.is_audit_event():
            not_audit += 1
            continue
        for rule in engine.match(event):
            fired[rule.name] += 1
            alert = engine.alert(rule, event)
            record = engine.alert_record(alert, event)
            if as_json:
                click.echo(orjson.dumps(record).decode())
            else:
                click.echo(f"{record['output']} (rule '{rule.name}', auditID {record['k8s.audit.id']})")
    summary = f"{len(raw_events)} events read, {sum(fired.values())} alerts"
    if bad or not_audit:
        summary += f"; {bad} lines skipped, {not_audit} events without auditID"
    click.echo(summary, err=True)
    for name, count in fired.most_common():
        click.echo(f"  {count:>6}  {name}", err=True)
