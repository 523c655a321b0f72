"""The ``cloudwatch_logs`` / ``cloudwatch`` outputs against moto's server mode (a real process).

AWS itself cannot be reached from here, so moto (the AWS API emulator, ``moto[server]``) stands
in: the sink's real aiobotocore client signs and sends real CloudWatch Logs and STS requests to
it, and what was stored is read back with boto3. moto enforces PutLogEvents' chronological
order and its 14-day / 2-hour window; the other call limits are checked on every call the
client makes (a botocore event hook sees the parameters).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest

from kubetrail.core.errors import ConfigError, PermanentError, RetryableError
from kubetrail.core.record import Batch, Record
from kubetrail.runtime.plugins import COMMON_OUTPUT_OPTIONS, SINKS
from kubetrail.sinks import cloudwatch_logs
from kubetrail.sinks.aws_base import Template
from kubetrail.sinks.cloudwatch_logs import CloudWatchLogsSink, CloudWatchSink
from tests.fakes.http_server import Answer, ScriptedServer
from tests.servers import running
from tests.servers.moto import MotoServer
from tests.timing import scaled
from tests.unit.helpers import build, tail_input, write

REGION = "eu-west-1"
HOUR_MS = 3600 * 1000


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with running(MotoServer, "no moto server", build_hint=False) as server:
        yield server


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Only what the test sets: no credentials or config of the machine, no instance metadata.
    for name in ("AWS_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_SESSION_TOKEN",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_STS"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDKUBETRAILTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


@pytest.fixture
def aws(moto: MotoServer, aws_env: None) -> MotoServer:
    moto.reset()
    return moto


def logs(server: MotoServer) -> Any:
    return boto3.client(
        "logs", region_name=REGION, endpoint_url=server.url, aws_access_key_id="x", aws_secret_access_key="x"
    )


def sink(server: MotoServer, cls: type[CloudWatchLogsSink] = CloudWatchLogsSink, **props: Any) -> Any:
    props.setdefault("region", REGION)
    props.setdefault("endpoint", server.url)
    return build(cls, COMMON_OUTPUT_OPTIONS, **props)


def now_ms() -> int:
    return int(time.time() * 1000)


def rec(i: int, ts_ms: int | None = None, tag: str = "kube.app", **body: Any) -> Record:
    base: dict[str, Any] = {"log": f"line {i}", "i": i}
    base.update(body)
    return Record(tag, (ts_ms if ts_ms is not None else now_ms()) * 1_000_000, base)


def stored(server: MotoServer, group: str, stream: str) -> list[dict[str, Any]]:
    client = logs(server)
    events: list[dict[str, Any]] = []
    token = None
    while True:
        kwargs: dict[str, Any] = {"logGroupName": group, "logStreamName": stream, "startFromHead": True}
        if token:
            kwargs["nextToken"] = token
        page = client.get_log_events(**kwargs)
        events += page["events"]
        if not page["events"] or page["nextForwardToken"] == token:
            return events
        token = page["nextForwardToken"]


def watch_calls(out: CloudWatchLogsSink) -> list[dict[str, Any]]:
    """Every PutLogEvents the sink's client makes, as sent (parameters)."""
    calls: list[dict[str, Any]] = []

    def record_call(params: dict[str, Any], **_: Any) -> None:
        calls.append(params)

    out.aws.client.meta.events.register("provide-client-params.cloudwatch-logs.PutLogEvents", record_call)
    return calls


async def test_records_land_in_a_created_group_and_prefixed_stream(aws: MotoServer) -> None:
    out = sink(aws, log_group_name="app-logs", log_stream_prefix="node1-", auto_create_group="on",
               log_retention_days=7)  # fmt: skip
    await out.start()
    try:
        base = now_ms() - 60_000
        await out.write(Batch("kube.app", [rec(i, base + i) for i in range(50)]))
    finally:
        await out.close()
    events = stored(aws, "app-logs", "node1-kube.app")
    assert [orjson.loads(e["message"]) for e in events] == [{"log": f"line {i}", "i": i} for i in range(50)]
    assert [e["timestamp"] for e in events] == [base + i for i in range(50)]
    group = logs(aws).describe_log_groups(logGroupNamePrefix="app-logs")["logGroups"][0]
    assert group["retentionInDays"] == 7


async def test_missing_group_without_auto_create_retries_then_delivers(aws: MotoServer) -> None:
    out = sink(aws, log_group_name="later", log_stream_name="s")
    await out.start()
    try:
        batch = Batch("t", [rec(i) for i in range(3)])
        with pytest.raises(RetryableError, match="'later' does not exist and auto_create_group is off"):
            await out.write(batch)
        logs(aws).create_log_group(logGroupName="later")
        await out.write(batch)  # the runner's retry
    finally:
        await out.close()
    assert [orjson.loads(e["message"])["i"] for e in stored(aws, "later", "s")] == [0, 1, 2]


async def test_calls_respect_count_size_order_and_24h_span(aws: MotoServer) -> None:
    out = sink(aws, log_group_name="g", log_stream_template="$kubernetes['pod']", log_stream_name="fallback",
               auto_create_group="true", log_key="log")  # fmt: skip
    await out.start()
    calls = watch_calls(out)
    now = now_ms()
    records = []
    for i in range(24_000):
        shuffled = i * 7919 % 24_000
        if i % 3:  # stream a: 16,000 events within the last hour: cut by count
            ts = now - HOUR_MS + shuffled * 100
        else:  # stream b: 8,000 events over three days: cut by the 24 h span
            ts = now - 3 * 24 * HOUR_MS + shuffled * (3 * 24 * HOUR_MS // 24_000)
        records.append(rec(i, ts, log=f"m{i}", kubernetes={"pod": "a" if i % 3 else "b"}))
    records.append(rec(-1, now_ms(), log="no pod"))  # the template fails: log_stream_name
    big = [rec(100_000 + i, now_ms() - 1000 + i, log="x" * 100_000, kubernetes={"pod": "big"}) for i in range(25)]
    huge = rec(200_000, now_ms(), log="é" * 200_000, kubernetes={"pod": "huge"})  # 400 KB of UTF-8
    try:
        await out.write(Batch("t", [*records, *big, huge]))
    finally:
        await out.close()
    for call in calls:
        events = call["logEvents"]
        assert 0 < len(events) <= 10_000
        assert sum(len(e["message"].encode()) + 26 for e in events) <= 1_048_576
        stamps = [e["timestamp"] for e in events]
        assert stamps == sorted(stamps)
        assert stamps[-1] - stamps[0] <= 24 * HOUR_MS
    by_stream: dict[str, int] = {}
    for call in calls:
        by_stream[call["logStreamName"]] = by_stream.get(call["logStreamName"], 0) + 1
    assert by_stream["a"] == 2 and by_stream["b"] >= 3 and by_stream["big"] == 3  # 16k events; 3 days; 2.5 MB
    for stream, expected in (("a", [i for i in range(24_000) if i % 3]), ("b", list(range(0, 24_000, 3)))):
        got = stored(aws, "g", stream)
        assert sorted(int(e["message"][1:]) for e in got) == expected  # each once
        assert [e["timestamp"] for e in got] == sorted(e["timestamp"] for e in got)
    assert [e["message"] for e in stored(aws, "g", "fallback")] == ["no pod"]
    assert out._fallbacks.labels("log_stream_template")._value.get() == 1  # counted
    assert len(stored(aws, "g", "big")) == 25
    (cut,) = stored(aws, "g", "huge")
    assert cut["message"] == "é" * (262_118 // 2)  # cut to Fluent Bit's largest event, on a character


async def test_too_old_and_future_events_are_dead_lettered_the_rest_stored(aws: MotoServer) -> None:
    out = sink(aws, log_group_name="g", log_stream_name="s", auto_create_group="on")
    await out.start()
    now = now_ms()
    records = [rec(0, now - 15 * 24 * HOUR_MS), rec(1, now - 1000), rec(2, now + 3 * HOUR_MS), rec(3, now)]
    try:
        with pytest.raises(PermanentError) as info:
            await out.write(Batch("t", [*records, rec(5, now, log=None)]))
    finally:
        await out.close()
    rejected = {record.body["i"]: reason for record, reason in info.value.rejected or []}
    assert set(rejected) == {0, 2}
    assert "older than 14 days" in rejected[0] and "2 hours in the future" in rejected[2]
    assert [orjson.loads(e["message"])["i"] for e in stored(aws, "g", "s")] == [1, 3, 5]


async def test_events_aws_refuses_are_dead_lettered(aws: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # With the local check loosened, moto itself refuses the old event (rejectedLogEventsInfo).
    monkeypatch.setattr(cloudwatch_logs, "MAX_AGE_MS", 30 * 24 * HOUR_MS)
    out = sink(aws, log_group_name="g", log_stream_name="s", auto_create_group="on")
    await out.start()
    now = now_ms()
    try:
        with pytest.raises(PermanentError) as info:
            await out.write(Batch("t", [rec(0, now - 20 * 24 * HOUR_MS), rec(1, now - 10), rec(2, now)]))
    finally:
        await out.close()
    assert [(r.body["i"], reason) for r, reason in info.value.rejected or []] == [
        (0, "CloudWatch Logs refused it: older than 14 days")
    ]
    assert [orjson.loads(e["message"])["i"] for e in stored(aws, "g", "s")] == [1, 2]


async def test_a_retried_batch_does_not_store_twice_what_was_stored(aws: MotoServer) -> None:
    logs(aws).create_log_group(logGroupName="team-a")
    out = sink(aws, log_group_name="team-a", log_group_template="team-$team", log_stream_name="s")
    await out.start()
    batch = Batch("t", [rec(i, team="a" if i < 5 else "b") for i in range(10)])
    try:
        with pytest.raises(RetryableError, match="team-b"):
            await out.write(batch)  # team-a stored, team-b missing
        logs(aws).create_log_group(logGroupName="team-b")
        await out.write(batch)
    finally:
        await out.close()
    assert [orjson.loads(e["message"])["i"] for e in stored(aws, "team-a", "s")] == [0, 1, 2, 3, 4]
    assert [orjson.loads(e["message"])["i"] for e in stored(aws, "team-b", "s")] == [5, 6, 7, 8, 9]


async def test_emf_header_and_metrics_block(aws: MotoServer) -> None:
    out = sink(aws, log_group_name="m", log_stream_name="s", auto_create_group="on", log_format="json/emf",
               metric_namespace="kubetrail", metric_dimensions="node,az;node")  # fmt: skip
    await out.start()
    headers: list[bytes | None] = []

    def seen(request: Any, **_: Any) -> None:
        headers.append(request.headers.get("x-amzn-logs-format"))

    out.aws.client.meta.events.register("before-send.cloudwatch-logs.PutLogEvents", seen)
    now = now_ms()
    try:
        await out.write(Batch("t", [Record("t", now * 1_000_000, {"node": "n1", "az": "z", "cpu_p": 1.5, "up": True})]))
    finally:
        await out.close()
    assert headers == [b"json/emf"]  # as sent on the wire
    (event,) = stored(aws, "m", "s")
    doc = orjson.loads(event["message"])
    assert doc["cpu_p"] == 1.5
    assert doc["_aws"] == {
        "Timestamp": now,
        "CloudWatchMetrics": [
            {"Namespace": "kubetrail", "Dimensions": [["node", "az"], ["node"]], "Metrics": [{"Name": "cpu_p"}]}
        ],
    }


async def test_go_plugin_name_templates_defaults_and_group_tags(aws: MotoServer) -> None:
    assert SINKS["cloudwatch"] is CloudWatchSink
    out = sink(aws, CloudWatchSink, log_group_name="ns-$(kubernetes['namespace_name'])",
               log_stream_name="$(tag[1])-#(kubernetes['pod_name'])", auto_create_group="true",
               new_log_group_tags="team=core,env=test")  # fmt: skip
    await out.start()
    k8s = {"namespace_name": "prod", "pod_name": "web-1"}
    try:
        await out.write(Batch("kube.app", [rec(0, kubernetes=k8s), rec(1)]))  # rec(1): no kubernetes key
    finally:
        await out.close()
    assert [orjson.loads(e["message"])["i"] for e in stored(aws, "ns-prod", "app-web-1")] == [0]
    assert [orjson.loads(e["message"])["i"] for e in stored(aws, "fluentbit-default", "/fluentbit-default")] == [1]
    assert logs(aws).list_tags_log_group(logGroupName="ns-prod")["tags"] == {"team": "core", "env": "test"}


async def test_credentials_from_a_profile_in_the_shared_file(
    aws: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = s\n"
                     "[shipper]\naws_access_key_id = AKIDSHIPPER\naws_secret_access_key = s\n")  # fmt: skip
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    out = sink(aws, log_group_name="g", log_stream_name="s", auto_create_group="on", profile="shipper")
    await out.start()
    try:
        used = out.aws.client._get_credentials()
        assert (await used.get_frozen_credentials()).access_key == "AKIDSHIPPER"
        await out.write(Batch("t", [rec(0)]))
    finally:
        await out.close()
    assert len(stored(aws, "g", "s")) == 1


async def test_role_arn_is_assumed_through_sts_with_external_id(aws: MotoServer) -> None:
    role = "arn:aws:iam::123456789012:role/shipper"
    out = sink(aws, log_group_name="g", log_stream_name="s", auto_create_group="on", role_arn=role,
               external_id="ext-1", sts_endpoint=aws.url)  # fmt: skip
    await out.start()
    try:
        used = out.aws.client._get_credentials()
        frozen = await used.get_frozen_credentials()
        assert frozen.access_key != "AKIDKUBETRAILTEST" and frozen.token  # moto's STS answered
        assert used.method == "assume-role"
        await out.write(Batch("t", [rec(0)]))
    finally:
        await out.close()
    assert len(stored(aws, "g", "s")) == 1


async def test_web_identity_irsa_from_the_environment(
    aws: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6a3ViZXRyYWlsIn0.c2ln")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/irsa")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", aws.url)
    out = sink(aws, log_group_name="g", log_stream_name="s", auto_create_group="on")
    await out.start()
    try:
        used = out.aws.client._get_credentials()
        assert used.method == "assume-role-with-web-identity"
        await out.write(Batch("t", [rec(0)]))
    finally:
        await out.close()
    assert len(stored(aws, "g", "s")) == 1


async def test_no_credentials_is_a_retryable_error_saying_where_it_looked(
    aws: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    out = sink(aws, log_group_name="g", log_stream_name="s")
    await out.start()
    try:
        with pytest.raises(RetryableError, match=r"no usable AWS credentials.*web identity"):
            await out.write(Batch("t", [rec(0)]))
    finally:
        await out.close()


async def test_unreachable_endpoint_is_retryable(aws: MotoServer) -> None:
    out = sink(aws, log_group_name="g", log_stream_name="s", endpoint="http://127.0.0.1:1")
    await out.start()
    try:
        with pytest.raises(RetryableError, match="CreateLogStream g/s"):
            await out.write(Batch("t", [rec(0)]))
    finally:
        await out.close()


@pytest.mark.parametrize(
    ("props", "key"),
    [
        ({"log_group_name": "g", "log_stream_name": "s", "region": ""}, "region"),
        ({"log_stream_name": "s"}, "log_group_name"),
        ({"log_group_name": "g"}, "log_stream_name"),
        ({"log_group_name": "g", "log_stream_name": "s", "log_stream_prefix": "p"}, "log_stream_prefix"),
        ({"log_group_name": "g", "log_stream_name": "s", "log_retention_days": "8"}, "log_retention_days"),
        ({"log_group_name": "g", "log_stream_name": "s", "log_format": "xml"}, "log_format"),
        ({"log_group_name": "g", "log_stream_name": "s", "endpoint": "http://"}, "endpoint"),
    ],
)
def test_config_errors_name_the_key(props: dict[str, str], key: str) -> None:
    props.setdefault("region", REGION)
    with pytest.raises(ConfigError) as info:
        build(CloudWatchLogsSink, COMMON_OUTPUT_OPTIONS, **props)
    assert info.value.key == key


# -- answers moto does not give on demand: a scripted server speaking CloudWatch Logs' JSON protocol --


def cw_error(status: int, code: str, message: str, **extra: Any) -> Answer:
    body = orjson.dumps({"__type": code, "message": message, **extra})
    return Answer(status, body, "application/x-amz-json-1.1")


@pytest.fixture
async def scripted() -> Any:
    server = await ScriptedServer().start()
    yield server
    await server.stop()


def puts(server: ScriptedServer) -> list[dict[str, Any]]:
    return [
        orjson.loads(r.body) for r in server.requests if r.headers.get("X-Amz-Target", "").endswith(".PutLogEvents")
    ]


def scripted_sink(server: ScriptedServer, answers: dict[str, list[Answer]]) -> CloudWatchLogsSink:
    def handler(request: Any) -> Answer:
        target = request.headers.get("X-Amz-Target", "").rsplit(".", 1)[-1]
        queue = answers.get(target) or []
        return queue.pop(0) if queue else Answer(200, b"{}", "application/x-amz-json-1.1")

    server.handler = handler
    return build(CloudWatchLogsSink, COMMON_OUTPUT_OPTIONS, region=REGION, endpoint=server.url,  # type: ignore[no-any-return]
                 log_group_name="g", log_stream_name="s", auto_retry_requests="off",
                 extra_user_agent="container-insights")  # fmt: skip


async def test_old_sequence_token_answers(aws_env: None, scripted: ScriptedServer) -> None:
    message = "The given sequenceToken is invalid. The next expected sequenceToken is: 4961"
    out = scripted_sink(scripted, {"PutLogEvents": [
        cw_error(400, "InvalidSequenceTokenException", message, expectedSequenceToken="4961"),
        Answer(200, b'{"nextSequenceToken": "4962"}', "application/x-amz-json-1.1"),
        cw_error(400, "DataAlreadyAcceptedException", "already accepted"),
    ]})  # fmt: skip
    await out.start()
    try:
        await out.write(Batch("t", [rec(0)]))  # token refused, resent with the expected one
        await out.write(Batch("t", [rec(1)]))  # "already accepted": delivered, not resent
    finally:
        await out.close()
    sent = puts(scripted)
    assert all("container-insights" in r.headers["User-Agent"] for r in scripted.requests)  # extra_user_agent
    assert [p.get("sequenceToken") for p in sent] == [None, "4961", None]
    assert [orjson.loads(p["logEvents"][0]["message"])["i"] for p in sent] == [0, 0, 1]


async def test_throttling_and_5xx_retry_a_bad_request_is_rejected(aws_env: None, scripted: ScriptedServer) -> None:
    out = scripted_sink(scripted, {"PutLogEvents": [
        cw_error(400, "ThrottlingException", "Rate exceeded"),
        cw_error(503, "ServiceUnavailableException", "try later"),
        cw_error(403, "AccessDeniedException", "not allowed"),
        cw_error(400, "InvalidParameterException", "bad event"),
    ]})  # fmt: skip
    await out.start()
    try:
        for expected in ("ThrottlingException", "ServiceUnavailableException", "AccessDeniedException"):
            with pytest.raises(RetryableError, match=expected):
                await out.write(Batch("t", [rec(0)]))
        with pytest.raises(PermanentError, match=r"InvalidParameterException.*bad event"):
            await out.write(Batch("t", [rec(0)]))
    finally:
        await out.close()


def tail_offset(db: Path) -> int:
    try:
        with sqlite3.connect(db) as conn:
            return int(next(iter(conn.execute("select offset from in_tail_files")), (0,))[0])
    except sqlite3.OperationalError:
        return 0


def test_kubetrail_checkpoints_only_what_cloudwatch_stored(aws: MotoServer, tmp_path: Path) -> None:
    """A real kubetrail process: while the log group is missing nothing is acknowledged (the tail
    checkpoint stays at 0); once it exists, every line is stored once and the checkpoint moves."""
    log = write(tmp_path / "app.log", "".join(f'{{"n": {i}}}\n' for i in range(300)))
    config = write(tmp_path / "p.conf", f"""
[SERVICE]
    grace 5
    scheduler.base 0.2
    scheduler.cap 0.5
{tail_input(log, db=tmp_path / "tail.db", exit_on_eof=None)}
[OUTPUT]
    name cloudwatch_logs
    match *
    region {REGION}
    endpoint {aws.url}
    log_group_name late-group
    log_stream_prefix node-
""")  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr or []), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + scaled(60)
        while not any("auto_create_group is off" in line for line in err) and time.monotonic() < deadline:
            assert proc.poll() is None, "".join(err)[-2000:]
            time.sleep(0.1)
        assert any("auto_create_group is off" in line for line in err), "".join(err)[-2000:]  # says why it waits
        time.sleep(1)  # a few more retries
        assert tail_offset(tmp_path / "tail.db") == 0  # nothing acknowledged while CloudWatch refuses
        logs(aws).create_log_group(logGroupName="late-group")
        deadline = time.monotonic() + scaled(90)
        while tail_offset(tmp_path / "tail.db") < log.stat().st_size and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tail_offset(tmp_path / "tail.db") == log.stat().st_size, "".join(err)[-2000:]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        reader.join(timeout=10)
    assert proc.returncode == 0, "".join(err)[-2000:]
    events = stored(aws, "late-group", "node-app")
    assert sorted(orjson.loads(e["message"])["n"] for e in events) == list(range(300))


async def test_metric_records_become_emf_metrics(aws: MotoServer) -> None:
    out = sink(aws, log_group_name="m", log_stream_name="s", auto_create_group="on", log_format="json/emf",
               metric_namespace="kubetrail")  # fmt: skip
    await out.start()
    now = now_ms()
    sample = {"name": "kubetrail_records_in_total", "type": "counter",
              "labels": {"component": "tail.0", "plugin": "tail"}, "value": 1200.0}  # fmt: skip
    try:
        await out.write(Batch("metrics", [Record("metrics", now * 1_000_000, sample)]))
    finally:
        await out.close()
    (event,) = stored(aws, "m", "s")
    assert orjson.loads(event["message"]) == {
        "component": "tail.0",
        "plugin": "tail",
        "kubetrail_records_in_total": 1200.0,
        "_aws": {
            "Timestamp": now,
            "CloudWatchMetrics": [
                {
                    "Namespace": "kubetrail",
                    "Dimensions": [["component", "plugin"]],
                    "Metrics": [{"Name": "kubetrail_records_in_total"}],
                }
            ],
        },
    }


async def test_a_stream_aws_refuses_rejects_only_its_events(aws_env: None, scripted: ScriptedServer) -> None:
    def handler(request: Any) -> Answer:
        target = request.headers.get("X-Amz-Target", "").rsplit(".", 1)[-1]
        if target == "CreateLogStream" and orjson.loads(request.body)["logStreamName"] == "bad:name":
            return cw_error(400, "InvalidParameterException", "1 validation error: logStreamName must not contain :")
        return Answer(200, b"{}", "application/x-amz-json-1.1")

    out = scripted_sink(scripted, {})
    scripted.handler = handler
    out.stream_template = Template("$stream", "log_stream_template")
    await out.start()
    try:
        with pytest.raises(PermanentError) as info:
            await out.write(Batch("t", [rec(0, stream="ok"), rec(1, stream="bad:name"), rec(2, stream="ok")]))
    finally:
        await out.close()
    ((record, reason),) = info.value.rejected or []
    assert record.body["i"] == 1 and "CreateLogStream g/bad:name" in reason and "must not contain" in reason
    assert [[orjson.loads(e["message"])["i"] for e in p["logEvents"]] for p in puts(scripted)] == [[0, 2]]
