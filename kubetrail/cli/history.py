"""``kubetrail history``, ``who``, ``search`` and ``ui``: the questions the audit log exists for.

They read the embedded store (the ``sqlite`` output; ``--store``, default
``.kubetrail/store.db`` or ``$KUBETRAIL_STORE``) or, with ``--from es://HOST:PORT/INDEX``
(``es+https://`` for TLS, ``user:password@`` for basic auth), Elasticsearch or OpenSearch.
Exit codes: 0 found, 1 nothing found or the store/index cannot be read (the message says why),
2 bad arguments.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import click

DEFAULT_STORE = ".kubetrail/store.db"


def _backend(store: str | None, source: str | None) -> Any:
    from kubetrail.history.model import HistoryError

    if source and "://" in source and not source.startswith("sqlite://"):
        from kubetrail.history.es import EsBackend

        return EsBackend.from_url(source)
    path = source.removeprefix("sqlite://") if source else (store or os.environ.get("KUBETRAIL_STORE") or DEFAULT_STORE)
    from kubetrail.history.store import StoreBackend

    try:
        return StoreBackend(path)
    except HistoryError:
        raise


Ask = Callable[[Any, dict[str, Any]], Any]  # (backend, {since, until, limit}) -> queries.Result


def _query_command(func: Callable[..., Ask]) -> Callable[..., None]:
    """The plumbing every query command shares, in one place: the options ``--store``,
    ``--from``, ``--since``, ``--until``, ``--limit`` and ``--json``, the time bounds parsed, the
    backend opened and closed, errors and output. The command itself only returns its question:
    ``lambda backend, window: queries.who(backend, user, **window)``."""

    @functools.wraps(func)
    def command(
        *,
        store: str | None,
        source: str | None,
        since: str | None,
        until: str | None,
        limit: int,
        as_json: bool,
        **arguments: Any,
    ) -> None:
        window = dict(zip(("since", "until"), _times(since, until), strict=True)) | {"limit": limit}
        ask = func(**arguments)

        def query() -> Any:
            backend = _backend(store, source)
            try:
                return ask(backend, window)
            finally:
                backend.close()

        _run(query, as_json)

    command = click.option("--json", "as_json", is_flag=True, help="One JSON object per entry (JSON lines)")(command)
    command = click.option(
        "--limit", default=1_000, show_default=True, help="At most this many records: the newest, shown oldest first"
    )(command)
    command = click.option("--until", help="Up to this time: a duration back from now (30m) or a time (RFC 3339)")(
        command
    )
    command = click.option("--since", help="From this time: a duration back from now (2h, 7d) or a time (RFC 3339)")(
        command
    )
    command = click.option(
        "--from",
        "source",
        help="Where to read: es://HOST:PORT/INDEX (Elasticsearch/OpenSearch; es+https:// for TLS) or a store file",
    )(command)
    return click.option(
        "--store",
        type=click.Path(dir_okay=False),
        help=f"The store file (default: $KUBETRAIL_STORE or {DEFAULT_STORE})",
    )(command)


def _run(query: Any, as_json: bool) -> None:
    import orjson

    from kubetrail.history.model import HistoryError
    from kubetrail.history.render import lines

    try:
        result = query()
    except HistoryError as exc:
        click.echo(f"kubetrail: {exc}", err=True)
        sys.exit(1)
    if as_json:
        out = sys.stdout.buffer
        for entry in result.entries:
            out.write(orjson.dumps(entry, option=orjson.OPT_NON_STR_KEYS) + b"\n")
        out.flush()
    else:
        click.echo(f"# {result.title}: {len(result.entries)} entries, oldest first")
        for line in lines(result.entries):
            click.echo(line)
    if result.truncated:
        click.echo(
            f"kubetrail: older records left out (the newest {len(result.entries)} shown); narrow with --since/--until"
            " or raise --limit",
            err=True,
        )


def _times(since: str | None, until: str | None) -> tuple[int | None, int | None]:
    from kubetrail.history.model import HistoryError, parse_time

    try:
        return parse_time(since), parse_time(until)
    except HistoryError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.argument("target", metavar="KIND[/NAMESPACE]/NAME|UID")
@click.option("--logs", is_flag=True, help="Also the container log lines of the object (a pod, or a workload's pods)")
@click.option("--status", is_flag=True, help="Also the writes to its status subresource (by its controllers)")
@_query_command
def history(target: str, logs: bool, status: bool) -> Ask:
    """Who did what to an object, and what happened to it: audit records (with what changed),
    the alerts they fired, and Events, oldest first. Example: kubetrail history deploy/shop/web"""
    from kubetrail.history import queries

    return lambda backend, window: queries.history(backend, target, logs=logs, status=status, **window)


@click.command()
@click.argument("user")
@click.option("--writes", is_flag=True, help="Only requests that change something (create, update, patch, delete)")
@_query_command
def who(user: str, writes: bool) -> Ask:
    """What a user or service account did (system:serviceaccount:NAMESPACE:NAME), and the alerts
    it fired, oldest first."""
    from kubetrail.history import queries

    return lambda backend, window: queries.who(backend, user, writes_only=writes, **window)


@click.command()
@click.option("--kind", type=click.Choice(["audit", "event", "log", "alert"]), help="Kind of record")
@click.option("--user", help="Audit: the user name")
@click.option("--verb", help="Audit: get, list, create, update, patch, delete, ...")
@click.option("--resource", help="The object's kind (deploy, pods, secrets, ...)")
@click.option("--namespace", "-n", help="The object's namespace")
@click.option("--name", help="The object's name")
@click.option("--code", type=int, help="Audit: the response code (403, 404, ...)")
@click.option("--reason", help="Events: the reason (BackOff, ScalingReplicaSet, ...)")
@click.option("--writes", is_flag=True, help="Only requests that change something")
@click.option("--priority", help="Alerts of this priority or a more severe one (emergency ... debug, Falco's order)")
@click.option("--rule", help="Alerts of this rule (its name as in the rules file)")
@_query_command
def search(
    kind: str | None,
    user: str | None,
    verb: str | None,
    resource: str | None,
    namespace: str | None,
    name: str | None,
    code: int | None,
    reason: str | None,
    writes: bool,
    priority: str | None,
    rule: str | None,
) -> Ask:
    """Records matching every filter given, oldest first. Examples: kubetrail search --code 403;
    kubetrail search --kind alert --priority warning"""
    from kubetrail.history import queries
    from kubetrail.history.model import HistoryError
    from kubetrail.history.store import Filters

    try:
        filters = Filters(kind, user, verb, resource, namespace, name, code, reason, writes, priority, rule)
    except HistoryError as exc:
        raise click.BadParameter(str(exc)) from None
    return lambda backend, window: queries.search(backend, filters, **window)


@click.command()
@click.option(
    "--store", type=click.Path(dir_okay=False), help=f"The store file (default: $KUBETRAIL_STORE or {DEFAULT_STORE})"
)
@click.option("--from", "source", help="es://HOST:PORT/INDEX to read Elasticsearch/OpenSearch instead")
@click.option("--listen", default="127.0.0.1", show_default=True, help="Address to serve on")
@click.option("--port", default=2021, show_default=True, help="Port to serve on (0: any free port)")
@click.option("--fallback-port", is_flag=True, help="When --port is taken, serve on any free port instead")
def ui(store: str | None, source: str | None, listen: str, port: int, fallback_port: bool) -> None:
    """Serve the web timeline: search an object or a user, expand records, follow new ones live."""
    from kubetrail.history.model import HistoryError
    from kubetrail.history.ui import serve

    try:
        backend = _backend(store, source)
    except HistoryError as exc:
        click.echo(f"kubetrail: {exc}", err=True)
        sys.exit(1)
    serve(backend, listen, port, fallback=fallback_port)


COMMANDS = (history, who, search, ui)
