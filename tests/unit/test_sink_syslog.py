"""The syslog sink against a real rsyslogd (Debian's rsyslog, installed by scripts/setup).

What rsyslog parsed out of each message (its own RFC 5424/3164 parser) is compared with the
records sent. Skipped with a message when rsyslogd is not installed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kubetrail.core.errors import ConfigError, PermanentError, RetryableError
from kubetrail.core.metrics import MetricsRegistry
from kubetrail.core.record import Batch, Record
from kubetrail.runtime.plugins import COMMON_OUTPUT_OPTIONS
from kubetrail.runtime.sink_runner import SinkRunner
from kubetrail.sinks.syslog import SyslogSink
from tests.servers import rsyslog
from tests.unit.helpers import build

pytestmark = pytest.mark.skipif(
    rsyslog.rsyslogd() is None, reason="rsyslogd not installed: run scripts/setup (apt-get install rsyslog)"
)

T0 = 1_704_164_645_123_456_789  # 2024-01-02T03:04:05.123456789Z


@pytest.fixture
def server(tmp_path: Path) -> Any:
    srv = rsyslog.RsyslogServer(tmp_path / "rsyslog")
    try:
        yield srv
    finally:
        srv.stop()


def sink(**props: Any) -> SyslogSink:
    return build(SyslogSink, COMMON_OUTPUT_OPTIONS, **props)  # type: ignore[no-any-return]


def rec(i: int, **body: Any) -> Record:
    base = {"log": f"line {i}", "id": f"r{i}"}
    base.update(body)
    return Record("app", T0 + i * 1000, base, identity=(f"r{i}",))


def by_id(received: list[dict[str, Any]]) -> Counter[str]:
    return Counter(item["msg"].split(" ", 1)[1] for item in received)


async def test_rfc5424_over_tcp_fields_parsed_by_rsyslog(server: rsyslog.RsyslogServer) -> None:
    server.start()
    out = sink(
        mode="tcp",
        port=server.tcp_port,
        syslog_message_key="log",
        syslog_hostname_key="host",
        syslog_appname_key="app",
        syslog_procid_key="pid",
        syslog_msgid_key="msgid",
        syslog_severity_key="level",
        syslog_facility_key="fac",
        syslog_sd_key=["k8s@32473", "extra@1"],
    )
    await out.start()
    records = [
        rec(
            0,
            log="first\nsecond line",  # a newline survives octet counting
            host="node-1",
            app="kubelet",
            pid=4242,
            msgid="ID47",
            level="warning",
            fac="local3",
            **{"k8s@32473": {"namespace": "default", "pod": 'we"ird]'}},
        ),
        rec(1, log="plain", level=3, fac=0),  # missing keys: presets and nil values
        rec(2, log="ünïcode ✓", level="nonsense"),
    ]
    await out.write(Batch("app", records))
    got = server.wait_for(3)
    await out.close()
    assert len(got) == 3, got
    first, second, third = got
    assert first["version"] == "1"
    assert first["timestamp"] == "2024-01-02T03:04:05.123456Z"
    assert (first["hostname"], first["appname"], first["procid"], first["msgid"]) == (
        "node-1",
        "kubelet",
        "4242",
        "ID47",
    )
    assert (first["facility"], first["severity"]) == ("19", "4")
    assert first["sd"] == '[k8s@32473 namespace="default" pod="we\\"ird\\]"]'
    assert first["msg"] == "first\nsecond line"
    assert (second["facility"], second["severity"], second["pri"]) == ("0", "3", "3")
    # (a nil HOSTNAME is replaced by rsyslog with the sender's name, so it is not compared)
    assert (second["appname"], second["procid"], second["msgid"], second["sd"]) == ("-", "-", "-", "-")
    assert third["msg"] == "ünïcode ✓"
    assert (third["facility"], third["severity"]) == ("1", "6")  # unparseable severity -> preset


async def test_whole_record_as_json_when_no_message_key(server: rsyslog.RsyslogServer) -> None:
    server.start()
    out = sink(mode="tcp", port=server.tcp_port, syslog_hostname_preset="h1", syslog_appname_preset="kubetrail")
    await out.write(Batch("app", [rec(7)]))
    got = server.wait_for(1)
    await out.close()
    assert got[0]["msg"] == '{"log":"line 7","id":"r7"}'
    assert (got[0]["hostname"], got[0]["appname"]) == ("h1", "kubetrail")


async def test_rfc3164_over_udp(server: rsyslog.RsyslogServer) -> None:
    server.start()
    out = sink(
        mode="udp",
        port=server.udp_port,
        syslog_format="rfc3164",
        syslog_message_key="log",
        syslog_hostname_key="host",
        syslog_appname_key="app",
        syslog_procid_key="pid",
        syslog_severity_key="level",
    )
    await out.start()
    await out.write(Batch("app", [rec(i, host="n1", app="kubelet", pid=9, level="err") for i in range(5)]))
    got = server.wait_for(5)
    await out.close()
    assert len(got) == 5
    assert {g["input"] for g in got} == {"udp"}
    first = next(g for g in got if g["msg"].strip() == "line 0")
    assert (first["hostname"], first["appname"], first["procid"], first["severity"]) == ("n1", "kubelet", "9", "3")
    assert first["timestamp"].endswith("01-02T03:04:05+00:00")  # RFC 3164 has no year and no fraction


async def test_maxsize_truncates(server: rsyslog.RsyslogServer) -> None:
    server.start()
    out = sink(mode="tcp", port=server.tcp_port, syslog_message_key="log", syslog_maxsize=100)
    await out.write(Batch("app", [rec(0, log="x" * 500), rec(1, log="short")]))
    got = server.wait_for(2)
    await out.close()
    header_len = len(out.format(rec(0, log="")))
    assert got[0]["msg"] == "x" * (100 - header_len)
    assert got[1]["msg"] == "short"


@pytest.mark.skipif(not rsyslog.gtls_available(), reason="rsyslog-gnutls not installed (scripts/setup)")
async def test_tls(server: rsyslog.RsyslogServer) -> None:
    server.start(tls=True)
    assert server.tls_port is not None and server.ca_file is not None
    out = sink(
        mode="tls",
        port=server.tls_port,
        tls="on",
        tls__ca_file=str(server.ca_file),
        tls__vhost="localhost",
        syslog_message_key="log",
    )
    await out.write(Batch("app", [rec(i) for i in range(3)]))
    got = server.wait_for(3)
    await out.close()
    assert [g["msg"] for g in got] == ["line 0", "line 1", "line 2"]
    assert {g["input"] for g in got} == {"tls"}
    # A client that does not trust the server's CA is refused, retryably, naming the endpoint.
    bad = sink(mode="tls", port=server.tls_port, tls="on", syslog_message_key="log")
    with pytest.raises(RetryableError, match=f"TLS handshake with tls://127.0.0.1:{server.tls_port}"):
        await bad.write(Batch("app", [rec(9)]))
    await bad.close()


async def test_server_down_then_back_loses_nothing(server: rsyslog.RsyslogServer) -> None:
    """rsyslog stopped between batches and started again on the same port: every record
    arrives exactly once, the batches sent while it was down after retries."""
    server.start()
    out = sink(mode="tcp", port=server.tcp_port, syslog_message_key="log", **{"net.connect_timeout": "2s"})
    metrics = MetricsRegistry().component("syslog.0", "output", "syslog")
    runner = SinkRunner(out, "syslog.0", metrics, logging.getLogger("test"), None, backoff_base=0.05)
    runner.start()
    await runner.enqueue(Batch("app", [rec(i) for i in range(0, 50)]))
    await asyncio.to_thread(server.wait_for, 50)
    await asyncio.to_thread(server.stop)
    for start in (50, 100, 150):
        await runner.enqueue(Batch("app", [rec(i) for i in range(start, start + 50)]))
    await asyncio.sleep(1.0)  # several failed attempts while it is down
    assert metrics.retries._value.get() >= 2
    await asyncio.to_thread(server.start)
    await asyncio.wait_for(runner.drain(), 60)
    await out.close()
    got = by_id(server.wait_for(200))
    assert got == Counter({f"{i}": 1 for i in range(200)})


async def test_unformattable_record_rejected_alone(server: rsyslog.RsyslogServer) -> None:
    server.start()
    out = sink(mode="tcp", port=server.tcp_port, syslog_message_key="log", syslog_sd_key="sd")
    bad = rec(1, sd="not a map")
    with pytest.raises(PermanentError) as info:
        await out.write(Batch("app", [rec(0, sd={"a": 1}), bad, rec(2)]))
    assert info.value.rejected is not None
    assert [r for r, _ in info.value.rejected] == [bad]
    assert "syslog_sd_key 'sd' must be a map" in info.value.rejected[0][1]
    got = server.wait_for(2)
    await out.close()
    assert [g["msg"] for g in got] == ["line 0", "line 2"]
    assert got[0]["sd"] == '[sd a="1"]'


async def test_connection_refused_is_retryable() -> None:
    port = rsyslog.free_port()
    out = sink(mode="tcp", port=port, **{"net.connect_timeout": "2s"})
    with pytest.raises(RetryableError, match=f"cannot connect to tcp://127.0.0.1:{port}"):
        await out.write(Batch("app", [rec(0)]))


@pytest.mark.parametrize(
    ("props", "key"),
    [
        ({"mode": "sctp"}, "mode"),
        ({"syslog_format": "rfc9999"}, "syslog_format"),
        ({"syslog_maxsize": "ten"}, "syslog_maxsize"),
        ({"syslog_maxsize": "10"}, "syslog_maxsize"),
        ({"syslog_severity_preset": "9"}, "syslog_severity_preset"),
        ({"syslog_facility_preset": "24"}, "syslog_facility_preset"),
        ({"port": "70000"}, "port"),
        ({"tls": "on"}, "tls"),
        ({"mode": "tls", "tls.ca_file": "/nonexistent/ca.pem"}, "tls.ca_file"),
        ({"syslog_unknown_key": "x"}, "syslog_unknown_key"),
    ],
)
def test_bad_config(props: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        sink(**{k.replace(".", "__"): v for k, v in props.items()})
    assert info.value.key == key
