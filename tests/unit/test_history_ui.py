"""``kubetrail ui`` as a real process, looked at by a real headless Chromium (Debian's
``chromium``, installed by scripts/setup): the page loads offline, a search shows the expected
timeline, a bad search says why; screenshots of the page are kept as test artefacts in
``build/test-artifacts/ui/`` (or ``$KUBETRAIL_ARTIFACTS/ui``). Live follow is checked on the API
the page polls, with records written into the store while the UI runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import orjson
import pytest

from tests import required
from tests.timing import scaled
from tests.unit.history_helpers import fill, ui_server
from tests.unit.history_story import SECRET_VALUE, audit, deployment, event, story

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("KUBETRAIL_ARTIFACTS", REPO / "build" / "test-artifacts")) / "ui"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    required.unavailable("no chromium (scripts/setup installs Debian's chromium)")


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    store = tmp_path_factory.mktemp("ui") / "s.db"
    fill(store, story())
    with ui_server(store) as url:
        yield url, store


def browse(url: str, tmp_path: Path, screenshot: str | None = None) -> str:
    """The DOM after the page's scripts ran (and a screenshot, when named)."""
    base = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,900",
        "--virtual-time-budget=8000",  # lets the page's fetch() answers arrive before the dump
    ]
    if screenshot:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        target = ARTIFACTS / screenshot
        target.unlink(missing_ok=True)
        subprocess.run([*base, f"--screenshot={target}", url], capture_output=True, timeout=120, check=True)
        assert target.stat().st_size > 10_000, "an empty screenshot"
    done = subprocess.run([*base, "--dump-dom", url], capture_output=True, timeout=120, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Timeline(HTMLParser):
    """The rows of the rendered timeline: (data-kind, classes, text) and the status line."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.status = ""
        self._in: str | None = None
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "li" and "entry" in (a.get("class") or ""):
            self.rows.append(
                {"kind": a.get("data-kind") or "", "class": a.get("class") or "", "text": "", "changes": ""}
            )
        elif tag == "div" and a.get("id") == "status":
            self._in = "status"
        elif self.rows and tag == "ul" and a.get("class") == "changes":
            self._in = "changes"
        elif self.rows and tag == "span" and a.get("class") == "summary":
            self._in = "summary"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("div", "ul", "span"):
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "status":
            self.status += data
        elif self._in == "summary":
            self.rows[-1]["text"] += data
        elif self._in == "changes":
            self.rows[-1]["changes"] += data + "\n"


def parse(dom: str) -> Timeline:
    parser = Timeline()
    parser.feed(dom)
    return parser


def test_the_page_loads_offline(ui: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = ui
    page = urllib.request.urlopen(url, timeout=scaled(10)).read().decode()
    # Nothing from elsewhere: no src/href to another host, no CDN.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    dom = browse(url, tmp_path, "ui-start.png")
    assert 'id="q"' in dom
    assert "Search an object (KIND/NAMESPACE/NAME), a uid, or a user" in parse(dom).status


def test_a_search_shows_the_timeline(ui: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = ui
    dom = browse(url + "?q=deploy/shop/web&logs=1&open=7", tmp_path, "ui-history.png")
    page = parse(dom)
    assert page.status.startswith("deployments/shop/web: 11 entries, oldest first"), page.status
    assert [row["kind"] for row in page.rows] == [
        "audit", "event", "log", "audit", "event", "audit", "audit", "log", "event", "audit", "event",
    ]  # fmt: skip
    patch = page.rows[6]
    assert patch["text"].startswith("patch deployments/shop/web by bob")
    assert "~ /spec/template/spec/containers/0/image: nginx:1.27 \u2192 nginx:1.28" in patch["changes"]
    assert "Warning" in page.rows[8]["class"] and "BackOff" in page.rows[8]["text"]
    forbidden = page.rows[9]
    assert "failed" in forbidden["class"] and "403" in forbidden["text"]
    assert "Warning" not in page.rows[1]["class"] and "event" in page.rows[1]["class"]
    assert 'class="entry log open"' in dom  # ?open=7: the 8th row expanded to its full record
    assert SECRET_VALUE not in dom


def test_a_user_and_a_bad_search(ui: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = ui
    page = parse(browse(url + "?q=user:system:serviceaccount:ci:default", tmp_path))
    assert [row["text"].split(" by ")[0] for row in page.rows] == ["get secrets/shop/db"]
    page = parse(browse(url + "?q=deploy/shop/webb", tmp_path))
    assert page.rows == []
    assert "no records about deployments/shop/webb; deployments with records: shop/web" in page.status


def test_live_follow_returns_what_was_written_since(ui: tuple[str, Path]) -> None:
    url, store = ui
    first = orjson.loads(urllib.request.urlopen(url + "api/history?q=deploy/shop/web", timeout=scaled(10)).read())
    last_id = first["last_id"]
    fill(
        store,
        [
            audit(100, "a-later", "update", "dave", "deployments", "web", response=deployment(5, "nginx:1.28", "103")),
            event(101, "e1000000-0000-4000-8000-000000000009", "600", "Deployment", "other", "X", "not ours"),
        ],
    )
    answer = orjson.loads(
        urllib.request.urlopen(url + f"api/follow?q=deploy/shop/web&after={last_id}", timeout=scaled(10)).read()
    )
    assert [(e["verb"], e["user"]) for e in answer["entries"]] == [("update", "dave")]
    assert answer["last_id"] == last_id + 2
    again = orjson.loads(urllib.request.urlopen(url + f"api/follow?q=deploy/shop/web&after={answer['last_id']}").read())
    assert again["entries"] == []


def test_the_recorded_example_in_the_browser(tmp_path: Path) -> None:
    """The recorded dataset (examples/history), as scripts/run shows it: a screenshot of real data."""
    store = tmp_path / "example.db"
    env = {**os.environ, "KUBETRAIL_EXAMPLES": str(REPO / "examples"), "KUBETRAIL_STORE": str(store)}
    done = subprocess.run(
        [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(REPO / "examples" / "history" / "ingest.conf")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    with ui_server(store) as url:
        page = parse(browse(url + "?q=deploy/shop/web", tmp_path, "ui-example.png"))
        texts = [row["text"] for row in page.rows]
        assert any(t.startswith("create deployments/shop/web by admin") for t in texts)
        warnings = [row for row in page.rows if "Warning" in row["class"]]
        assert warnings and all("ErrImageNeverPull" in row["text"] or "Failed" in row["text"] for row in warnings)
        assert any("localhost/busybox:latest \u2192 localhost/busybox:1.37" in row["changes"] for row in page.rows)
        assert "failed" in page.rows[-1]["class"] or any("norbac" in t and "403" in t for t in texts)
        # The alerts Falco's rules raised at ingest, each right after the request that fired it.
        create = next(i for i, t in enumerate(texts) if t.startswith("create deployments/shop/web by admin"))
        assert page.rows[create + 1]["kind"] == "alert" and "p-info" in page.rows[create + 1]["class"]
        assert page.rows[create + 1]["text"].startswith("K8s Deployment Created (user=admin deployment=web")
        refused = next(i for i, t in enumerate(texts) if "by norbac" in t)
        assert [row["kind"] for row in page.rows[refused + 1 : refused + 3]] == ["alert", "alert"]
        assert all("p-warning" in row["class"] for row in page.rows[refused + 1 : refused + 3])
