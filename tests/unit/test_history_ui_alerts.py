"""Alerts on the web timeline, in the real headless Chromium (Debian's ``chromium``) against a real
``kubetrail ui`` process: colours by priority, the rule and its output indented under the request
that fired them, the whole alert JSON on expanding, the link to the triggering request (in the
same timeline, and from a search to the object's history with that request marked), and **live
follow in the browser**: records and alerts written into the store while the page is open appear
in place (an alert under its request, whichever of the two was written first). The browser is
driven over the DevTools protocol (aiohttp's websocket client) so the test can write between
looking. Screenshots are kept in ``build/test-artifacts/ui/`` (or ``$KUBETRAIL_ARTIFACTS/ui``).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from kubetrail.core.record import Record
from tests.timing import scaled
from tests.unit.history_helpers import fill, ui_server
from tests.unit.history_story import SA_CI, SECRET_VALUE, alerts, audit, deployment, story
from tests.unit.test_history_ui import ARTIFACTS, chromium

# Every row of the timeline as the page shows it: kind, classes, badge, rule, text, link.
ROWS = """JSON.stringify([...document.querySelectorAll('#timeline li.entry')].map(li => ({
  id: li.dataset.id, kind: li.dataset.kind, cls: li.className, audit: li.dataset.auditId || null,
  badge: li.querySelector('.badge').textContent, rule: li.querySelector('.rule')?.textContent || null,
  text: li.querySelector('.summary').textContent, link: li.querySelector('a.trigger')?.getAttribute('href') || null,
  open: li.classList.contains('open'), highlight: li.classList.contains('highlight'),
  left: li.getBoundingClientRect().left, color: getComputedStyle(li).borderLeftColor,
  json: li.classList.contains('open') ? li.querySelector('pre.record').textContent : null,
})))"""


@pytest.fixture
def ui(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A store with the story and its alerts, the alerts committed first; the UI on it."""
    store = tmp_path / "s.db"
    records = story()
    fill(store, alerts(records), records)
    with ui_server(store) as url:
        yield url, store


# What DevTools answers when the document an evaluation ran in went away mid-call (a click that
# navigates, a poll landing between two documents): the page is fine, the question is to be asked
# again of the next document.
NAVIGATED = ("Inspected target navigated or closed", "Execution context was destroyed", "Cannot find context")


class Navigated(Exception):
    """The page's document changed while a call was answered."""


class Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.ids = itertools.count(1)

    async def __aenter__(self) -> Browser:
        self.proc = await asyncio.create_subprocess_exec(
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={self.tmp_path / 'profile'}",
            "--window-size=1280,900",
            "about:blank",
            stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
        )
        assert self.proc.stderr is not None
        port = None
        while port is None:
            line = (await asyncio.wait_for(self.proc.stderr.readline(), 60)).decode()
            assert line, "chromium exited before listening"
            found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            port = int(found.group(1)) if found else None
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as response:
            pages = [t for t in await response.json() if t["type"] == "page"]
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self.session.close()
        self.proc.terminate()
        await self.proc.wait()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            message = orjson.loads((await asyncio.wait_for(self.ws.receive(), 60)).data)
            if message.get("id") == ident:
                error = message.get("error", {}).get("message", "")
                if any(text in error for text in NAVIGATED):
                    raise Navigated(error)
                assert "error" not in message, message
                return message["result"]  # type: ignore[no-any-return]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def open(self, url: str) -> list[dict[str, Any]]:
        await self.evaluate("window.leaving = true")  # the next document has no such mark
        await self.call("Page.navigate", url=url)
        return await self.loaded()

    async def follow(self, selector: str) -> list[dict[str, Any]]:
        """Click the link at ``selector`` and wait for the document it leads to."""
        await self.evaluate("window.leaving = true")
        try:
            await self.evaluate(f"document.querySelector({orjson.dumps(selector).decode()}).click()")
        except Navigated:
            pass  # the click's navigation won the race with its own answer
        return await self.loaded()

    async def loaded(self) -> list[dict[str, Any]]:
        await self.until("!window.leaving && document.body && document.body.dataset.loaded === '1'")
        return await self.rows()

    async def rows(self) -> list[dict[str, Any]]:
        return orjson.loads(await self.evaluate(ROWS))  # type: ignore[no-any-return]

    async def until(self, expression: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.evaluate(expression):
                    return
            except Navigated:
                pass  # asked between two documents: ask the next one
            assert time.monotonic() < deadline, f"never true: {expression}"
            await asyncio.sleep(0.2)

    async def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        data = base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"])
        assert len(data) > 10_000, "an empty screenshot"
        (ARTIFACTS / name).write_bytes(data)


def browse(tmp_path: Path, steps: Any) -> Any:
    async def run() -> Any:
        async with Browser(tmp_path) as browser:
            return await steps(browser)

    return asyncio.run(run())


def test_alerts_beside_their_requests(ui: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = ui

    async def steps(browser: Browser) -> None:
        rows = await browser.open(url + "?q=deploy/shop/web&open=1")
        await browser.screenshot("ui-alerts-history.png")
        assert [(r["kind"], r["rule"]) for r in rows if r["kind"] in ("audit", "alert")] == [
            ("audit", None),
            ("alert", "Disallowed K8s User"),
            ("alert", "K8s Deployment Created"),
            ("audit", None),
            ("alert", "Disallowed K8s User"),
            ("audit", None),
            ("alert", "Disallowed K8s User"),
            ("audit", None),
            ("alert", "Disallowed K8s User"),
            ("audit", None),
            ("alert", "Disallowed K8s User"),
            ("alert", "K8s Request Forbidden"),
        ]
        create, warning, info = rows[:3]
        # Under their request (indented), coloured by priority, badge = priority, rule, output.
        assert warning["left"] > create["left"] and info["left"] == warning["left"]
        assert "p-warning" in warning["cls"] and "p-info" in info["cls"] and warning["color"] != info["color"]
        assert (warning["badge"], info["badge"]) == ("Warning", "Informational")
        assert warning["text"].startswith("K8s Operation performed by user not in allowed list of users (user=alice")
        # Expanded (?open=1): the whole alert as JSON.
        alert = orjson.loads(warning["json"])
        assert alert["rule"] == "Disallowed K8s User" and alert["k8s.audit.id"] == "a-create"
        assert alert["output_fields"]["ka.verb"] == "create" and alert["source"] == "k8s_audit"
        # The link marks the request that fired it.
        assert warning["link"] == f"#entry-{create['id']}"
        await browser.evaluate(f"document.querySelector('#entry-{warning['id']} a.trigger').click()")
        marked = [r for r in await browser.rows() if r["highlight"]]
        assert [r["id"] for r in marked] == [create["id"]]
        assert SECRET_VALUE not in await browser.evaluate("document.body.innerHTML")

    browse(tmp_path, steps)


def test_a_search_for_alerts_links_to_the_request(ui: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = ui

    async def steps(browser: Browser) -> None:
        rows = await browser.open(url + '?q=kind:alert priority:error rule:"K8s Secret Get Successfully"')
        await browser.screenshot("ui-alerts-search.png")
        assert [(r["kind"], r["rule"], r["badge"]) for r in rows] == [("alert", "K8s Secret Get Successfully", "Error")]
        assert "p-error" in rows[0]["cls"] and "loose" in rows[0]["cls"]  # not beside its request here
        assert rows[0]["link"] == "?q=secrets%2Fshop%2Fdb&audit=a-secret"
        text = await browser.evaluate("document.querySelector('a.trigger').textContent")
        assert text.startswith(f"fired by get secrets/shop/db by {SA_CI}")
        await browser.follow("a.trigger")
        assert await browser.evaluate("location.search.includes('audit=a-secret')")
        await browser.until("document.querySelector('li.highlight') !== null")
        rows = await browser.rows()
        assert [(r["kind"], r["highlight"], r["audit"]) for r in rows] == [
            ("audit", True, "a-secret"),
            ("alert", False, "a-secret"),
        ]
        await browser.screenshot("ui-alerts-trigger.png")
        rows = await browser.open(url + "?q=kind:alert priority:loud")
        status = await browser.evaluate("document.getElementById('status').textContent")
        assert rows == [] and "unknown priority 'loud'" in status

    browse(tmp_path, steps)


def test_live_follow_puts_new_alerts_under_their_requests(ui: tuple[str, Path], tmp_path: Path) -> None:
    url, store = ui
    later = audit(100, "a-later", "update", "dave", "deployments", "web", response=deployment(5, "nginx:1.28", "103"))
    sneaky = audit(110, "a-sneaky", "delete", "eve", "deployments", "web", code=403, decision="forbid")
    fired_later = alerts([later])
    fired_sneaky = alerts([sneaky])
    assert [a.body["rule"] for a in fired_sneaky] == ["Disallowed K8s User", "K8s Request Forbidden"]

    async def steps(browser: Browser) -> None:
        before = await browser.open(url + "?q=deploy/shop/web&live=1")
        assert len(before) == 16
        # A request, then (another commit) its alert; then two alerts before their request.
        await asyncio.to_thread(fill, store, [later])
        await browser.until(f"document.querySelectorAll('#timeline li.entry').length === {len(before) + 1}")
        await asyncio.to_thread(fill, store, fired_later)
        await asyncio.to_thread(fill, store, fired_sneaky)
        # Of eve's two alerts, the one whose output names the object (with its namespace) shows
        # at once, at the end (its request is not there yet); the other comes with its request.
        await browser.until(f"document.querySelectorAll('#timeline li.entry').length === {len(before) + 3}")
        waiting = (await browser.rows())[-1]
        assert (waiting["rule"], waiting["audit"]) == ("K8s Request Forbidden", "a-sneaky")
        assert "loose" in waiting["cls"]
        await asyncio.to_thread(fill, store, [sneaky])
        await browser.until(f"document.querySelectorAll('#timeline li.entry').length === {len(before) + 5}")
        rows = await browser.rows()
        await browser.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        await browser.screenshot("ui-alerts-live.png")
        new = rows[len(before) :]
        assert [(r["kind"], r["audit"], r["rule"]) for r in new] == [
            ("audit", "a-later", None),
            ("alert", "a-later", "Disallowed K8s User"),
            ("audit", "a-sneaky", None),
            ("alert", "a-sneaky", "Disallowed K8s User"),
            ("alert", "a-sneaky", "K8s Request Forbidden"),
        ]
        assert all("new" in r["cls"] for r in new)
        assert all("loose" not in r["cls"] and r["left"] > new[0]["left"] for r in new if r["kind"] == "alert")

    browse(tmp_path, steps)


def test_follow_answers_alerts_fired_by_the_objects_requests(ui: tuple[str, Path]) -> None:
    """An alert whose rule prints nothing about the object (a user's own rule) still belongs to
    the object's timeline through its request: the follow API finds it by auditID."""
    import urllib.request

    url, store = ui
    first = orjson.loads(urllib.request.urlopen(url + "api/history?q=deploy/shop/web", timeout=scaled(10)).read())
    quiet = Record(
        "kube.alert",
        first["entries"][0]["time_ns"],
        {
            "time": "2025-12-05T02:00:00.000000000Z",
            "rule": "Quiet Rule",
            "priority": "Notice",
            "source": "k8s_audit",
            "tags": [],
            "output": "02:00:00.000000000: Notice something happened",
            "output_fields": {},
            "hostname": "vm",
            "k8s.audit.id": "a-create",
            "k8s.audit.stage": "ResponseComplete",
        },
        identity=("a-create", "ResponseComplete", "detect", "Quiet Rule"),
    )
    fill(store, [quiet])

    def follow(target: str) -> list[dict[str, Any]]:
        answer = urllib.request.urlopen(
            url + f"api/follow?q={target}&after={first['last_id']}", timeout=scaled(10)
        ).read()
        return orjson.loads(answer)["entries"]  # type: ignore[no-any-return]

    assert [(e["kind"], e["rule"], e["audit_id"]) for e in follow("deploy/shop/web")] == [
        ("alert", "Quiet Rule", "a-create")
    ]
    assert follow("deploy/shop/other") == []
