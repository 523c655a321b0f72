"""Pure parts of the kubernetes_events input: occurrence time, state, dedupe bookkeeping."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
from aiohttp import web
from prometheus_client import generate_latest

from kubetrail.core.metrics import MetricsRegistry
from kubetrail.core.record import Batch
from kubetrail.core.state import StateDB
from kubetrail.sources.kubernetes_events import occurrence_time_ns
from kubetrail.sources.kubernetes_events_state import EventsState
from tests.unit.fake_api import event, events_source, serve

T = 1_795_867_200_000_000_000  # 2026-11-28T12:00:00Z


def test_occurrence_time_precedence_with_microseconds() -> None:
    base = {"metadata": {"creationTimestamp": "2026-11-28T11:00:00Z"}}
    assert occurrence_time_ns(base) == T - 3600 * 10**9
    assert occurrence_time_ns({**base, "firstTimestamp": "2026-11-28T11:30:00Z"}) == T - 1800 * 10**9
    assert (
        occurrence_time_ns(
            {**base, "eventTime": "2026-11-28T12:00:00.000001Z", "firstTimestamp": "2026-11-28T11:30:00Z"}
        )
        == T + 1000
    )
    assert (
        occurrence_time_ns(
            {**base, "eventTime": "2026-11-28T12:00:00.000001Z", "lastTimestamp": "2026-11-28T12:00:05Z"}
        )
        == T + 5 * 10**9
    )
    assert occurrence_time_ns(
        {
            **base,
            "lastTimestamp": "2026-11-28T12:00:05Z",
            "series": {"count": 3, "lastObservedTime": "2026-11-28T12:00:09.123456Z"},
        }
    ) == (T + 9_123_456_000)
    assert occurrence_time_ns({**base, "deprecatedLastTimestamp": "2026-11-28T12:00:07Z"}) == T + 7 * 10**9
    assert occurrence_time_ns({}) is None


def test_state_survives_a_restart_and_prunes(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "s.db")
    state = EventsState(db, "core/v1|*|", retention=3600)
    state.in_flight.add(("u1", "5"))
    assert state.seen(("u1", "5"))
    state.mark_delivered([("u1", "5")])
    state.set_checkpoint("7")
    state.forget_in_flight([("u2", "6")])
    db.close()
    again = EventsState(StateDB(tmp_path / "s.db"), "core/v1|*|", retention=3600)
    assert again.checkpoint == "7" and again.seen(("u1", "5")) and not again.seen(("u2", "6"))
    other_scope = EventsState(StateDB(tmp_path / "s.db"), "core/v1|ns|", retention=3600)
    assert other_scope.checkpoint is None and not other_scope.seen(("u1", "5"))
    expired = EventsState(StateDB(tmp_path / "s.db"), "core/v1|*|", retention=-1)
    assert not expired.seen(("u1", "5"))  # older than the retention: not loaded


async def test_all_three_gone_forms_relist_without_duplicates(tmp_path: Path) -> None:
    no_uid = event("broken", "3")
    del no_uid["metadata"]["uid"]
    lists = iter(
        [
            ("10", [event("a", "5"), event("b", "6"), no_uid]),
            ("12", [event("a", "5"), event("b", "11"), event("c", "12")]),
            ("13", [event("a", "5"), event("b", "11"), event("c", "12")]),
            ("14", [event("a", "5"), event("b", "11"), event("c", "12"), event("d", "14")]),
        ]
    )
    watches: list[str] = []
    done = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") != "1":
            rv, items = next(lists)
            return web.json_response({"kind": "EventList", "metadata": {"resourceVersion": rv}, "items": items})
        rv = request.query["resourceVersion"]
        watches.append(rv)
        if rv == "12":  # HTTP 410
            status = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
            return web.json_response(status, status=410)
        response = web.StreamResponse()
        await response.prepare(request)
        if rv == "10":  # in-stream ERROR 410, after one real event
            await response.write(orjson.dumps({"type": "MODIFIED", "object": event("b", "11")}) + b"\n")
            await response.write(orjson.dumps({"type": "ERROR", "object": {"kind": "Status", "code": 410}}) + b"\n")
        elif rv == "14":
            await response.write(orjson.dumps({"type": "ADDED", "object": event("e", "15")}) + b"\n")
            bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "16"}}}
            await response.write(orjson.dumps(bookmark) + b"\n")
            await done.wait()
        # rv == "13": a 200 stream that closes at once, empty: the third form
        await response.write_eof()
        return response

    registry = MetricsRegistry()
    emitted: list[tuple[str, str]] = []
    async with serve(handler) as url:
        source = events_source(url, registry, db=str(tmp_path / "e.db"))

        class Emitter:
            async def send(self, batch: Batch) -> None:
                emitted.extend(r.identity for r in batch.records)  # type: ignore[misc]
                if batch.ack is not None:
                    batch.ack.seal()
                if ("uid-e", "15") in emitted:
                    await asyncio.sleep(0.2)  # let the bookmark arrive
                    source.stop()
                    done.set()

        await asyncio.wait_for(source.run(Emitter()), 20)
        await source.close()
    assert emitted == [
        ("uid-a", "5"),
        ("uid-b", "6"),
        ("uid-b", "11"),
        ("uid-c", "12"),
        ("uid-d", "14"),
        ("uid-e", "15"),
    ]
    assert watches == ["10", "12", "13", "14"]
    text = generate_latest(registry.registry).decode()
    for form in ("watch_error", "http", "empty_stream"):
        assert f'form="{form}",kind="source",plugin="kubernetes_events"}} 1.0' in text, form
    assert "kubetrail_k8s_events_invalid_total" in text and 'plugin="kubernetes_events"} 1.0' in text
    assert "kubetrail_k8s_events_bookmarks_total" in text
    state = EventsState(StateDB(tmp_path / "e.db"), "core/v1|*|", 3600)
    assert state.checkpoint == "16"  # the bookmark moved the checkpoint once everything was delivered


async def test_expired_continue_token_restarts_the_list_without_duplicates() -> None:
    calls: list[str] = []
    hang = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") == "1":
            calls.append("watch@" + request.query["resourceVersion"])
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(orjson.dumps({"type": "ADDED", "object": event("z", "31")}) + b"\n")
            await hang.wait()
            return response
        token = request.query.get("continue")
        calls.append(f"list continue={token}")
        if token == "stale":
            body = {
                "kind": "Status",
                "code": 410,
                "reason": "Expired",
                "message": "The provided continue parameter is too old to display a consistent list result.",
            }
            return web.json_response(body, status=410)
        if token is None and calls.count("list continue=None") == 1:
            return web.json_response(
                {
                    "metadata": {"resourceVersion": "20", "continue": "stale"},
                    "items": [event("a", "1"), event("b", "2")],
                }
            )
        return web.json_response(
            {"metadata": {"resourceVersion": "30"}, "items": [event("a", "1"), event("b", "2"), event("c", "29")]}
        )

    emitted: list[tuple[str, str]] = []
    async with serve(handler) as url:
        source = events_source(url, kube_request_limit="2")

        class Emitter:
            async def send(self, batch: Batch) -> None:
                emitted.extend(r.identity for r in batch.records)  # type: ignore[misc]
                if batch.ack is not None:
                    batch.ack.seal()
                if ("uid-z", "31") in emitted:
                    source.stop()
                    hang.set()

        await asyncio.wait_for(source.run(Emitter()), 20)
        await source.close()
    # The fresh list must not repeat what the broken one had, and the watch starts from the
    # *complete* list's resourceVersion.
    assert emitted == [("uid-a", "1"), ("uid-b", "2"), ("uid-c", "29"), ("uid-z", "31")]
    assert calls == ["list continue=None", "list continue=stale", "list continue=None", "watch@30"]
