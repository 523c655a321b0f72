"""List + watch one collection and keep a store current: the informer pattern, small.

Used by the ``kubernetes`` filter for its pod and namespace metadata. The cost to the API server
is a constant: one paged LIST at start (and again only after 410 Gone), then one long-running
WATCH resumed from the last resourceVersion seen (bookmarks included) when it times out or the
connection drops. Nothing is ever fetched per object.

The store sees ``begin_list()``, one ``apply("LISTED", obj)`` per listed object,
``end_list()`` (anything not listed since ``begin_list`` is gone), then ``apply`` with the watch
types ``ADDED``, ``MODIFIED`` and ``DELETED``. Objects are handed over one at a time, so a
store can keep only the fields it needs and a big list never sits in memory as a whole.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator
from typing import Any, Protocol, cast

import aiohttp

from kubetrail.kube.backoff import Backoff
from kubetrail.kube.client import ApiError, KubeClient
from kubetrail.kube.credentials import CredentialError

EMPTY_CLOSE_SECONDS = 1.0


class Store(Protocol):
    def begin_list(self) -> None: ...

    def apply(self, kind: str, obj: dict[str, Any]) -> None: ...

    def end_list(self) -> None: ...


class _Gone(Exception):
    pass


class Informer:
    def __init__(
        self,
        client: KubeClient,
        path: str,
        store: Store,
        logger: logging.Logger,
        params: dict[str, str] | None = None,
        page_size: int = 500,
        watch_timeout: float = 600.0,
    ) -> None:
        self.client = client
        self.path = path
        self.store = store
        self.log = logger
        self.params = dict(params or {})
        self.page_size = page_size
        self.watch_timeout = max(10.0, watch_timeout)
        self.synced = asyncio.Event()  # set once the first list is in the store
        self.resource_version: str | None = None
        self.lists = 0
        self.watches = 0
        self.errors = 0

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(initial=0.5, maximum=30.0)
        while not stop.is_set():
            try:
                if self.resource_version is None:
                    await self._list()
                quick = await self._watch(stop)
                if not quick:
                    backoff.reset()
                    continue
                # A watch that ends at once with nothing in it: do not spin on the API server.
            except _Gone:
                self.log.info("watch history gone; listing again", extra={"path": self.path})
                self.resource_version = None
                continue
            except ApiError as exc:
                self.errors += 1
                if exc.status == 410:
                    self.resource_version = None
                    continue
                level = logging.ERROR if exc.status in (401, 403) else logging.WARNING
                self.log.log(level, "API error", extra={"path": self.path, "status": exc.status, "error": exc.message})
            except CredentialError as exc:
                self.errors += 1
                self.log.error(str(exc))
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.errors += 1
                self.log.warning(
                    "API server unreachable", extra={"path": self.path, "error": str(exc) or type(exc).__name__}
                )
            try:
                await asyncio.wait_for(stop.wait(), backoff.next())
            except TimeoutError:
                pass

    async def _list(self) -> None:
        self.lists += 1
        self.store.begin_list()
        list_rv = ""
        async for page in self.client.list_pages(self.path, self.params, self.page_size):
            list_rv = (page.get("metadata") or {}).get("resourceVersion") or list_rv
            for item in page.get("items") or []:
                if isinstance(item, dict):
                    self.store.apply("LISTED", item)
        if not list_rv:
            raise ApiError(200, "NotKubernetes", f"list of {self.path} without metadata.resourceVersion")
        self.store.end_list()
        self.resource_version = list_rv
        self.synced.set()

    async def _watch(self, stop: asyncio.Event) -> bool:
        """Watch until the server ends the stream; ``True`` if it ended at once, empty."""
        assert self.resource_version is not None
        self.watches += 1
        params = {**self.params, "resourceVersion": self.resource_version, "allowWatchBookmarks": "true"}
        timeout = int(self.watch_timeout * random.uniform(0.5, 1.0))
        started = time.monotonic()
        seen = False
        stream = cast(AsyncGenerator[dict[str, Any], None], self.client.watch(self.path, params, timeout))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while True:
                step = asyncio.ensure_future(anext(stream))
                done, _ = await asyncio.wait((step, stopper), return_when=asyncio.FIRST_COMPLETED)
                if step not in done:
                    step.cancel()
                    await asyncio.gather(step, return_exceptions=True)
                    return False
                try:
                    event = step.result()
                except StopAsyncIteration:
                    break
                seen = True
                self._take(event)
        finally:
            stopper.cancel()
            await stream.aclose()
        return not seen and time.monotonic() - started < EMPTY_CLOSE_SECONDS

    def _take(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event["object"]
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Gone()
            raise ApiError(int(code or 500), str(obj.get("reason") or ""), str(obj.get("message") or ""))
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self.store.apply(kind, obj)
        if rv:
            self.resource_version = rv
