"""The ``aws`` filter against a local IMDS: a real aiohttp server on loopback that behaves as
EC2's IMDSv2 does (a token from ``PUT /latest/api/token`` with a TTL header, 401 for a GET without
a valid token unless v1 is allowed, ``tags/instance`` listing tag names, 404 when tags are off).

It is a fake (EC2 cannot be reached); moto's server-mode IMDS, a real independent one, is used
too for what it serves (token, zone, instance id and type, IP, AMI, hostname).

Keys, defaults and the tag rules are Fluent Bit's ``filter_aws`` (``aws.c``); fetching happens
once in the background, records pass unchanged (counted) until it succeeded.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kubetrail.core.errors import ConfigError
from kubetrail.core.record import Record
from kubetrail.transforms.aws import TOKEN_HEADER, TOKEN_TTL_HEADER, AwsTransform
from tests.unit.helpers import build
from tests.unit.source_helpers import running, wait_until

INSTANCE = {
    "/latest/meta-data/placement/availability-zone": "eu-west-1b",
    "/latest/meta-data/instance-id": "i-0abc123def4567890",
    "/latest/meta-data/instance-type": "m5.large",
    "/latest/meta-data/local-ipv4": "10.0.3.17",
    "/latest/meta-data/ami-id": "ami-0123456789abcdef0",
    "/latest/meta-data/hostname": "ip-10-0-3-17.eu-west-1.compute.internal",
    "/latest/meta-data/mac": "0a:1b:2c:3d:4e:5f",
    "/latest/meta-data/network/interfaces/macs/0a:1b:2c:3d:4e:5f/vpc-id": "vpc-0f00ba7",
    "/latest/dynamic/instance-identity/document": (
        '{"accountId": "123456789012", "region": "eu-west-1", "instanceId": "i-0abc123def4567890"}'
    ),
}
TAGS = {"Name": "node-a", "team": "platform", "env": "prod"}


@dataclass
class Imds:
    """What the server answers; tests change it while it runs."""

    allow_v1: bool = False
    tags: dict[str, str] | None = field(default_factory=lambda: dict(TAGS))  # None: tags off (404)
    overrides: dict[str, tuple[int, str]] = field(default_factory=dict)  # path -> (status, body)
    tokens: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, bool]] = field(default_factory=list)  # method, path, had a valid token

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path
        if request.method == "PUT" and path == "/latest/api/token":
            ttl = request.headers.get(TOKEN_TTL_HEADER, "")
            self.requests.append(("PUT", path, False))
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return web.Response(status=400, text="bad or missing TTL header")
            token = f"token-{len(self.tokens)}"
            self.tokens.add(token)
            return web.Response(text=token)
        valid = request.headers.get(TOKEN_HEADER) in self.tokens
        self.requests.append((request.method, path, valid))
        if request.method != "GET":
            return web.Response(status=405)
        if not valid and not self.allow_v1:
            return web.Response(status=401)
        if path in self.overrides:
            status, body = self.overrides[path]
            return web.Response(status=status, text=body)
        if path == "/latest/meta-data/tags/instance":
            if self.tags is None:
                return web.Response(status=404)
            return web.Response(text="\n".join(self.tags))
        if path.startswith("/latest/meta-data/tags/instance/") and self.tags is not None:
            name = path.rsplit("/", 1)[1]
            if name in self.tags:
                return web.Response(text=self.tags[name])
        if path in INSTANCE:
            return web.Response(text=INSTANCE[path])
        return web.Response(status=404)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def serve(imds: Imds, port: int = 0) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", imds.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = port or free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def make(endpoint: str, **options: Any) -> AwsTransform:
    aws: AwsTransform = build(AwsTransform, imds_endpoint=endpoint, **options)
    return aws


async def known(aws: AwsTransform, timeout: float = 10.0) -> dict[str, str]:
    await aws.start()
    await wait_until(lambda: aws.fields is not None, timeout, "the instance metadata")
    assert aws.fields is not None
    return aws.fields


def sample(aws: AwsTransform, name: str, **labels: str) -> float:
    registry = aws.metrics.registry  # the registry build() made
    value = registry.get_sample_value(name, {"component": "aws.0", "kind": "test", "plugin": "aws", **labels})
    return value or 0.0


def errors(aws: AwsTransform) -> float:
    return sample(aws, "kubetrail_errors_total", type="imds")


def without(aws: AwsTransform) -> float:
    return sample(aws, "kubetrail_aws_records_without_metadata_total")


async def test_v2_defaults_add_az_and_instance_id_with_a_token() -> None:
    imds = Imds()
    async with serve(imds) as url:
        aws = make(url)
        try:
            assert await known(aws) == {"az": "eu-west-1b", "ec2_instance_id": "i-0abc123def4567890"}
        finally:
            await aws.close()
    # One token, then the GETs with it; nothing fetched per record.
    assert imds.requests[0] == ("PUT", "/latest/api/token", False)
    assert all(valid for method, _, valid in imds.requests[1:])
    assert len(imds.requests) == 3
    out = aws.process([Record("t", 1, {"log": "a", "az": "old"}), Record("t", 2, {"log": "b"})])
    assert [r.body for r in out] == [
        {"log": "a", "az": "eu-west-1b", "ec2_instance_id": "i-0abc123def4567890"},
        {"log": "b", "az": "eu-west-1b", "ec2_instance_id": "i-0abc123def4567890"},
    ]
    assert len(imds.requests) == 3


async def test_every_key_in_fluent_bits_order() -> None:
    imds = Imds()
    options = {k: "on" for k in ("ec2_instance_type", "private_ip", "ami_id", "account_id", "hostname", "vpc_id")}
    async with serve(imds) as url:
        aws = make(url, **options)
        try:
            fields = await known(aws)
        finally:
            await aws.close()
    assert list(fields.items()) == [
        ("az", "eu-west-1b"),
        ("ec2_instance_id", "i-0abc123def4567890"),
        ("ec2_instance_type", "m5.large"),
        ("private_ip", "10.0.3.17"),
        ("vpc_id", "vpc-0f00ba7"),
        ("ami_id", "ami-0123456789abcdef0"),
        ("account_id", "123456789012"),
        ("hostname", "ip-10-0-3-17.eu-west-1.compute.internal"),
    ]
    aws_off = make("http://127.0.0.1:1", az="off", ec2_instance_id="false")
    assert aws_off.keys == ()


async def test_v1_sends_no_token_and_a_v2_only_imds_refuses_it() -> None:
    imds = Imds(allow_v1=True)
    async with serve(imds) as url:
        aws = make(url, imds_version="v1")
        try:
            assert (await known(aws))["ec2_instance_id"] == "i-0abc123def4567890"
        finally:
            await aws.close()
    assert [m for m, _, _ in imds.requests] == ["GET", "GET"]
    # IMDSv2 required (the default on new instances): v1's GETs get 401, counted, records pass.
    strict = Imds(allow_v1=False)
    async with serve(strict) as url:
        aws = make(url, imds_version="v1", retry_interval_s=1)
        try:
            await aws.start()
            await wait_until(lambda: errors(aws) >= 1, 5, "a failed attempt")
            assert aws.fields is None
            record = Record("t", 1, {"log": "x"})
            assert aws.process([record])[0].body == {"log": "x"}
            assert without(aws) == 1
        finally:
            await aws.close()


async def test_tags_all_include_exclude_and_tags_off() -> None:
    imds = Imds()
    async with serve(imds) as url:
        cases = [
            ({}, TAGS),
            ({"tags_include": "Name, env"}, {"Name": "node-a", "env": "prod"}),
            ({"tags_exclude": "team,missing"}, {"Name": "node-a", "env": "prod"}),
        ]
        for options, expected in cases:
            aws = make(url, tags_enabled="on", az="off", ec2_instance_id="off", **options)
            try:
                assert await known(aws) == expected, options
            finally:
                await aws.close()
        imds.tags = None  # instance metadata tags off: IMDS answers 404; the other keys still come
        aws = make(url, tags_enabled="on")
        try:
            assert await known(aws) == {"az": "eu-west-1b", "ec2_instance_id": "i-0abc123def4567890"}
        finally:
            await aws.close()
    with pytest.raises(ConfigError, match="tags_include and tags_exclude"):
        make(url, tags_enabled="on", tags_include="a", tags_exclude="b")


async def test_imds_down_at_start_then_up_in_a_running_pipeline(tmp_path: Path) -> None:
    port = free_port()
    filters = f"""
[FILTER]
    name aws
    match *
    retry_interval_s 1
    imds_endpoint http://127.0.0.1:{port}
"""
    dummy = '    name dummy\n    tag d\n    dummy {"log": "hello"}\n    rate 20'
    async with running(tmp_path, dummy, filters=filters) as run:
        await run.wait_records(5)
        # Nothing listens yet: records go on unchanged and are counted.
        assert all(body == {"log": "hello"} for body in run.sink.bodies())
        assert run.metric("kubetrail_aws_records_without_metadata_total") >= 5
        assert run.metric("kubetrail_errors_total", type="imds") >= 1
        async with serve(Imds(), port):
            await wait_until(lambda: run.sink.bodies()[-1].get("az") == "eu-west-1b", 10, "records with the metadata")
            seen = len(run.sink.records)
            await run.wait_records(seen + 3)
    bodies = run.sink.bodies()
    first = next(i for i, body in enumerate(bodies) if "az" in body)
    # Once known, every later record has it; before, none.
    assert all(
        b == {"log": "hello", "az": "eu-west-1b", "ec2_instance_id": "i-0abc123def4567890"} for b in bodies[first:]
    )
    assert all(b == {"log": "hello"} for b in bodies[:first])


@pytest.mark.parametrize(
    ("path", "status", "body", "message"),
    [
        ("/latest/meta-data/instance-id", 500, "internal", "HTTP 500"),
        ("/latest/meta-data/instance-id", 200, "", "empty answer"),
        ("/latest/dynamic/instance-identity/document", 200, "{not json", "not a JSON document"),
        ("/latest/dynamic/instance-identity/document", 200, '{"region": "x"}', "no accountId"),
        ("/latest/meta-data/tags/instance/team", 404, "", "HTTP 404"),
    ],
)
async def test_bad_answers_are_counted_logged_once_and_records_pass(
    path: str, status: int, body: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    imds = Imds(overrides={path: (status, body)})
    async with serve(imds) as url:
        aws = make(url, account_id="on", tags_enabled="on", retry_interval_s=1)
        caplog.set_level(logging.DEBUG, "kubetrail.test")
        try:
            await aws.start()
            await wait_until(lambda: errors(aws) >= 2, 10, "two failed attempts")
            assert aws.fields is None
            assert aws.process([Record("t", 1, {"log": "x"})])[0].body == {"log": "x"}
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1, warnings  # the same problem again is not logged again
            assert message in warnings[0] and path in warnings[0]
            # The answer is fixed: the next attempt succeeds.
            imds.overrides.clear()
            await wait_until(lambda: aws.fields is not None, 10, "the metadata after the fix")
        finally:
            await aws.close()


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="imds_version"):
        make("http://127.0.0.1:1", imds_version="v3")
    with pytest.raises(ConfigError, match="retry_interval_s"):
        make("http://127.0.0.1:1", retry_interval_s=0)
    with pytest.raises(ConfigError, match="imds_endpoint"):
        make("169.254.169.254")


async def test_against_motos_imds() -> None:
    """moto's server mode (a real process; its IMDS answers the token PUT and the basic paths)
    as a second, independent IMDS."""
    from moto.instance_metadata.responses import INSTANCE_METADATA

    from tests.servers import running
    from tests.servers.moto import MotoServer

    with running(MotoServer, "no moto server", build_hint=False) as server:
        for version in ("v2", "v1"):
            options = {k: "on" for k in ("ec2_instance_type", "private_ip", "ami_id", "hostname")}
            aws = make(server.url, imds_version=version, **options)
            try:
                fields = await known(aws, timeout=30)
            finally:
                await aws.close()
            assert fields == {
                "az": INSTANCE_METADATA["placement/availability-zone"],
                "ec2_instance_id": INSTANCE_METADATA["instance-id"],
                "ec2_instance_type": INSTANCE_METADATA["instance-type"],
                "private_ip": INSTANCE_METADATA["local-ipv4"],
                "ami_id": INSTANCE_METADATA["ami-id"],
                "hostname": INSTANCE_METADATA["hostname"],
            }, version
