"""The Kubernetes client against a local HTTP server that misbehaves on purpose."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from kubetrail.core.metrics import MetricsRegistry
from kubetrail.kube.client import ApiError, KubeClient
from kubetrail.kube.config import ConnectionConfig, KubeConfigError
from kubetrail.kube.credentials import CredentialError, TLSContextSource, TokenSource
from tests.unit.fake_api import serve
from tests.unit.test_secrets import secret_volume
from tests.unit.test_tls_reload import Pki, after_check_interval, data_file, pem, touch_changed


def event(kind: str, name: str, rv: str) -> bytes:
    obj = {"metadata": {"name": name, "uid": f"u-{name}", "resourceVersion": rv}}
    return orjson.dumps({"type": kind, "object": obj}) + b"\n"


@pytest.fixture
async def stream_server() -> AsyncIterator[tuple[str, list[bytes]]]:
    chunks: list[bytes] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    async with serve(handler) as url:
        yield url, chunks


def client(url: str, token_file: str | None = None, **kwargs: object) -> KubeClient:
    return KubeClient(ConnectionConfig(url=url, ca_file=None, token_file=token_file), logging.getLogger("t"), **kwargs)  # type: ignore[arg-type]


async def test_watch_lines_split_across_chunks_and_bad_lines_skipped(stream_server: tuple[str, list[bytes]]) -> None:
    url, chunks = stream_server
    whole = event("ADDED", "a", "1") + b"{this is not json}\n" + b"<html>oops</html>\n" + event("MODIFIED", "a", "2")
    whole += b'{"type":"ADDED"}\n' + event("ADDED", "b", "3")
    chunks.extend(whole[i : i + 7] for i in range(0, len(whole), 7))  # boundaries everywhere
    bad: list[str] = []
    kube = client(url, on_bad_line=bad.append)
    got = [e async for e in kube.watch("/api/v1/events", {}, 5)]
    await kube.close()
    assert [(e["type"], e["object"]["metadata"]["resourceVersion"]) for e in got] == [
        ("ADDED", "1"),
        ("MODIFIED", "2"),
        ("ADDED", "3"),
    ]
    assert len(bad) == 3


async def test_overlong_line_is_skipped_without_stalling(stream_server: tuple[str, list[bytes]]) -> None:
    url, chunks = stream_server
    chunks.extend(
        [event("ADDED", "a", "1"), b'{"type":"ADDED","object":{"x":"' + b"y" * 5000, b'"}}\n', event("ADDED", "b", "2")]
    )
    bad: list[str] = []
    kube = client(url, max_line=1024, on_bad_line=bad.append)
    got = [e["object"]["metadata"]["name"] async for e in kube.watch("/x", {}, 5)]
    await kube.close()
    assert got == ["a", "b"] and any("longer than 1024" in m for m in bad)


async def test_html_and_garbage_answers_become_clear_errors() -> None:
    async def handler(request: web.Request) -> web.Response:
        if request.path == "/html":
            return web.Response(status=502, text="<html><body>Bad Gateway</body></html>", content_type="text/html")
        if request.path == "/garbage":
            return web.Response(status=200, body=b"\x00\x01 not json")
        if request.path == "/status":
            body = {"kind": "Status", "code": 403, "reason": "Forbidden", "message": "events is forbidden"}
            return web.json_response(body, status=403)
        return web.json_response([1, 2])

    async with serve(handler) as url:
        kube = client(url)
        try:
            with pytest.raises(ApiError, match=r"502 NotKubernetes.*Bad Gateway"):
                await kube.request("GET", "/html")
            with pytest.raises(ApiError, match="200 NotKubernetes"):
                await kube.request("GET", "/garbage")
            with pytest.raises(ApiError, match="403 Forbidden: events is forbidden") as info:
                await kube.request("GET", "/status")
            assert info.value.status == 403
            with pytest.raises(ApiError, match="not a JSON object"):
                await kube.request("GET", "/array")
        finally:
            await kube.close()


async def test_401_rereads_the_token_file_once(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("old\n")
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != "Bearer new":
            return web.json_response({"kind": "Status", "code": 401, "reason": "Unauthorized"}, status=401)
        return web.json_response({"kind": "EventList", "items": []})

    async with serve(handler) as url:
        kube = client(url, token_file=str(token))
        try:
            with pytest.raises(ApiError, match="401"):
                await kube.request("GET", "/api/v1/events")
            assert seen == ["Bearer old", "Bearer old"]
            token.write_text("new\n")  # rotated on disk; the TTL (10 min) has not passed
            assert (await kube.request("GET", "/api/v1/events"))["kind"] == "EventList"
            assert seen[-2:] == ["Bearer old", "Bearer new"]
        finally:
            await kube.close()


def _project(volume: Path, token: str, stamp: str) -> None:
    """Write the token the way the kubelet updates a projected volume: a new timestamped
    directory, then the ``..data`` symlink swapped atomically by a rename."""
    data = volume / stamp
    data.mkdir()
    (data / "token").write_text(token)
    (volume / "..data_tmp").symlink_to(stamp)
    (volume / "..data_tmp").rename(volume / "..data")
    if not (volume / "token").is_symlink():
        (volume / "token").symlink_to("..data/token")


async def test_a_rotated_projected_token_is_used_without_a_401(tmp_path: Path) -> None:
    """The kubelet rotates a projected token at 80% of its lifetime; the old one stays valid
    until it expires. kubetrail must switch on the file's change, not wait for its TTL (10 min
    here) or a 401. The metrics say which reads happened and every answer's status."""
    volume = tmp_path / "serviceaccount"
    volume.mkdir()
    _project(volume, "first", "..2026_12_05_06_00_00.1")
    valid = {"Bearer first"}
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        if seen[-1] not in valid:
            return web.json_response({"kind": "Status", "code": 401, "reason": "Unauthorized"}, status=401)
        return web.json_response({"kind": "PodList", "items": []})

    metrics = MetricsRegistry()
    async with serve(handler) as url:
        kube = client(url, token_file=str(volume / "token"), metrics=metrics.component("k", "filter", "kubernetes"))
        try:
            await kube.request("GET", "/api/v1/pods")
            _project(volume, "second", "..2026_12_05_06_08_00.2")
            valid.add("Bearer second")
            await asyncio.sleep(1.1)  # the file's stamp is checked at most once a second
            await kube.request("GET", "/api/v1/pods")
            await kube.request("GET", "/api/v1/pods")
        finally:
            await kube.close()
    assert seen == ["Bearer first", "Bearer second", "Bearer second"]
    registry = metrics.registry
    labels = {"component": "k", "kind": "filter", "plugin": "kubernetes"}
    assert registry.get_sample_value("kubetrail_kube_responses_total", {**labels, "code": "200"}) == 3
    assert registry.get_sample_value("kubetrail_kube_responses_total", {**labels, "code": "401"}) is None
    reads = {
        r: registry.get_sample_value("kubetrail_kube_token_reads_total", {**labels, "reason": r})
        for r in ("first", "changed", "ttl", "401")
    }
    assert reads == {"first": 1, "changed": 1, "ttl": None, "401": None}


def test_missing_or_empty_token_file(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="cannot read token file"):
        TokenSource(str(tmp_path / "nope"), 60).token()
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(CredentialError, match="is empty"):
        TokenSource(str(tmp_path / "empty"), 60).token()
    assert TokenSource(None, 60).header() == {}  # no token configured: no header


def test_unreadable_ca_and_ca_reload(tmp_path: Path) -> None:
    bad = tmp_path / "ca.crt"
    bad.write_text("not a certificate")
    with pytest.raises(CredentialError, match="cannot load CA"):
        TLSContextSource(str(bad), None, True).context()
    with pytest.raises(CredentialError, match="cannot load CA"):
        TLSContextSource(str(tmp_path / "missing.crt"), None, True).context()


def test_kubeconfig_errors(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text("apiVersion: v1\nkind: Config\ncurrent-context: nope\ncontexts: []\n")
    with pytest.raises(KubeConfigError, match="context 'nope' not found"):
        ConnectionConfig.from_kubeconfig(str(path))
    path.write_text(
        "current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n"
        "clusters: [{name: k, cluster: {server: 'https://10.0.0.1:6443/', certificate-authority: ca.crt}}]\n"
        "users: [{name: u, user: {token: abc}}]\n"
    )
    config = ConnectionConfig.from_kubeconfig(str(path))
    assert config.url == "https://10.0.0.1:6443" and config.ca_file == str(tmp_path / "ca.crt")
    assert config.token_file is not None and Path(config.token_file).read_text() == "abc"


def test_api_server_tls_files_rotate_and_a_half_written_rotation_keeps_the_last_good_context(tmp_path: Path) -> None:
    """The API server's CA and client certificate rotate by the outputs' mechanism
    (core/tls_files.py): a key that does not match its certificate yet keeps the last good
    context (before, every request raised until the second file arrived), counted and logged
    as the component's; the finished rotation gives a new context."""
    certs = Pki()
    volume = secret_volume(tmp_path / "kube", certs.secret(certs.ca1, certs.alice))
    source = TLSContextSource(
        str(volume / "ca.crt"), None, True, client_cert=str(volume / "tls.crt"), client_key=str(volume / "tls.key")
    )
    registry = MetricsRegistry()
    source.bind(logging.getLogger("kubetrail.test.kube"), registry.component("kubernetes_events.0", "source", "x"))
    first = source.context()
    assert source.context() is first

    touch_changed(data_file(volume, "tls.key"), pem(certs.bob)[1])  # half of a rotation: bob's key, alice's cert
    after_check_interval()
    assert source.context() is first
    labels = {"component": "kubernetes_events.0", "kind": "source", "plugin": "x", "option": "client-certificate"}
    assert registry.registry.get_sample_value("kubetrail_secret_reload_errors_total", labels) == 1.0

    secret_volume(volume, certs.secret(certs.ca2, certs.bob))  # the rotation completed
    after_check_interval()
    second = source.context()
    assert second is not first
    assert [c["subject"] for c in second.get_ca_certs()] != [c["subject"] for c in first.get_ca_certs()]
    reloads = {**labels, "option": "kube_ca_file"}
    assert registry.registry.get_sample_value("kubetrail_secret_reloads_total", reloads) == 1.0
