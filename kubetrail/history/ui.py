"""``kubetrail ui``: the web timeline, served by aiohttp from one static page.

No build step and nothing from a CDN: the page (``ui/index.html``, plain HTML, CSS and
JavaScript) ships in the package and talks to a small JSON API on the same server, so it works
offline. The API returns exactly the entries ``kubetrail history --json`` prints:

* ``GET /api/history?q=KIND/NS/NAME|UID[&logs=1&since=&until=]``
* ``GET /api/who?user=USER[&writes=1...]``
* ``GET /api/search?code=403&verb=...`` (``kind=alert&priority=warning&rule=...`` for alerts)
* ``GET /api/follow?after=ID&q=...|user=...``: records added to the store since ``ID`` that
  belong to the query (live follow; the page polls every 2 s), alerts included: those naming
  the object or user, and those fired by a request about it (looked up by auditID, whether the
  request is new or was shown already). The store only: Elasticsearch has no insertion order
  to follow, so there the answer says so.

**Alerts** on the page: a colour per Falco priority (a purple-to-pink scale of their own), the
rule and its output, indented under the request that fired them (a link marks that row); an
alert shown away from its request (a search) links to its object's history with that request
marked (``?q=...&audit=AUDITID``). Expanding one shows the whole alert JSON.

Backend calls are blocking (sqlite3, urllib): they run in a worker thread, one at a time (a
lock), so the event loop keeps serving the page.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from kubetrail.history import queries
from kubetrail.history.model import HistoryError, ObjectRef, StoredRecord, parse_time, summary, timeline
from kubetrail.history.store import Filters, StoreBackend

PAGE = Path(__file__).with_name("ui") / "index.html"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _with_summaries(result: queries.Result) -> dict[str, Any]:
    entries = [{**entry, "summary": summary(entry)} for entry in result.entries]
    return {"title": result.title, "entries": entries, "truncated": result.truncated}


class TimelineApp:
    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.lock = threading.Lock()

    async def _call(self, func: Any) -> Any:
        def locked() -> Any:
            with self.lock:
                return func()

        return await asyncio.to_thread(locked)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.page)
        app.router.add_get("/api/history", self.history)
        app.router.add_get("/api/who", self.who)
        app.router.add_get("/api/search", self.search)
        app.router.add_get("/api/follow", self.follow)
        return app

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=PAGE.read_bytes(), content_type="text/html", charset="utf-8")

    @staticmethod
    def _times(request: web.Request) -> tuple[int | None, int | None]:
        return parse_time(request.query.get("since")), parse_time(request.query.get("until"))

    async def _answer(self, request: web.Request, run: Any) -> web.Response:
        try:
            since, until = self._times(request)
            result = await self._call(lambda: run(since, until))
        except HistoryError as exc:
            return _json({"error": str(exc)}, 404)
        payload = _with_summaries(result)
        if isinstance(self.backend, StoreBackend):
            payload["last_id"] = await self._call(self.backend.last_id)
        return _json(payload)

    async def history(self, request: web.Request) -> web.Response:
        target = request.query.get("q", "").strip()
        if not target:
            return _json({"error": "give an object: KIND/NAMESPACE/NAME, KIND/NAME or a uid"}, 400)
        logs = request.query.get("logs") in ("1", "true", "on")
        status = request.query.get("status") in ("1", "true", "on")
        return await self._answer(
            request, lambda s, u: queries.history(self.backend, target, since=s, until=u, logs=logs, status=status)
        )

    async def who(self, request: web.Request) -> web.Response:
        user = request.query.get("user", "").strip()
        if not user:
            return _json({"error": "give a user name"}, 400)
        writes = request.query.get("writes") in ("1", "true", "on")
        return await self._answer(
            request, lambda s, u: queries.who(self.backend, user, since=s, until=u, writes_only=writes)
        )

    async def search(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            code = int(q["code"]) if q.get("code") else None
        except ValueError:
            return _json({"error": f"code must be a number, got {q['code']!r}"}, 400)
        try:
            filters = Filters(
                q.get("kind") or None,
                q.get("user") or None,
                q.get("verb") or None,
                q.get("resource") or None,
                q.get("namespace") or None,
                q.get("name") or None,
                code,
                q.get("reason") or None,
                q.get("writes") in ("1", "true", "on"),
                q.get("priority") or None,
                q.get("rule") or None,
            )
        except HistoryError as exc:
            return _json({"error": str(exc)}, 400)
        return await self._answer(request, lambda s, u: queries.search(self.backend, filters, since=s, until=u))

    async def follow(self, request: web.Request) -> web.Response:
        if not isinstance(self.backend, StoreBackend):
            return _json({"entries": [], "last_id": None, "note": "live follow reads the embedded store only"})
        try:
            after = int(request.query.get("after", "0"))
        except ValueError:
            return _json({"error": "after must be a record id"}, 400)
        target = request.query.get("q", "").strip()
        user = request.query.get("user", "").strip()
        backend = self.backend
        ref: ObjectRef | None = None
        if target:
            try:
                ref = await self._call(lambda: queries._ref(backend, target))
            except HistoryError as exc:
                return _json({"error": str(exc)}, 404)
        logs = request.query.get("logs") in ("1", "true", "on")

        def wanted(columns: dict[str, Any]) -> bool:
            if user:
                return bool(columns["user"] == user)
            if ref is None:
                return True
            if columns["kind"] == "log":
                name = columns["name"] or ""
                return logs and (name == ref.name or name.startswith(ref.name + "-"))
            same_ns = ref.namespace is None or columns["namespace"] == ref.namespace
            return bool(columns["name"] == ref.name and columns["resource"] == ref.resource and same_ns)

        def about(record: StoredRecord) -> bool:
            """An audit record (a new alert's trigger) about the followed object or user."""
            body = record.body
            ref_ = body.get("objectRef") or {}
            return wanted(
                {
                    "kind": "audit",
                    "user": (body.get("user") or {}).get("username"),
                    "resource": ref_.get("resource"),
                    "namespace": ref_.get("namespace"),
                    "name": ref_.get("name"),
                }
            )

        def newer() -> tuple[list[StoredRecord], int]:
            rows = backend.newer(after)
            records = [record for record, columns in rows if wanted(columns)]
            # A new alert whose own fields do not name the object: kept if its request does.
            others = [r for r, columns in rows if columns["kind"] == "alert" and not wanted(columns)]
            asked = [(str(r.body.get("k8s.audit.id")), r.time_ns) for r in others]
            if asked:
                about_ids = {t.body.get("auditID") for t in backend.triggers_of(asked) if about(t)}
                records += [r for r in others if r.body.get("k8s.audit.id") in about_ids]
            # A new request's alerts stored before it (shown already or not: the page knows).
            new_ids = [r.body["auditID"] for r in records if r.kind == "audit" and "auditID" in r.body]
            if new_ids:
                have = {r.id for r in records}
                records += [r for r in backend.alerts_for(new_ids) if r.id not in have]
            return records, int(rows[-1][0].id) if rows else after

        records, last = await self._call(newer)
        entries = [{**entry, "summary": summary(entry)} for entry in timeline(records)]
        return _json({"entries": entries, "last_id": last})


async def start(backend: Any, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner (to clean up) and the port bound (``port`` 0: any)."""
    runner = web.AppRunner(TimelineApp(backend).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    addresses = runner.addresses  # (host, port, ...) per listening socket: the port when it was 0
    return runner, int(addresses[0][1]) if addresses else port


def serve(backend: Any, host: str, port: int, *, fallback: bool = False) -> None:
    """Serve until SIGINT/SIGTERM, printing the URL first (``fallback``: any free port when
    ``port`` is taken)."""

    async def main() -> None:
        import signal

        try:
            runner, bound = await start(backend, host, port)
        except OSError as exc:
            if not fallback or port == 0:
                raise SystemExit(f"kubetrail ui: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
            print(f"kubetrail ui: port {port} is taken ({exc.strerror}); using a free one", flush=True)
            runner, bound = await start(backend, host, 0)
        shown = f"[{host}]" if ":" in host else host
        print(f"kubetrail ui: http://{shown}:{bound}/", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        await runner.cleanup()
        backend.close()

    asyncio.run(main())
