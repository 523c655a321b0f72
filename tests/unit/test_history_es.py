"""``history``/``who``/``search --from es://...`` against the real OpenSearch 2.19 and
Elasticsearch 7.10 (tests/servers/search.py): the story is written by kubetrail's own
``opensearch``/``es`` output, then the answers must be the store's, entry for entry."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from kubetrail.cli.main import main
from kubetrail.core.record import Batch, Record
from kubetrail.sinks.es import EsSink
from kubetrail.sinks.opensearch import OpenSearchSink
from kubetrail.sinks.sqlite import SqliteSink
from tests.servers import running
from tests.servers.search import SearchServer
from tests.timing import scaled
from tests.unit.helpers import build
from tests.unit.history_story import SA_CI, SECRET_VALUE, UID_WEB, alerts, story


@pytest.fixture(scope="module", params=["opensearch", "elasticsearch"])
def search(request: pytest.FixtureRequest) -> Iterator[SearchServer]:
    with running(lambda: SearchServer(request.param), f"no real {request.param}") as server:
        yield server


def write(sink: Any, records: list[Record]) -> None:
    async def run() -> None:
        await sink.start()
        try:
            await sink.write(Batch("t", records))
        finally:
            await sink.close()

    asyncio.run(run())


@pytest.fixture(scope="module")
def sources(search: SearchServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The story in an index (refreshed) and in a store."""
    host, port = search.url.removeprefix("http://").rsplit(":", 1)
    cls = OpenSearchSink if search.kind == "opensearch" else EsSink
    patient = {"net.io_timeout": f"{scaled(60):.0f}s"}  # a loaded machine: see tests/timing.py
    write(build(cls, host=host, port=port, index="trail", **patient), story())
    # The detect filter's alerts (Falco's rules) in an index of their own, as they must be: their
    # "source" is a string, an Event's an object; one index cannot map both.
    fired = alerts(story())
    write(build(cls, host=host, port=port, index="trail-alerts", **patient), fired)
    import urllib.request

    for index in ("trail", "trail-alerts"):
        urllib.request.urlopen(
            urllib.request.Request(f"{search.url}/{index}/_refresh", method="POST"), timeout=scaled(60)
        ).read()
    store = tmp_path_factory.mktemp("es-store") / "s.db"
    write(build(SqliteSink, path=str(store)), story() + fired)
    return f"es://{host}:{port}/trail,trail-alerts", store


def run(*args: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return [orjson.loads(line) for line in result.stdout.splitlines()]


def comparable(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Everything but the position (a row id in the store, a document _id in the index) and the
    time key the es output adds to each document."""
    out = []
    for entry in entries:
        record = {k: v for k, v in entry["record"].items() if k != "@timestamp"}
        same = {k: v for k, v in entry.items() if k not in ("id", "trigger_id")}
        if "trigger" in entry:
            same["trigger"] = {k: v for k, v in entry["trigger"].items() if k != "id"}
        out.append({**same, "record": record})
    return out


def test_alerts_follow_their_records_from_the_index(sources: tuple[str, Path]) -> None:
    url, _ = sources
    got = run("history", "deploy/shop/web", "--from", url)
    refused = next(i for i, e in enumerate(got) if e["kind"] == "audit" and e["user"] == "mallory")
    assert [(e["kind"], e["rule"], e["trigger_id"]) for e in got[refused + 1 : refused + 3]] == [
        ("alert", "Disallowed K8s User", got[refused]["id"]),
        ("alert", "K8s Request Forbidden", got[refused]["id"]),
    ]
    severe = run("search", "--priority", "error", "--from", url)
    assert [(e["rule"], e["trigger"]["verb"], e["trigger"]["name"]) for e in severe] == [
        ("K8s Secret Get Successfully", "get", "db")
    ]


@pytest.mark.parametrize(
    "args",
    [
        ("history", "deploy/shop/web"),
        ("history", "deploy/shop/web", "--logs"),
        ("history", "pods/shop/web-6d4b8-x7k2p", "--logs"),
        ("history", UID_WEB),
        ("history", "deploy/web", "--since", "2025-12-05T02:00:15Z"),
        ("who", "alice"),
        ("who", "alice", "--writes"),
        ("who", SA_CI),
        ("search", "--code", "403"),
        ("search", "--kind", "event", "--reason", "ScalingReplicaSet"),
        ("search", "--resource", "deploy", "--namespace", "shop"),
        ("history", "deploy/web"),
        ("who", "mallory"),
        ("search", "--kind", "alert"),
        ("search", "--kind", "alert", "--priority", "warning", "--namespace", "shop"),
        ("search", "--rule", "Disallowed K8s User", "--user", "alice"),
        ("search", "--priority", "error"),
        ("search", "--writes", "--user", "bob"),
    ],
)
def test_the_same_answers_as_the_store(sources: tuple[str, Path], args: tuple[str, ...]) -> None:
    url, store = sources
    from_es = run(*args, "--from", url)
    from_store = run(*args, "--store", str(store))
    assert from_es, "no entries"
    assert comparable(from_es) == comparable(from_store)
    assert SECRET_VALUE not in orjson.dumps(from_es).decode()


def test_bad_input_against_an_index(sources: tuple[str, Path], search: SearchServer) -> None:
    url, _ = sources
    base = url.rsplit("/", 1)[0]
    runner = CliRunner()
    result = runner.invoke(main, ["history", "deploy/shop/webb", "--from", url])
    assert result.exit_code == 1 and "deployments with records: web" in result.stderr
    result = runner.invoke(main, ["history", "deploy/shop/web", "--from", base + "/nothing-here"])
    assert result.exit_code == 1 and "no index 'nothing-here'" in result.stderr
    # An index kubetrail did not write: say which fields are missing.
    host, port = search.url.removeprefix("http://").rsplit(":", 1)
    cls = OpenSearchSink if search.kind == "opensearch" else EsSink
    patient = {"net.io_timeout": f"{scaled(60):.0f}s"}  # creates an index: see sources()
    write(build(cls, host=host, port=port, index="plain", **patient), [Record("t", 10**18, {"message": "hello"})])
    result = runner.invoke(main, ["history", "deploy/shop/web", "--from", base + "/plain"])
    assert result.exit_code == 1
    assert "has none of kubetrail's object fields (missing: objectRef.resource, objectRef.name" in result.stderr
    result = runner.invoke(main, ["who", "alice", "--from", base + "/plain"])
    assert result.exit_code == 1 and "missing: user.username" in result.stderr
    result = runner.invoke(main, ["who", "alice", "--from", "es://127.0.0.1:1/x"])
    assert result.exit_code == 1 and "cannot reach http://127.0.0.1:1" in result.stderr


def test_an_error_500_for_a_missing_index_still_says_no_index() -> None:
    """OpenSearch 2.19 under load has answered 500 ("Unclosed object or array found") to
    GET <missing>/_mapping, and to HEAD <missing>, in full CI runs; _resolve/index answers 200
    with empty lists. A server answering exactly that must still give 'no index'."""
    import http.server
    import threading

    class Broken(http.server.BaseHTTPRequestHandler):
        def answer(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.startswith("/_resolve/index/"):
                self.answer(200, b'{"indices":[],"aliases":[],"data_streams":[]}')
            else:
                self.answer(500, b'{"error":{"reason":"Unclosed object or array found"},"status":500}')

        def do_HEAD(self) -> None:
            self.answer(500, b"")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"es://127.0.0.1:{server.server_address[1]}/nothing-here"
        result = CliRunner().invoke(main, ["history", "deploy/shop/web", "--from", url])
        assert result.exit_code == 1 and "no index 'nothing-here'" in result.stderr, result.stderr
    finally:
        server.shutdown()
