"""The ``http`` sink and the shared HTTP client (kubetrail/sinks/http_base.py) against a real
loopback aiohttp server (tests/fakes/http_server.py), with TLS from a test CA."""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from kubetrail.core.errors import ConfigError, PermanentError, RetryableError
from kubetrail.core.record import Batch, Record
from kubetrail.sinks.http import HttpOutputSink
from kubetrail.sinks.http_base import BadResponseError
from tests.fakes.http_server import Answer, ScriptedServer
from tests.unit.helpers import build

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cluster"))
from localcluster import pki

T0 = 1_700_000_000_123_456_789


def sink(server: ScriptedServer | None = None, **props: Any) -> HttpOutputSink:
    if server is not None:
        props.setdefault("host", "127.0.0.1")
        props.setdefault("port", server.port)
    return build(HttpOutputSink, **props)  # type: ignore[no-any-return]


def records(n: int) -> list[Record]:
    return [Record("app.log", T0 + i * 1000, body_={"n": i, "msg": f"message {i} " + "x" * 50}) for i in range(n)]


@pytest.fixture
async def server() -> Any:
    srv = await ScriptedServer().start()
    srv.default = Answer(204, b"", "text/plain")
    yield srv
    await srv.stop()


async def send(out: HttpOutputSink, batch: Batch) -> None:
    try:
        await out.write(batch)
    finally:
        await out.close()


@pytest.mark.parametrize(
    ("props", "content_type", "decode"),
    [
        ({"format": "json"}, "application/json", lambda b: orjson.loads(b)),
        ({"format": "json_lines"}, "application/x-ndjson", lambda b: [orjson.loads(x) for x in b.splitlines()]),
        ({"format": "json_stream"}, "application/json", lambda b: [orjson.loads(x + b"}") for x in b.split(b"}")[:-1]]),
    ],
)
async def test_formats_carry_every_record_with_its_date(
    server: ScriptedServer, props: dict[str, str], content_type: str, decode: Any
) -> None:
    await send(sink(server, json_date_format="iso8601", **props), Batch("app.log", records(5)))
    request = server.requests[0]
    assert request.method == "POST" and request.path == "/"
    assert request.headers["Content-Type"] == content_type
    docs = decode(request.body)
    assert [d["n"] for d in docs] == list(range(5))
    assert docs[0]["date"] == "2023-11-14T22:13:20.123456Z"


async def test_unmodified_json_lines_go_out_as_the_source_bytes(server: ScriptedServer) -> None:
    block = b'{"a":1}\n{"a":2}\n'
    batch = Batch("t", None, raw_block=block, materialize=lambda: [], count=2)
    await send(sink(server, format="json_lines", json_date_key="false"), batch)
    assert server.requests[0].body == block


async def test_gzip_auth_headers_method_and_uri(server: ScriptedServer) -> None:
    out = sink(
        server,
        compress="gzip",
        http_user="user",
        http_passwd="p@ss",
        header=["X-Tenant team-a", "X-Trace on"],
        header_tag="X-Tag",
        http_method="put",
        uri="/ingest/v1",
    )
    await send(out, Batch("app.log", records(200)))
    request = server.requests[0]
    assert (request.method, request.path) == ("PUT", "/ingest/v1")
    assert request.headers["Content-Encoding"] == "gzip"
    assert 0 < request.wire_size < len(request.body) / 5
    assert [d["n"] for d in orjson.loads(request.body)] == list(range(200))
    assert request.headers["Authorization"] == "Basic dXNlcjpwQHNz"
    assert (request.headers["X-Tenant"], request.headers["X-Trace"], request.headers["X-Tag"]) == (
        "team-a",
        "on",
        "app.log",
    )


async def test_bearer_token(server: ScriptedServer) -> None:
    await send(sink(server, bearer_token="s3cret"), Batch("t", records(1)))
    assert server.requests[0].headers["Authorization"] == "Bearer s3cret"


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (Answer(400, b'{"error":"field msg too long"}'), PermanentError, r"HTTP 400 Bad Request: .*field msg too long"),
        (Answer(422, b"unprocessable", "text/plain"), PermanentError, "HTTP 422"),
        (Answer(401, b"who are you", "text/plain"), RetryableError, "HTTP 401.*check credentials"),
        (Answer(404, b"<html>Not Found</html>", "text/html"), RetryableError, "HTTP 404.*Not Found"),
        (Answer(408, b"", "text/plain"), RetryableError, r"HTTP 408.*\(empty body\)"),
        (Answer(429, b"slow down", "text/plain", {"Retry-After": "3"}), RetryableError, "HTTP 429"),
        (
            Answer(502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html"),
            RetryableError,
            "502 Bad Gateway",
        ),
        (Answer(301, b"", "text/plain", {"Location": "/elsewhere"}), BadResponseError, "unexpected status"),
    ],
)
async def test_status_classification(server: ScriptedServer, answer: Answer, error: type, match: str) -> None:
    server.default = answer
    with pytest.raises(error, match=match):
        await send(sink(server), Batch("t", records(1)))


async def test_a_hanging_server_times_out_and_a_closed_port_is_retryable(server: ScriptedServer) -> None:
    server.default = Answer(200, b"", "text/plain", delay=5)
    with pytest.raises(RetryableError, match="no answer within"):
        await send(sink(server, **{"net.io_timeout": "0.3"}), Batch("t", records(1)))
    with socket.socket() as closed:  # bound but not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        with pytest.raises(RetryableError, match="cannot connect"):
            await send(sink(host="127.0.0.1", port=closed.getsockname()[1]), Batch("t", records(1)))


# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tls")
    ca = pki.make_ca("http-sink-test-ca")
    pki.write_cert(d / "ca.crt", ca.cert)
    pki.serving_cert(ca, "receiver").write(d / "server.crt", d / "server.key")
    pki.issue(ca, "receiver", server=True, dns=("logs.kubetrail.test",)).write(d / "named.crt", d / "named.key")
    pki.issue(ca, "kubetrail", client=True).write(d / "client.crt", d / "client.key")
    return {p.stem + p.suffix: p for p in d.iterdir()}


def server_ctx(files: dict[str, Path], name: str = "server", client_ca: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(files[f"{name}.crt"], files[f"{name}.key"])
    if client_ca:
        ctx.load_verify_locations(files["ca.crt"])
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def test_tls_verification_client_certificates_and_vhost(tls_files: dict[str, Path]) -> None:
    ca = str(tls_files["ca.crt"])
    plain = await ScriptedServer().start(server_ctx(tls_files))
    mutual = await ScriptedServer().start(server_ctx(tls_files, client_ca=True))
    named = await ScriptedServer().start(server_ctx(tls_files, "named"))
    try:
        await send(sink(plain, tls="on", **{"tls.ca_file": ca}), Batch("t", records(1)))
        assert len(plain.requests) == 1
        with pytest.raises(RetryableError, match="TLS certificate rejected"):
            await send(sink(plain, tls="on"), Batch("t", records(1)))  # the system CAs do not know ours
        await send(sink(plain, tls="on", **{"tls.verify": "off"}), Batch("t", records(1)))
        assert len(plain.requests) == 2

        with pytest.raises(RetryableError):  # the server demands a client certificate
            await send(sink(mutual, tls="on", **{"tls.ca_file": ca}), Batch("t", records(1)))
        client = {
            "tls.ca_file": ca,
            "tls.crt_file": str(tls_files["client.crt"]),
            "tls.key_file": str(tls_files["client.key"]),
        }
        await send(sink(mutual, tls="on", **client), Batch("t", records(1)))
        assert len(mutual.requests) == 1

        with pytest.raises(RetryableError, match="TLS certificate rejected"):
            await send(sink(named, tls="on", **{"tls.ca_file": ca}), Batch("t", records(1)))
        await send(
            sink(named, tls="on", **{"tls.ca_file": ca, "tls.vhost": "logs.kubetrail.test"}), Batch("t", records(1))
        )
        assert len(named.requests) == 1
    finally:
        for srv in (plain, mutual, named):
            await srv.stop()


@pytest.mark.parametrize(
    ("props", "key"),
    [
        ({"format": "msgpack"}, "format"),
        ({"header": "X-Only-Name"}, "header"),
        ({"port": "70000"}, "port"),
        ({"bearer_token": "t", "http_user": "u"}, "bearer_token"),
        ({"tls": "on", "tls.crt_file": "/nonexistent.crt"}, "tls.key_file"),
        ({"tls": "on", "tls.crt_file": "/nonexistent.crt", "tls.key_file": "/nonexistent.key"}, "tls.crt_file"),
        ({"net.io_timeout": "soon"}, "net.io_timeout"),
    ],
)
def test_config_errors_name_the_option(props: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        sink(**props)
    assert info.value.key == key


async def test_many_concurrent_writes_share_one_session(server: ScriptedServer) -> None:
    out = sink(server, format="json_lines")
    try:
        await asyncio.gather(*(out.write(Batch("t", records(10))) for _ in range(20)))
    finally:
        await out.close()
    assert sum(len(r.body.splitlines()) for r in server.requests) == 200
