"""The ``tcp`` and ``http`` inputs in a running pipeline, fed by real clients.

``tcp``: asyncio TCP connections writing JSON split at arbitrary points, separated text, garbage
and oversize records. ``http``: aiohttp's client, ``curl`` (when installed) and a raw socket for
requests the client libraries will not send (no Content-Type). Each bad input must be answered or
dropped on its own, counted, and leave the server serving the other clients.
"""

from __future__ import annotations

import asyncio
import gzip
import shutil
import ssl
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from kubetrail.core.config import load_config
from kubetrail.core.errors import ConfigError
from kubetrail.core.gzip_body import GzipBodyError, gunzip_bounded
from kubetrail.core.record import Batch
from kubetrail.runtime.pipeline import Pipeline
from kubetrail.sources.http import parse_urlencoded, tag_from_path
from kubetrail.sources.tcp import JsonStream, unescape_separator
from tests.unit.source_helpers import CollectSink, Running, input_config, read_until_closed, running, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cluster"))
from localcluster import pki

# --- tcp ------------------------------------------------------------------------------------------


def tcp_input(extra: str = "") -> str:
    return f"    name tcp\n    listen 127.0.0.1\n    port 0\n    tag tcp.in\n{extra}"


async def connect(run: Running) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", run.source.bound_port)


async def send(run: Running, *parts: bytes, pause: float = 0.02) -> None:
    _, writer = await connect(run)
    for part in parts:
        writer.write(part)
        await writer.drain()
        await asyncio.sleep(pause)  # separate reads on the server
    writer.close()
    await writer.wait_closed()


def test_json_stream_splits_values_and_resyncs_after_errors() -> None:
    stream = JsonStream()
    stream.feed(b'{"a": 1}{"b"')
    assert stream.values() == ([{"a": 1}], [])
    stream.feed(b': [1, 2]}\n  [3]\n"text"\n{"c": tr')
    assert stream.values() == ([{"b": [1, 2]}, [3], "text"], [])
    stream.feed(b"ue}\nnot json at all\n{")
    values, errors = stream.values()
    assert values == [{"c": True}] and len(errors) == 1 and "invalid JSON" in errors[0]
    stream.feed('"é": "\u00e9"}'.encode()[:4])  # a UTF-8 character split between reads
    assert stream.values() == ([], [])
    stream.feed('"é": "\u00e9"}'.encode()[4:])
    assert stream.values() == ([{"é": "é"}], [])
    stream.feed(b'{"cut": ')
    assert stream.values(final=True)[1][0].startswith("truncated JSON")
    assert unescape_separator("\\r\\n") == b"\r\n" and unescape_separator("||") == b"||"


async def test_tcp_json_records_from_split_writes(tmp_path: Path) -> None:
    async with running(tmp_path, tcp_input("    source_address_key src"), ready="started") as run:
        await send(run, b'{"n": 1}\n{"n"', b': 2, "nested": {"x": [1,\n 2]}}  {"n": 3}', b"\n[4, 5]\n")
        records = await run.wait_records(4)
    assert [r.body.get("n") for r in records] == [1, 2, 3, None]
    assert records[1].body["nested"] == {"x": [1, 2]}
    assert records[3].body["msg"] == [4, 5]  # an array becomes {"msg": [...]}, as Fluent Bit
    assert all(r.tag == "tcp.in" for r in records)
    assert records[0].body["src"].startswith("tcp://127.0.0.1:")


async def test_tcp_garbage_is_dropped_counted_and_other_clients_go_on(tmp_path: Path) -> None:
    async with running(tmp_path, tcp_input(), ready="started") as run:
        _, bad = await connect(run)
        bad.write(b'{"ok": 1}\n\xff\xfe{garbage]]\n"a string"\n{"ok": 2}\n')
        await bad.drain()
        await send(run, b'{"other": 1}\n')
        bad.write(b'{"ok": 3}\n')
        await bad.drain()
        await run.wait_records(4)
        bad.close()
        await wait_until(lambda: run.metric("kubetrail_errors_total", type="tcp_invalid_json") == 1)
        assert run.metric("kubetrail_errors_total", type="tcp_not_a_map") == 1
    assert sorted(orjson.dumps(b).decode() for b in run.sink.bodies()) == [
        '{"ok":1}',
        '{"ok":2}',
        '{"ok":3}',
        '{"other":1}',
    ]


async def test_tcp_record_over_buffer_size_closes_only_that_connection(tmp_path: Path) -> None:
    extra = "    chunk_size 1k\n    buffer_size 4k"
    async with running(tmp_path, tcp_input(extra), ready="started") as run:
        reader, writer = await connect(run)
        writer.write(b'{"big": "' + b"x" * 20_000)
        await writer.drain()
        assert await read_until_closed(reader) == b""  # closed by the server
        writer.close()
        await send(run, b'{"after": true}\n')
        (record,) = await run.wait_records(1)
        assert record.body == {"after": True}
        assert run.metric("kubetrail_errors_total", type="tcp_buffer_size") == 1


async def test_tcp_format_none_with_separator(tmp_path: Path) -> None:
    extra = "    format none\n    separator ||"
    async with running(tmp_path, tcp_input(extra), ready="started") as run:
        await send(run, b"first||sec", b"ond||\xffbin||last without separator")
        records = await run.wait_records(4)
    assert [r.body["log"] for r in records] == ["first", "second", "\ufffdbin", "last without separator"]


# --- http -----------------------------------------------------------------------------------------


def http_input(extra: str = "") -> str:
    return f"    name http\n    listen 127.0.0.1\n    port 0\n    tag http.default\n{extra}"


def url(run: Running, path: str = "/") -> str:
    return f"http://127.0.0.1:{run.source.bound_port}{path}"


async def post(
    run: Running, path: str, body: bytes, ctype: str | None = "application/json", **headers: str
) -> tuple[int, str, dict[str, str]]:
    hdrs = dict(headers)
    if ctype is not None:
        hdrs["Content-Type"] = ctype
    async with (
        aiohttp.ClientSession() as session,
        session.post(url(run, path), data=body, headers=hdrs) as resp,
    ):
        return resp.status, await resp.text(), dict(resp.headers)


def test_tag_and_form_rules() -> None:
    assert tag_from_path("/") is None
    assert tag_from_path("/app.log") == "app.log"
    assert tag_from_path("/a/b-c d") == "a_b_c_d"
    assert parse_urlencoded(b"a=1&b=x+y%21&&=skip&novalue&c=") == {"a": "1", "b": "x y!", "c": ""}


async def test_http_json_object_and_array_with_tags_from_the_path(tmp_path: Path) -> None:
    async with running(tmp_path, http_input(), ready="started") as run:
        status, _, _ = await post(run, "/app.log?ignored=1", b'{"msg": "one"}')
        assert status == 201
        assert run.sink.records[0].tag == "app.log"  # in the buffer before the answer came
        status, _, _ = await post(run, "/", b'[{"msg": "two"}, {"msg": "three"}]')
        assert status == 201
        status, _, _ = await post(run, "/k8s%2Fpods/x-y", b'{"msg": "four"}')
        assert status == 201
        records = await run.wait_records(4)
    assert [(r.tag, r.body["msg"]) for r in records] == [
        ("app.log", "one"),
        ("http.default", "two"),
        ("http.default", "three"),
        ("k8s_pods_x_y", "four"),
    ]


async def test_http_tag_key_success_code_headers_gzip_and_remote_addr(tmp_path: Path) -> None:
    extra = (
        "    tag_key route\n    successful_response_code 200\n    success_header X-Custom hello\n    add_remote_addr on"
    )
    async with running(tmp_path, http_input(extra), ready="started") as run:
        body = orjson.dumps([{"route": "r.one", "v": 1}, {"v": 2}, {"route": 3, "v": 3}])
        status, _, headers = await post(
            run, "/path.tag", gzip.compress(body), **{"Content-Encoding": "gzip", "X-Forwarded-For": "10.1.2.3, x"}
        )
        assert status == 200 and headers["X-Custom"] == "hello"
        records = await run.wait_records(3)
    assert [(r.tag, r.body["v"]) for r in records] == [("r.one", 1), ("path.tag", 2), ("path.tag", 3)]
    assert records[0].body["route"] == "r.one"  # the key stays, as in Fluent Bit
    assert records[0].body["REMOTE_ADDR"] == "10.1.2.3"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_http_form_body_from_curl(tmp_path: Path) -> None:
    async with running(tmp_path, http_input("    successful_response_code 204"), ready="started") as run:
        proc = await asyncio.create_subprocess_exec(
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-d",
            "user=ana&msg=hi+there%21",
            url(run, "/form"),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert out == b"204"
        (record,) = await run.wait_records(1)
    assert record.tag == "form" and record.body == {"user": "ana", "msg": "hi there!"}


async def raw_request(run: Running, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", run.source.bound_port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    return data


async def test_http_bad_requests_get_400_or_413_and_the_server_goes_on(tmp_path: Path) -> None:
    async with running(tmp_path, http_input("    buffer_max_size 1k"), ready="started") as run:
        status, text, _ = await post(run, "/", b'{"broken": ')
        assert status == 400 and text.startswith("error: invalid JSON")
        status, text, _ = await post(run, "/", b'[{"a": 1}, 2]')
        assert status == 400 and "item 1" in text
        status, text, _ = await post(run, "/", b'"just a string"')
        assert status == 400 and "object" in text
        status, text, _ = await post(run, "/", b"a=1", ctype="text/plain")
        assert status == 400 and text == "error: invalid 'Content-Type'\n"
        status, text, _ = await post(run, "/", b"")
        assert status == 400 and text == "error: no payload found\n"
        status, text, _ = await post(run, "/", b'{"x": "' + b"y" * 5000 + b'"}')
        assert status == 413 and "buffer_max_size" in text
        status, text, _ = await post(run, "/", b"\x1f\x8b garbage", **{"Content-Encoding": "gzip"})
        assert status == 400 and "gzip" in text
        answer = await raw_request(run, b'POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 7\r\n\r\n{"a":1}')
        assert b" 400 " in answer.split(b"\r\n")[0] and b"'Content-Type' is not set" in answer
        answer = await raw_request(run, b"\x00\x01\x02 garbage \r\n\r\n")
        assert b" 400 " in answer.split(b"\r\n")[0]
        async with aiohttp.ClientSession() as session:
            async with session.get(url(run, "/x")) as resp:
                assert resp.status == 400 and await resp.text() == "error: invalid HTTP method\n"
            async with session.get(url(run, "/health")) as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "ok"
        assert run.sink.records == []
        status, _, _ = await post(run, "/", b'{"still": "serving"}')
        assert status == 201
        (record,) = await run.wait_records(1)
        assert record.body == {"still": "serving"}
        assert run.metric("kubetrail_errors_total", type="http_400") >= 7
        assert run.metric("kubetrail_errors_total", type="http_413") == 1


def test_gunzip_bounded_stops_at_the_limit_and_names_what_is_wrong() -> None:
    body = orjson.dumps([{"n": i} for i in range(100)])
    packed = gzip.compress(body)
    assert gunzip_bounded(packed, len(body)) == body
    with pytest.raises(GzipBodyError, match="over buffer_max_size \\(1023 bytes\\)") as too_large:
        gunzip_bounded(gzip.compress(b" " * (10 * 1024 * 1024)), 1023)  # inflates no further than 1 KiB
    assert too_large.value.too_large
    for bad, message in ((packed[:-12], "truncated gzip body"), (b"\x1f\x8b garbage", "bad gzip body")):
        with pytest.raises(GzipBodyError, match=message) as error:
            gunzip_bounded(bad, 1 << 20)
        assert not error.value.too_large


async def test_http_gzip_bomb_gets_413_and_a_truncated_body_400(tmp_path: Path) -> None:
    async with running(tmp_path, http_input("    buffer_max_size 64k"), ready="started") as run:
        bomb = gzip.compress(b"[" + b" " * (20 * 1024 * 1024) + b"]", compresslevel=9)
        assert len(bomb) < 64 * 1024
        status, text, _ = await post(run, "/", bomb, **{"Content-Encoding": "gzip"})
        assert status == 413 and text == "error: decompressed body over buffer_max_size (65536 bytes)\n"
        status, text, _ = await post(run, "/", gzip.compress(b'{"a": 1}')[:-4], **{"Content-Encoding": "gzip"})
        assert status == 400 and text == "error: truncated gzip body\n"
        status, _, _ = await post(run, "/", gzip.compress(b'{"a": 1}'), **{"Content-Encoding": "gzip"})
        assert status == 201
        (record,) = await run.wait_records(1)
        assert record.body == {"a": 1}


class GatedSink(CollectSink):
    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def write(self, batch: Batch) -> None:
        await self.gate.wait()
        await super().write(batch)


async def test_http_answers_only_once_the_records_are_in_the_buffers(tmp_path: Path) -> None:
    pipeline = Pipeline(load_config(input_config(tmp_path, http_input())))
    sink = GatedSink()
    pipeline.runners[0].sink = sink  # type: ignore[assignment]
    pipeline.runners[0]._slots = asyncio.Semaphore(2)  # the batch being written and one waiting
    task = asyncio.create_task(pipeline.run())
    source: Any = pipeline.sources[0].instance
    await wait_until(source.started.is_set)
    run = Running(pipeline, sink, source, task)
    try:
        assert (await post(run, "/", b'{"n": 1}'))[0] == 201  # taken by the sink's worker
        assert (await post(run, "/", b'{"n": 2}'))[0] == 201  # waits in the buffer
        third = asyncio.create_task(post(run, "/", b'{"n": 3}'))
        await asyncio.sleep(0.5)
        assert not third.done(), "answered before the buffer had room for the records"
        sink.gate.set()
        assert (await asyncio.wait_for(third, 5))[0] == 201
        records = await run.wait_records(3)
        assert [r.body["n"] for r in records] == [1, 2, 3]
    finally:
        sink.gate.set()
        pipeline.request_stop()
        assert await asyncio.wait_for(task, 30) == 0


def test_http_and_tcp_config_errors(tmp_path: Path) -> None:
    for lines, key in [
        (http_input("    successful_response_code 202"), "successful_response_code"),
        (http_input("    success_header OnlyAName"), "success_header"),
        (tcp_input("    format msgpack"), "format"),
        (tcp_input("    chunk_size 64k\n    buffer_size 32k"), "buffer_size"),
    ]:
        with pytest.raises(ConfigError, match=key):
            Pipeline(load_config(input_config(tmp_path, lines)))


async def test_tcp_over_tls_and_a_plain_client_on_the_tls_port(tmp_path: Path) -> None:
    ca = pki.make_ca("tcp-test-ca")
    pki.write_cert(tmp_path / "ca.crt", ca.cert)
    pki.serving_cert(ca, "127.0.0.1").write(tmp_path / "tls.crt", tmp_path / "tls.key")
    extra = f"    tls on\n    tls.crt_file {tmp_path / 'tls.crt'}\n    tls.key_file {tmp_path / 'tls.key'}"
    async with running(tmp_path, tcp_input(extra), ready="started") as run:
        # a client speaking plain TCP to the TLS port fails the handshake; nothing is recorded
        plain_reader, plain = await connect(run)
        plain.write(b'{"plain": 1}\n')
        await plain.drain()
        await asyncio.wait_for(plain_reader.read(), 5)  # returns once the server has closed it
        plain.close()
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        _, writer = await asyncio.open_connection("127.0.0.1", run.source.bound_port, ssl=ctx)
        writer.write(b'{"secure": true}\n')
        await writer.drain()
        writer.close()
        (record,) = await run.wait_records(1)
        await asyncio.sleep(0.3)
    assert record.body == {"secure": True} and len(run.sink.records) == 1
