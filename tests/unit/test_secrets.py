"""``${file:/path}`` credentials (kubetrail/core/secrets.py): start-up errors, rotation through a
Kubernetes-style ``..data`` symlink swap, a file gone bad later, and how every credential option
of the sinks and sources reads them.

The Secret volume is laid out as the kubelet's AtomicWriter does (a timestamped directory, the
``..data`` symlink to it, one symlink per key into ``..data``; an update writes a new directory
and renames a new ``..data`` link over the old one), so the swap seen here is the one a pod sees.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kubetrail.core import secrets
from kubetrail.core.errors import ConfigError
from kubetrail.core.metrics import MetricsRegistry
from kubetrail.core.secrets import Secret, reveal
from kubetrail.sinks.es import EsSink
from kubetrail.sinks.forward import ForwardSink
from kubetrail.sinks.http import HttpOutputSink
from kubetrail.sinks.splunk import SplunkSink
from kubetrail.sources.forward import ForwardSource
from tests.unit.helpers import build, write


def secret_volume(directory: Path, data: dict[str, str]) -> Path:
    """Write (or update) a Secret volume the way the kubelet does; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir()
    for key, value in data.items():
        (stamp / key).write_text(value)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    os.symlink(stamp.name, directory / "..data_tmp")
    os.rename(directory / "..data_tmp", directory / "..data")  # the atomic swap
    for key in data:
        if not (directory / key).is_symlink():
            os.symlink(f"..data/{key}", directory / key)
    if old is not None:
        for child in (directory / old).iterdir():
            child.unlink()
        (directory / old).rmdir()
    return directory


def after_check_interval() -> None:
    time.sleep(secrets.CHECK_INTERVAL + 0.05)


def test_value_follows_an_atomic_symlink_swap_checked_at_most_once_a_second(tmp_path: Path) -> None:
    volume = secret_volume(tmp_path / "es", {"password": "first\n"})
    value = secrets.parse_secret(f"${{file:{volume}/password}}", "http_passwd")
    assert isinstance(value, Secret)
    assert reveal(value) == "first"  # the trailing newline of a file saved by an editor is not part of it
    secret_volume(volume, {"password": "second"})
    assert reveal(value) == "first"  # read at start: the next stat is due only a second later
    after_check_interval()
    assert reveal(value) == "second"
    assert value.files[0].version == 1


def test_literal_text_and_several_files_in_one_value(tmp_path: Path) -> None:
    volume = secret_volume(tmp_path / "s", {"a": "one", "b": " two "})
    value = secrets.parse_secret(f"x ${{file:{volume}/a}}:${{file:{volume}/b}} y", "header")
    assert reveal(value) == "x one: two  y"  # only line breaks are stripped
    assert secrets.parse_secret("plain", "header") == "plain"


def test_derived_values_are_recomputed_only_after_a_change(tmp_path: Path) -> None:
    volume = secret_volume(tmp_path / "s", {"user": "alice", "password": "a"})
    user = secrets.parse_secret(f"${{file:{volume}/user}}", "http_user")
    password = secrets.parse_secret(f"${{file:{volume}/password}}", "http_passwd")
    calls: list[tuple[str, str]] = []

    def basic(u: str, p: str) -> str:
        calls.append((u, p))
        return f"{u}:{p}"

    derived = secrets.derive(basic, user, password)
    assert [reveal(derived), reveal(derived)] == ["alice:a", "alice:a"]
    assert calls == [("alice", "a")]
    secret_volume(volume, {"user": "bob", "password": "b"})
    after_check_interval()
    assert reveal(derived) == "bob:b"
    assert secrets.derive(basic, "u", None) == "u:"  # no file: a plain string, computed once


@pytest.mark.parametrize(
    ("setup", "problem"),
    [
        (lambda p: None, "No such file or directory"),
        (lambda p: p.write_text("\n"), "is empty"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b"x" * (secrets.MAX_BYTES + 1)), "larger than 1 MiB"),
        (lambda p: p.write_bytes(b"\xff\xfe"), "not UTF-8"),
        (lambda p: p.write_text("first\nsecond\n"), "has more than one line"),
    ],
)
def test_a_bad_file_at_start_names_the_option_and_the_path(tmp_path: Path, setup: Any, problem: str) -> None:
    path = tmp_path / "password"
    setup(path)
    with pytest.raises(ConfigError) as info:
        build(HttpOutputSink, host="127.0.0.1", http_user="u", http_passwd=f"${{file:{path}}}")
    assert info.value.key == "http_passwd"
    assert str(path) in info.value.message and problem in info.value.message


def test_unreadable_file_at_start(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads a file whatever its mode")
    path = write(tmp_path / "token", "t")
    path.chmod(0)
    with pytest.raises(ConfigError, match="Permission denied"):
        build(HttpOutputSink, host="127.0.0.1", bearer_token=f"${{file:{path}}}")


@pytest.mark.parametrize("text", ["${file:}", "${file:/x", "Bearer ${file:  }"])
def test_malformed_references(text: str) -> None:
    with pytest.raises(ConfigError, match=r"\$\{file:/path/to/secret\}"):
        build(HttpOutputSink, host="127.0.0.1", bearer_token=text)


def test_a_reference_in_an_option_that_is_no_credential_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "host", "example.org")
    with pytest.raises(ConfigError) as info:
        build(HttpOutputSink, host=f"${{file:{path}}}")
    assert info.value.key == "host"
    assert "only in credential options" in info.value.message
    assert "bearer_token, header, http_passwd, http_user" in info.value.message


def test_kafka_reads_files_only_for_sasl_credentials(tmp_path: Path) -> None:
    from kubetrail.sinks.kafka import KafkaSink

    path = write(tmp_path / "p", "secret")
    with pytest.raises(ConfigError) as info:
        build(KafkaSink, brokers="127.0.0.1:1", rdkafka__ssl__key__password=f"${{file:{path}}}")
    assert info.value.key == "rdkafka.ssl.key.password"
    assert "sasl.username and rdkafka.sasl.password" in info.value.message
    sink = build(KafkaSink, brokers="127.0.0.1:1", rdkafka__sasl__password=f"${{file:{path}}}")
    assert sink.sasl.rotating and sink.sasl.current() == ("", "secret")


def test_a_file_gone_bad_later_keeps_the_last_good_value_logs_once_and_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    volume = secret_volume(tmp_path / "s", {"token": "good"})
    value = secrets.parse_secret(f"${{file:{volume}/token}}", "bearer_token")
    registry = MetricsRegistry()
    logger = logging.getLogger("kubetrail.test.secrets")
    secrets.bind({"bearer_token": value}, logger, registry.component("http.0", "sink", "http"))
    caplog.set_level(logging.INFO, logger="kubetrail.test.secrets")
    target = volume / os.readlink(volume / "..data") / "token"
    for content in ("", "still empty\n"[:0]):  # emptied twice: one problem, logged once
        target.write_text(content)
        os.utime(target, ns=(time.time_ns(), time.time_ns()))
        after_check_interval()
        assert reveal(value) == "good"
    target.unlink()  # a different problem: logged too
    after_check_interval()
    assert reveal(value) == "good"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, [r.getMessage() for r in errors]
    assert "is empty" in errors[0].getMessage() and "No such file" in errors[1].getMessage()
    assert errors[0].__dict__["option"] == "bearer_token" and errors[0].__dict__["path"] == f"{volume}/token"
    labels = {"component": "http.0", "kind": "sink", "plugin": "http", "option": "bearer_token"}
    assert registry.registry.get_sample_value("kubetrail_secret_reload_errors_total", labels) == 3
    secret_volume(volume, {"token": "rotated"})
    after_check_interval()
    assert reveal(value) == "rotated"
    assert registry.registry.get_sample_value("kubetrail_secret_reloads_total", labels) == 1
    assert any("readable again" in r.getMessage() for r in caplog.records)


def test_http_family_headers_follow_the_files(tmp_path: Path) -> None:
    volume = secret_volume(tmp_path / "s", {"user": "alice", "password": "a", "key": "k1", "token": "t1"})

    def auth(sink: Any) -> list[str]:
        return [reveal(v) or "" for n, v in sink.http.settings.headers if n.lower() == "authorization"]

    http = build(
        HttpOutputSink,
        host="127.0.0.1",
        http_user=f"${{file:{volume}/user}}",
        http_passwd=f"${{file:{volume}/password}}",
        header=[f"Authorization2 Bearer ${{file:{volume}/token}}", "X-Plain v"],
    )
    es = build(EsSink, host="127.0.0.1", http_api_key=f"${{file:{volume}/key}}")
    splunk = build(SplunkSink, host="127.0.0.1", splunk_token=f"${{file:{volume}/token}}")
    assert auth(http) == ["Basic " + base64.b64encode(b"alice:a").decode()]
    assert [(n, reveal(v)) for n, v in http.http.settings.headers[1:]] == [
        ("Authorization2", "Bearer t1"),
        ("X-Plain", "v"),
    ]
    assert auth(es) == ["ApiKey k1"] and auth(splunk) == ["Splunk t1"]
    secret_volume(volume, {"user": "bob", "password": "b", "key": "k2", "token": "t2"})
    after_check_interval()
    assert auth(http) == ["Basic " + base64.b64encode(b"bob:b").decode()]
    assert reveal(http.http.settings.headers[1][1]) == "Bearer t2"
    assert auth(es) == ["ApiKey k2"] and auth(splunk) == ["Splunk t2"]


def test_header_name_must_be_written_in_the_config(tmp_path: Path) -> None:
    path = write(tmp_path / "h", "Authorization Bearer x")
    with pytest.raises(ConfigError, match="header name before"):
        build(HttpOutputSink, host="127.0.0.1", header=f"${{file:{path}}}")


def test_elastic_cloud_auth_from_a_file(tmp_path: Path) -> None:
    volume = secret_volume(tmp_path / "s", {"auth": "elastic:pw1"})
    cloud_id = "name:" + base64.b64encode(b"example.org$es1$kb1").decode()
    es = build(EsSink, cloud_id=cloud_id, cloud_auth=f"${{file:{volume}/auth}}")
    header = dict(es.http.settings.headers)["Authorization"]
    assert reveal(header) == "Basic " + base64.b64encode(b"elastic:pw1").decode()
    secret_volume(volume, {"auth": "other:pw2"})
    after_check_interval()
    assert reveal(header) == "Basic " + base64.b64encode(b"other:pw2").decode()
    write(tmp_path / "bad", "no-colon")
    with pytest.raises(ConfigError, match="USER:PASSWORD"):
        build(EsSink, cloud_id=cloud_id, cloud_auth=f"${{file:{tmp_path}/bad}}")


def test_forward_output_and_input_credentials(tmp_path: Path) -> None:
    volume = secret_volume(tmp_path / "s", {"key": "k1", "users": "alice pw1"})
    out = build(
        ForwardSink,
        shared_key=f"${{file:{volume}/key}}",
        username="alice",
        password=f"${{file:{volume}/users}}",
    )
    source = build(ForwardSource, shared_key=f"${{file:{volume}/key}}", security__users=f"${{file:{volume}/users}}")
    assert reveal(out.shared_key) == "k1" and source.users == {"alice": "pw1"}
    secret_volume(volume, {"key": "k2", "users": "bob pw2"})
    after_check_interval()
    assert reveal(out.shared_key) == "k2" and reveal(source.shared_key) == "k2"
    assert source._users() == {"bob": "pw2"}


def test_check_shows_the_reference_never_the_secret_and_exits_2_on_a_missing_file(tmp_path: Path) -> None:
    volume = secret_volume(tmp_path / "s", {"password": "hunter2"})
    config = write(
        tmp_path / "k.conf",
        f"""[INPUT]
    name dummy
[OUTPUT]
    name http
    match *
    http_user alice
    http_passwd ${{file:{volume}/password}}
""",
    )
    command = [sys.executable, "-m", "kubetrail.cli.main", "check", "-c", str(config)]
    ok = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert f"${{file:{volume}/password}}" in ok.stdout and "hunter2" not in ok.stdout + ok.stderr
    config.write_text(config.read_text().replace("/password}", "/passwd}"))
    bad = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert f"{config}:7: 'http_passwd': credential file: cannot read {volume}/passwd: No such file" in bad.stderr


def test_yaml_config_reads_the_same_reference(tmp_path: Path) -> None:
    volume = secret_volume(tmp_path / "s", {"token": "t0k3n"})
    config = write(
        tmp_path / "k.yaml",
        f"""pipeline:
  inputs:
    - name: dummy
  outputs:
    - name: loki
      match: '*'
      bearer_token: ${{file:{volume}/token}}
      header: ['X-Scope-OrgID tenant1', 'X-Extra ${{file:{volume}/token}}']
""",
    )
    result = subprocess.run(
        [sys.executable, "-m", "kubetrail.cli.main", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"bearer_token: ${{file:{volume}/token}}" in result.stdout
    assert "t0k3n" not in result.stdout
