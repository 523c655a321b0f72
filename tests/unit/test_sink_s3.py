"""The ``s3`` output against a real MinIO, built from its Go module (tests/servers/minio.py).

MinIO serves the S3 REST API: PutObject, multipart uploads (with their 5 MiB minimum part size)
and Content-MD5 checks are MinIO's. Objects are read back with boto3. The durability promise is
tested with kubetrail as a real process killed with SIGKILL after its batches were acknowledged.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest

from kubetrail.core.errors import ConfigError, RetryableError
from kubetrail.core.record import Batch, Record
from kubetrail.runtime.plugins import COMMON_OUTPUT_OPTIONS, SINKS
from kubetrail.sinks.s3 import S3Sink
from tests.servers import minio as minio_server
from tests.servers import running
from tests.servers.minio import MinioServer
from tests.timing import scaled
from tests.unit.helpers import build, tail_input, write

REGION = "us-east-1"
T0 = 1_704_164_645_123_456_789  # 2024-01-02T03:04:05.123456789Z


@pytest.fixture(scope="module")
def minio() -> Iterator[MinioServer]:
    with running(MinioServer, "no MinIO") as server:
        yield server


@pytest.fixture
def aws(minio: MinioServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MinioServer:
    client = s3(minio)
    for bucket in client.list_buckets().get("Buckets", []):  # a clean server for each test
        for item in client.list_objects_v2(Bucket=bucket["Name"]).get("Contents", []):
            client.delete_object(Bucket=bucket["Name"], Key=item["Key"])
        client.delete_bucket(Bucket=bucket["Name"])
    for name in ("AWS_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", minio_server.ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", minio_server.SECRET_KEY)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    return minio


def s3(server: MinioServer) -> Any:
    return boto3.client(
        "s3",
        region_name=REGION,
        endpoint_url=server.url,
        aws_access_key_id=minio_server.ACCESS_KEY,
        aws_secret_access_key=minio_server.SECRET_KEY,
    )


def objects(server: MinioServer, bucket: str = "logs") -> dict[str, dict[str, Any]]:
    client = s3(server)
    found = {}
    for item in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        got = client.get_object(Bucket=bucket, Key=item["Key"])
        found[item["Key"]] = {"body": got["Body"].read(), "ContentType": got.get("ContentType"),
                              "ContentEncoding": got.get("ContentEncoding")}  # fmt: skip
    return found


def sink(server: MinioServer, tmp_path: Path, **props: Any) -> Any:
    props.setdefault("region", REGION)
    props.setdefault("endpoint", server.url)
    props.setdefault("bucket", "logs")
    props.setdefault("store_dir", str(tmp_path / "store"))
    return build(S3Sink, COMMON_OUTPUT_OPTIONS, **props)


def rec(i: int, tag: str = "kube.var.app", **body: Any) -> Record:
    base: dict[str, Any] = {"log": f"line {i}", "i": i}
    base.update(body)
    return Record(tag, T0 + i * 1000, base)


async def test_put_object_key_format_and_json_lines(aws: MinioServer, tmp_path: Path) -> None:
    s3(aws).create_bucket(Bucket="logs")
    out = sink(aws, tmp_path, use_put_object="on", total_file_size="1M", content_type="application/x-ndjson",
               s3_key_format="/k8s/$TAG[1]/$TAG[2]/%Y/%m/%d/%H%M%S-$INDEX-$UUID.jsonl",
               s3_key_format_tag_delimiters=".-", send_content_md5="on")  # fmt: skip
    assert SINKS["s3"] is S3Sink
    await out.start()
    await out.write(Batch("kube.var.app", [rec(i) for i in range(3)]))
    await out.write(Batch("other-x-y", [rec(9, tag="other-x-y")]))
    await out.close()  # shutdown seals and uploads what is buffered
    found = objects(aws)
    assert len(found) == 2
    app = next(k for k in found if k.startswith("k8s/var/app/"))
    assert app.startswith("k8s/var/app/2024/01/02/030405-") and app.endswith(".jsonl")
    index, uuid_part = app.rsplit("/", 1)[1][len("030405-") : -len(".jsonl")].split("-")
    assert index in ("1", "2") and len(uuid_part) == 8
    assert found[app]["ContentType"] == "application/x-ndjson"
    lines = [orjson.loads(line) for line in found[app]["body"].splitlines()]
    assert lines == [{"date": f"2024-01-02T03:04:05.{123456 + i:06d}Z", "log": f"line {i}", "i": i} for i in range(3)]
    other = next(k for k in found if k.startswith("k8s/x/y/"))  # "-" splits the tag too
    assert orjson.loads(found[other]["body"])["i"] == 9
    assert {k.split("-")[-2] for k in found} == {"1", "2"}  # $INDEX counts uploads


async def test_multipart_upload_with_gzip_when_the_file_is_full(aws: MinioServer, tmp_path: Path) -> None:
    s3(aws).create_bucket(Bucket="logs")
    out = sink(aws, tmp_path, total_file_size="12M", upload_chunk_size="5M", compression="gzip",
               s3_key_format="/big/$TAG", json_date_key="false", static_file_path="on")  # fmt: skip
    await out.start()
    calls: list[str] = []
    out.aws.client.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))
    # Random text does not compress: the gzip object stays above 2 parts of 5 MiB.
    payload = os.urandom(6 * 1024 * 1024).hex()  # 12 MiB of hex
    records = [Record("big", T0 + i, {"i": i, "blob": payload[i * 100_000 : (i + 1) * 100_000]}) for i in range(126)]
    try:
        for start in range(0, len(records), 10):
            await out.write(Batch("big", records[start : start + 10]))
        deadline = time.monotonic() + scaled(30)
        while not s3(aws).list_objects_v2(Bucket="logs").get("Contents") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        await out.close()
    assert calls.count("CreateMultipartUpload") == 1 and calls.count("UploadPart") >= 2
    found = objects(aws)
    assert list(found) == ["big/big"]
    assert found["big/big"]["ContentEncoding"] == "gzip"
    lines = [orjson.loads(line) for line in gzip.decompress(found["big/big"]["body"]).splitlines()]
    assert [line["i"] for line in lines] == list(range(126))
    assert "".join(line["blob"] for line in lines) == payload[: 126 * 100_000]


async def test_upload_timeout_uploads_while_running_and_log_key(aws: MinioServer, tmp_path: Path) -> None:
    s3(aws).create_bucket(Bucket="logs")
    out = sink(aws, tmp_path, upload_timeout="1s", log_key="log", s3_key_format="/t/$TAG/$UUID")
    await out.start()
    try:
        await out.write(Batch("a", [rec(0, tag="a"), rec(1, tag="a", log={"nested": True})]))
        deadline = time.monotonic() + scaled(20)
        while not objects(aws) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        found = objects(aws)
    finally:
        await out.close()
    (body,) = [v["body"] for v in found.values()]
    assert body == b'line 0\n{"nested":true}\n'  # a string as it is, anything else as JSON


async def test_missing_bucket_keeps_the_data_and_uploads_once_it_exists(aws: MinioServer, tmp_path: Path) -> None:
    out = sink(aws, tmp_path, upload_timeout="1s", s3_key_format="/x/$TAG")
    await out.start()
    try:
        await out.write(Batch("t", [rec(i, tag="t") for i in range(5)]))  # acknowledged: in store_dir
        await asyncio.sleep(2.5)
        sealed = list((out.sealed_dir).glob("*.data"))
        assert len(sealed) == 1  # waiting, not dropped
        s3(aws).create_bucket(Bucket="logs")
        deadline = time.monotonic() + scaled(30)
        while not s3(aws).list_objects_v2(Bucket="logs").get("Contents") and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    finally:
        await out.close()
    body = objects(aws)["x/t"]["body"]
    assert [orjson.loads(line)["i"] for line in body.splitlines()] == [0, 1, 2, 3, 4]
    assert not list(out.sealed_dir.glob("*")) and not list(out.failed_dir.glob("*"))


def run_kubetrail(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )


def test_acknowledged_batches_survive_kill_9_and_are_uploaded_after_restart(aws: MinioServer, tmp_path: Path) -> None:
    s3(aws).create_bucket(Bucket="logs")
    log = write(tmp_path / "app.log", "".join(f'{{"n": {i}}}\n' for i in range(2000)))

    def config(exit_on_eof: bool) -> Path:
        return write(tmp_path / f"p-{exit_on_eof}.conf", f"""
[SERVICE]
    grace 60
{tail_input(log, db=tmp_path / "tail.db", exit_on_eof=exit_on_eof, extra="    batch_size 8k")}
[OUTPUT]
    name s3
    match *
    bucket logs
    region {REGION}
    endpoint {aws.url}
    store_dir {tmp_path / "store"}
    upload_timeout 1h
    json_date_key false
    s3_key_format /app/$TAG/$INDEX
""")  # fmt: skip

    proc = run_kubetrail(config(exit_on_eof=False))
    try:
        deadline = time.monotonic() + scaled(120)
        offset = 0
        while time.monotonic() < deadline:  # the tail checkpoints only acknowledged batches
            try:
                with sqlite3.connect(tmp_path / "tail.db") as db:
                    offset = next(iter(db.execute("select offset from in_tail_files")), (0,))[0]
            except sqlite3.OperationalError:
                pass
            if offset == log.stat().st_size:
                break
            time.sleep(0.1)
        assert offset == log.stat().st_size, proc.stderr.read() if proc.poll() is not None else "tail did not finish"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert s3(aws).list_objects_v2(Bucket="logs").get("KeyCount", 0) == 0  # nothing uploaded before the kill
    # Restart: nothing new to read; the buffer left by the killed process is uploaded.
    restarted = run_kubetrail(config(exit_on_eof=True))
    _, err = restarted.communicate(timeout=180)
    assert restarted.returncode == 0, err[-3000:]
    found = objects(aws)
    lines = [orjson.loads(line)["n"] for body in found.values() for line in body["body"].splitlines()]
    assert sorted(lines) == list(range(2000))  # each acknowledged line exactly once


async def test_a_torn_last_line_is_cut_on_recovery(aws: MinioServer, tmp_path: Path) -> None:
    s3(aws).create_bucket(Bucket="logs")
    out = sink(aws, tmp_path, s3_key_format="/r/$TAG")
    await out.start()
    await out.write(Batch("t", [rec(0, tag="t"), rec(1, tag="t")]))
    (data,) = out.open_dir.glob("*.data")
    with open(data, "ab") as f:
        f.write(b'{"torn": ')  # a batch being written when the process died (never acknowledged)
    if out._uploader is not None:  # simulate the crash: no orderly close
        out._uploader.cancel()
    await out.aws.close()
    again = sink(aws, tmp_path, s3_key_format="/r/$TAG")
    await again.start()
    await again.close()
    body = objects(aws)["r/t"]["body"]
    assert [orjson.loads(line)["i"] for line in body.splitlines()] == [0, 1]


@pytest.mark.parametrize(
    ("props", "key"),
    [
        ({"bucket": ""}, "bucket"),
        ({"upload_chunk_size": "1M"}, "upload_chunk_size"),
        ({"total_file_size": "100k"}, "total_file_size"),
        ({"use_put_object": "on", "total_file_size": "2G"}, "total_file_size"),
        ({"upload_timeout": "0"}, "upload_timeout"),
        ({"endpoint": "http://"}, "endpoint"),
    ],
)
def test_config_errors_name_the_key(props: dict[str, str], key: str, tmp_path: Path) -> None:
    props.setdefault("bucket", "b")
    with pytest.raises(ConfigError) as info:
        build(S3Sink, COMMON_OUTPUT_OPTIONS, store_dir=str(tmp_path), **props)
    assert info.value.key == key


async def test_a_file_s3_refuses_is_kept_in_failed_across_restarts(aws: MinioServer, tmp_path: Path) -> None:
    s3(aws).create_bucket(Bucket="logs")
    for i in range(2):  # two runs on the same store_dir: the second file must not replace the first
        out = sink(aws, tmp_path, s3_key_format="/bad//$TAG")  # MinIO refuses '//' in object names
        await out.start()
        await out.write(Batch("t", [rec(i, tag="t")]))
        await out.close()
    failed = sorted(out.failed_dir.glob("*.data"))
    assert len(failed) == 2
    assert [orjson.loads(p.read_bytes())["i"] for p in failed] == [0, 1]
    meta = orjson.loads(failed[0].with_suffix(".json").read_bytes())
    assert meta["key"] == "bad//t" and "XMinioInvalidObjectName" in meta["error"]
    assert not objects(aws)


async def test_stopped_between_sealing_and_writing_the_key(aws: MinioServer, tmp_path: Path) -> None:
    s3(aws).create_bucket(Bucket="logs")
    out = sink(aws, tmp_path, s3_key_format="/k/$TAG/%Y")
    await out.start()
    await out.write(Batch("app.x", [rec(0, tag="app.x")]))
    (data,) = out.open_dir.glob("*.data")
    if out._uploader is not None:  # the crash: no orderly close
        out._uploader.cancel()
    await out.aws.close()
    data.rename(out.sealed_dir / data.name)  # moved to sealed/, its key never written
    again = sink(aws, tmp_path, s3_key_format="/k/$TAG/%Y")
    await again.start()
    await again.close()
    assert list(objects(aws)) == ["k/app.x/2024"]  # tag and first-record time from the open/ description
    assert not list(again.open_dir.glob("*")) and not list(again.sealed_dir.glob("*"))


async def test_a_failed_append_leaves_no_torn_line(aws: MinioServer, tmp_path: Path) -> None:
    """A write cut short (here by RLIMIT_FSIZE, as a full disk would) is taken back, so the retry
    appends the batch whole and the file has no broken line in the middle."""
    s3(aws).create_bucket(Bucket="logs")
    out = sink(aws, tmp_path, s3_key_format="/f/$TAG", json_date_key="false")
    await out.start()
    try:
        await out.write(Batch("t", [rec(0, tag="t")]))
        (data,) = out.open_dir.glob("*.data")
        big = Batch("t", [rec(i, tag="t", pad="x" * 500) for i in range(1, 5)])
        previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (data.stat().st_size + 700, hard))
        try:
            with pytest.raises(RetryableError, match="cannot write to the s3 buffer"):
                await out.write(big)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous_handler)
        await out.write(big)  # the runner's retry
    finally:
        await out.close()
    body = objects(aws)["f/t"]["body"]
    assert [orjson.loads(line)["i"] for line in body.splitlines()] == [0, 1, 2, 3, 4]


async def test_a_retried_batch_appends_each_tag_once(aws: MinioServer, tmp_path: Path) -> None:
    s3(aws).create_bucket(Bucket="logs")
    out = sink(aws, tmp_path, s3_key_format="/m/$TAG", json_date_key="false")
    await out.start()
    batch = Batch("a", [rec(0, tag="a"), rec(1, tag="b", pad="x" * 2000)])
    try:
        await out.write(Batch("b", [rec(9, tag="b")]))  # b's file exists: the limit below cuts its append
        (b_file,) = out.open_dir.glob("*-b.data")
        previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (b_file.stat().st_size + 500, hard))
        try:
            with pytest.raises(RetryableError):
                await out.write(batch)  # tag a stored, tag b cut short
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous_handler)
        await out.write(batch)  # the retry: only b
    finally:
        await out.close()
    found = objects(aws)
    assert [orjson.loads(line)["i"] for line in found["m/a"]["body"].splitlines()] == [0]
    assert [orjson.loads(line)["i"] for line in found["m/b"]["body"].splitlines()] == [9, 1]


def parts_payload(count: int) -> list[Record]:
    """``count`` records of 100 KB of hex each (about 10 per MiB)."""
    blob = os.urandom(50_000).hex()
    return [Record("big", T0 + i, {"i": i, "blob": blob}) for i in range(count)]


async def test_parts_go_up_while_the_file_fills(aws: MinioServer, tmp_path: Path) -> None:
    """Without gzip, as in Fluent Bit, every upload_chunk_size of synced data becomes a part of the
    file's multipart upload before the file is full; sealing uploads only the rest."""
    s3(aws).create_bucket(Bucket="logs")
    out = sink(aws, tmp_path, total_file_size="40M", upload_chunk_size="5M", upload_timeout="1h",
               s3_key_format="/stream/$TAG", json_date_key="false")  # fmt: skip
    await out.start()
    calls: list[str] = []
    out.aws.client.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))
    records = parts_payload(120)  # about 12 MB
    try:
        for start in range(0, len(records), 10):
            await out.write(Batch("big", records[start : start + 10]))
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + scaled(30)
        while calls.count("UploadPart") < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert calls.count("UploadPart") >= 2 and "CompleteMultipartUpload" not in calls  # still filling
        assert len(list(out.open_dir.glob("*.data"))) == 1
    finally:
        await out.close()
    assert calls.count("CreateMultipartUpload") == 1 and calls.count("CompleteMultipartUpload") == 1
    body = objects(aws)["stream/big"]["body"]
    assert [orjson.loads(line)["i"] for line in body.splitlines()] == list(range(120))


async def test_a_streamed_upload_resumes_after_a_crash(aws: MinioServer, tmp_path: Path) -> None:
    s3(aws).create_bucket(Bucket="logs")
    props = {"total_file_size": "40M", "upload_chunk_size": "5M", "upload_timeout": "1h",
             "s3_key_format": "/resume/$TAG", "json_date_key": "false"}  # fmt: skip
    out = sink(aws, tmp_path, **props)
    await out.start()
    first: list[str] = []
    out.aws.client.meta.events.register("before-call.s3.*", lambda model, **_: first.append(model.name))
    records = parts_payload(80)
    for start in range(0, 60, 10):
        await out.write(Batch("big", records[start : start + 10]))
    deadline = time.monotonic() + scaled(30)
    while "UploadPart" not in first and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert first.count("UploadPart") == 1  # 6 MB synced: one part up
    await out.write(Batch("big", records[60:80]))
    if out._uploader is not None:  # the crash: no orderly close
        out._uploader.cancel()
    await out.aws.close()
    again = sink(aws, tmp_path, **props)
    await again.start()
    second: list[str] = []
    again.aws.client.meta.events.register("before-call.s3.*", lambda model, **_: second.append(model.name))
    deadline = time.monotonic() + scaled(30)
    while "CompleteMultipartUpload" not in second and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await again.close()
    assert "CreateMultipartUpload" not in second and second.count("UploadPart") == 1  # the same upload, the rest
    body = objects(aws)["resume/big"]["body"]
    assert [orjson.loads(line)["i"] for line in body.splitlines()] == list(range(80))


async def test_a_rotated_ca_bundle_gives_a_new_client_and_every_record_once(aws: MinioServer, tmp_path: Path) -> None:
    """MinIO behind nginx terminating TLS with a certificate of a private CA (how a private S3
    endpoint is often reached). The server moves to a certificate of a new CA; uploads fail
    verification and wait; the Secret with the new CA bundle arrives and the next upload makes
    a new client with it (botocore reads the bundle only when a client is made). Every record
    is in the bucket once. A bundle that does not load keeps the current client."""
    from tests.integration.rotation import Nginx, require_nginx
    from tests.unit.test_secrets import secret_volume
    from tests.unit.test_tls_reload import Pki, after_check_interval

    require_nginx()
    certs = Pki()
    work = tmp_path / "nginx"
    work.mkdir()
    proxy = Nginx(
        work,
        None,
        "-",
        server=f"ssl_certificate {work}/server.crt; ssl_certificate_key {work}/server.key;",
        location="proxy_set_header Host $http_host; client_max_body_size 0;",  # SigV4 signed the Host
        ssl=True,
        upstream=aws.port,
    )
    certs.server1.write(work / "server.crt", work / "server.key")
    proxy.start()
    volume = secret_volume(tmp_path / "ca", {"ca.crt": Pki.ca_pem(certs.ca1)})
    s3(aws).create_bucket(Bucket="logs")
    out = sink(
        aws, tmp_path, endpoint=f"https://127.0.0.1:{proxy.port}", upload_timeout="1s", use_put_object="on",
        **{"tls.ca_file": str(volume / "ca.crt")},
    )  # fmt: skip

    def numbers() -> list[int]:
        return sorted(orjson.loads(line)["i"] for o in objects(aws).values() for line in o["body"].splitlines())

    async def until(count: int, what: str) -> None:
        deadline = time.monotonic() + scaled(30)
        while len(numbers()) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert len(numbers()) >= count, what

    await out.start()
    try:
        await out.write(Batch("a", [rec(i, tag="a") for i in range(0, 50)]))
        await until(50, "the first 50 through CA 1")
        certs.server2.write(work / "server.crt", work / "server.key")
        proxy.reload()
        await out.write(Batch("a", [rec(i, tag="a") for i in range(50, 100)]))
        await asyncio.sleep(3)
        assert len(numbers()) == 50  # the server's new certificate is not trusted yet: held
        secret_volume(volume, {"ca.crt": Pki.ca_pem(certs.ca2)})
        await until(100, "the held 50 through CA 2")
        assert out.aws.ca_file is not None and out.aws.ca_file.version == 1
        secret_volume(volume, {"ca.crt": "not a certificate"})
        after_check_interval()
        await out.write(Batch("a", [rec(i, tag="a") for i in range(100, 150)]))
        await until(150, "50 more with the last good bundle")
        assert out.aws.ca_file.version == 1
    finally:
        await out.close()
        assert proxy.proc is not None
        proxy.proc.terminate()
        proxy.proc.wait(10)
    assert numbers() == list(range(150))
