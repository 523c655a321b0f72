"""The command line, run as a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson

from tests.fakes.http_server import ScriptedServer
from tests.timing import scaled, wait_for
from tests.unit.helpers import write

REPO = Path(__file__).resolve().parents[2]
DEMO_LOG = REPO / "tests" / "fixtures" / "audit2rbac" / "demo.log"  # see tests/fixtures/NOTICE.md


def kubetrail(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetrail.cli.main", *args], capture_output=True, text=True, timeout=60, **kwargs
    )  # type: ignore[call-overload]


def test_version_and_help() -> None:
    assert kubetrail("version").stdout.strip().startswith("kubetrail ")
    for command in ("run", "check", "convert", "plugins"):
        result = kubetrail(command, "--help")
        assert result.returncode == 0 and "Usage:" in result.stdout


def test_plugins_lists_options_with_defaults() -> None:
    out = kubetrail("plugins").stdout
    for plugin in ("input tail", "filter grep", "filter modify", "output stdout", "output file"):
        assert plugin in out
    assert "read_from_head" in out and "(default: False)" in out and "retry_limit" in out


def test_config_errors_exit_2_with_location(tmp_path: Path) -> None:
    config = write(
        tmp_path / "bad.conf",
        "[INPUT]\n    name tail\n    path /x\n    colour red\n[OUTPUT]\n    name stdout\n    match *\n",
    )
    for command in ("run", "check"):
        result = kubetrail(command, "-c", str(config))
        assert result.returncode == 2
        assert f"{config}:4: 'colour': unknown property" in result.stderr


def test_check_prints_the_resolved_pipeline(tmp_path: Path) -> None:
    config = write(
        tmp_path / "ok.yaml",
        "pipeline:\n  inputs:\n    - name: tail\n      path: /x\n  outputs:\n    - name: stdout\n      match: '*'\n",
    )
    result = kubetrail("check", "-c", str(config))
    assert result.returncode == 0 and "id: tail.0" in result.stdout and "format: msgpack" in result.stdout


def _demo_classic(tmp_path: Path) -> Path:
    write(
        tmp_path / "parsers.conf",
        "[PARSER]\n    Name audit\n    Format json\n    Time_Key stageTimestamp\n"
        "    Time_Format %Y-%m-%dT%H:%M:%S.%LZ\n    Time_Keep On\n",
    )
    write(
        tmp_path / "outputs.conf",
        "[OUTPUT]\n    Name file\n    Match audit.*\n    Path ${OUT}\n"
        "    File audit.jsonl\n    Format plain\n    Mkdir On\n",
    )
    return write(
        tmp_path / "demo.conf",
        f"""
[SERVICE]
    Log_Level warn
    Parsers_File parsers.conf
[INPUT]
    Name tail
    Path {DEMO_LOG}
    Tag audit.*
    Read_From_Head On
    Exit_On_Eof On
    Parser audit
[FILTER]
    Name grep
    Match audit.*
    Regex verb ^(list|get|create)$
[FILTER]
    Name modify
    Match audit.*
    Rename impersonatedUser impersonated
    Add cluster demo
@INCLUDE outputs.conf
""",
    )


def test_end_to_end_classic_and_yaml_twin_give_the_same_output(tmp_path: Path) -> None:
    classic = _demo_classic(tmp_path)
    converted = kubetrail("convert", str(classic), env={**os.environ, "OUT": "/unused"})
    assert converted.returncode == 0, converted.stderr
    yaml_twin = write(tmp_path / "demo.yaml", converted.stdout.replace("/unused", "${OUT}"))
    outputs = []
    for name, config in (("classic", classic), ("yaml", yaml_twin)):
        out_dir = tmp_path / name
        result = kubetrail("run", "-c", str(config), env={**os.environ, "OUT": str(out_dir)})
        assert result.returncode == 0, result.stderr
        outputs.append((out_dir / "audit.jsonl").read_bytes())
    assert outputs[0] == outputs[1]
    records = [orjson.loads(line) for line in outputs[0].splitlines()]
    source = [orjson.loads(line) for line in DEMO_LOG.read_bytes().splitlines()]
    expected_ids = [r["auditID"] for r in source if r["verb"] in ("list", "get", "create")]
    assert [r["auditID"] for r in records] == expected_ids and expected_ids
    assert all(r["cluster"] == "demo" and "impersonatedUser" not in r for r in records)
    assert sum("impersonated" in r for r in records) == sum(
        "impersonatedUser" in r for r in source if r["verb"] in ("list", "get", "create")
    )


def test_sigterm_drains_and_exits_0_and_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    log = write(tmp_path / "app.log", "".join(f'{{"n": {i}}}\n' for i in range(500)))
    config = write(
        tmp_path / "c.conf",
        f"""
[INPUT]
    name tail
    path {log}
    read_from_head on
    parser json
    db {tmp_path / "db"}
[OUTPUT]
    name file
    match *
    path {tmp_path}
    file out.jsonl
    format plain
""",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)], stderr=subprocess.PIPE, text=True
    )
    out = tmp_path / "out.jsonl"
    deadline = time.monotonic() + scaled(20)
    while time.monotonic() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 500):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=scaled(20)) == 0
    assert proc.stderr is not None and '"msg":"stopped"' in proc.stderr.read()
    assert [orjson.loads(x)["n"] for x in out.read_bytes().splitlines()] == list(range(500))

    # A backend that never answers: the first SIGTERM waits for grace, the second exits now.
    hung = write(
        tmp_path / "hung.conf",
        config.read_text()
        .replace(f"path {tmp_path}\n", "path /proc/1/nope\n")
        .replace("[INPUT]", "[SERVICE]\n    grace 60\n[INPUT]")
        .replace(f"db {tmp_path / 'db'}", ""),
    )
    log = tmp_path / "hung.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(hung)], stderr=stderr)
    # Its signal handlers are in place once it says so (a fixed 2 s was not enough at load 19:
    # the SIGTERM came before them and killed it); then a moment for the records to reach the sink.
    wait_for(lambda: b"pipeline started" in log.read_bytes() or proc.poll() is not None, 30, "the pipeline to start")
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None, "should still be waiting for its grace period"
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=scaled(10)) == 128 + signal.SIGINT
    # "at once": well inside the 60 s grace it would otherwise wait, however loaded the machine
    assert time.monotonic() - started < min(scaled(5), 30)


def _tail_to_http(tmp_path: Path, log: Path, port: int, *, exit_on_eof: bool) -> Path:
    return write(
        tmp_path / "c.conf",
        f"""
[SERVICE]
    grace 1
    scheduler.base 0.05
    scheduler.cap 0.2
[INPUT]
    name tail
    path {log}
    read_from_head on
    exit_on_eof {"on" if exit_on_eof else "off"}
    parser json
    db {tmp_path / "db"}
[OUTPUT]
    name http
    match *
    host 127.0.0.1
    port {port}
    format json_lines
""",
    )


async def test_grace_ending_with_undelivered_data_exits_3_naming_the_output_and_a_restart_delivers_it(
    tmp_path: Path,
) -> None:
    """The real http output with its backend down (nothing listens on the port): SIGTERM, the
    grace period runs out, the exit status is 3 and one error line names the output with its
    records and batches; the next start with the backend up delivers every record once."""
    log = write(tmp_path / "app.log", "".join(f'{{"n": {i}}}\n' for i in range(300)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        down_port = probe.getsockname()[1]  # closed again: connections are refused
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubetrail.cli.main", "run", "-c",
        str(_tail_to_http(tmp_path, log, down_port, exit_on_eof=False)),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[dict[str, object]] = []
    async with asyncio.timeout(30):
        while not any(line["msg"] == "delivery failed; retrying with backoff" for line in lines):
            lines.append(orjson.loads(await proc.stderr.readline()))
    proc.send_signal(signal.SIGTERM)
    _, rest = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 3
    lines += [orjson.loads(line) for line in rest.splitlines()]
    (summary,) = [line for line in lines if line["level"] == "error" and "undelivered" in str(line["msg"])]
    assert "next start" in str(summary["msg"]) and summary["exit_code"] == 3
    assert summary["records"] == 300 and isinstance(summary["batches"], int) and summary["batches"] >= 1
    assert str(summary["outputs"]).startswith(f"http.0 (300 records in {summary['batches']} batches")
    assert not any(line["msg"] == "stopped" for line in lines)

    # The backend is back: the tail's checkpoint never covered the 300, so they are read again.
    server = await ScriptedServer().start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kubetrail.cli.main", "run", "-c",
            str(_tail_to_http(tmp_path, log, server.port, exit_on_eof=True)),
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()[-2000:]
    finally:
        await server.stop()
    received = [orjson.loads(x)["n"] for r in server.requests for x in r.body.splitlines()]
    assert sorted(received) == list(range(300))


def test_run_help_documents_the_exit_status() -> None:
    from kubetrail.runtime.pipeline import EXIT_UNDELIVERED

    text = " ".join(kubetrail("run", "--help").stdout.split())
    assert f"{EXIT_UNDELIVERED} the grace period ended with data not delivered" in text


def test_check_never_prints_inline_credentials(tmp_path: Path) -> None:
    """`kubetrail check` output lands in CI logs and tickets: passwords, shared keys, tokens and
    Authorization headers written in the config are redacted, everything else shown."""
    conf = tmp_path / "secrets.conf"
    conf.write_text(
        "[INPUT]\n    name dummy\n"
        "[OUTPUT]\n    name http\n    match *\n    http_user alice\n    http_passwd hunter2\n"
        "    header Authorization Bearer abc123\n    header X-Scope-OrgID team-a\n"
        "[OUTPUT]\n    name forward\n    match *\n    shared_key s3kr1t\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "kubetrail.cli.main", "check", "-c", str(conf)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    for secret in ("hunter2", "abc123", "s3kr1t"):
        assert secret not in result.stdout
    assert "alice" in result.stdout and "X-Scope-OrgID team-a" in result.stdout
    assert result.stdout.count("<redacted>") == 3
    assert "empty_shared_key: false" in result.stdout
