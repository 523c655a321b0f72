"""The Fluent Bit compatibility corpus (``tests/compat/``): every config passes ``kubetrail check``,
and a dozen of them run on sample input and produce the records Fluent Bit's documentation and
source say the same config produces (each expectation says where it comes from)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from kubetrail.cli.main import main
from kubetrail.core.config import load_config
from kubetrail.runtime.pipeline import Pipeline
from tests.files import written_json_lines

CORPUS = Path(__file__).resolve().parents[1] / "compat" / "configs"
CONFIGS = sorted(p.name for p in CORPUS.iterdir() if re.match(r"^\d\d-.*\.(conf|yaml)$", p.name))

# What the DaemonSet / Deployment would put in the environment.
ENV = {
    "AWS_REGION": "eu-west-1",
    "CLUSTER_NAME": "c1",
    "NODE_NAME": "node-a",
    "HOST_NAME": "node-a",
    "HTTP_SERVER": "On",
    "HTTP_PORT": "2020",
    "READ_FROM_HEAD": "Off",
    "READ_FROM_TAIL": "On",
    "FLUENT_SHARED_KEY": "secret",
    "FLUENT_ELASTICSEARCH_HOST": "elasticsearch",
    "FLUENT_ELASTICSEARCH_PORT": "9200",
    "SPLUNK_TOKEN": "token",
    "OPENSEARCH_USER": "admin",
    "OPENSEARCH_PASSWORD": "admin",
    "S3_BUCKET": "archive",
    "INTAKE_API_KEY": "key",
}

# Configs that use what kubetrail does not have (yet). strict: the test fails once it lands.
MISSING: dict[str, str] = {}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.xfail(reason=MISSING[n], strict=True)) if n in MISSING else n for n in CONFIGS],
)
def test_kubetrail_check_accepts(name: str, env: None) -> None:
    result = CliRunner().invoke(main, ["check", "-c", str(CORPUS / name)])
    assert result.exit_code == 0, result.output
    assert "configuration is valid" in result.output


def test_the_corpus_is_large_enough_and_documented() -> None:
    assert len(CONFIGS) >= 40
    readme = (CORPUS.parent / "README.md").read_text()
    for name in CONFIGS:
        assert name in readme, f"{name} is not described in tests/compat/README.md"


# -- running a dozen of them -----------------------------------------------------------------


@pytest.fixture
def work(env: None) -> Iterator[Path]:
    """A copy of the corpus in a directory without "_" in its path: tag_regex searches the whole
    path (Fluent Bit's tail does), as under /var/log/containers."""
    root = Path("/tmp") / ("ktcorpus" + uuid.uuid4().hex)
    shutil.copytree(CORPUS, root / "configs")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def localise(work: Path, name: str) -> Path:
    """The config with its /var/log paths moved under ``work`` (nothing else changes)."""
    path = work / "configs" / name
    text = path.read_text()
    for old, new in (
        ("/var/log/containers", work / "containers"),
        ("/var/log/app", work / "app"),
        ("/var/log/flb-out", work / "out"),
        ("/var/log/flb_kube.db", work / "tail.db"),
    ):
        text = text.replace(old, str(new))
    path.write_text(text)
    return path


CID = "0123456789abcdef" * 4


def container_log(work: Path, pod: str, namespace: str, container: str, lines: list[tuple[str, str]]) -> Path:
    """A kubelet container log file in CRI format: ``(stream, message)`` lines."""
    path = work / "containers" / f"{pod}_{namespace}_{container}-{CID}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(
        f"2024-05-01T10:00:0{i}.000000001Z {stream} F {message}\n" for i, (stream, message) in enumerate(lines)
    )
    path.write_text(text)
    return path


def cri(i: int, stream: str, message: str) -> dict[str, Any]:
    """The record Fluent Bit's tail makes of a CRI line with multiline.parser cri."""
    return {"time": f"2024-05-01T10:00:0{i}.000000001Z", "stream": stream, "_p": "F", "log": message}


async def run_until(config: Path, outputs: dict[Path, int]) -> dict[Path, list[Any]]:
    """Run the pipeline until each output file has its number of records, then stop it."""
    pipeline = Pipeline(load_config(config))
    task = asyncio.create_task(pipeline.run())
    try:
        for _ in range(200):
            if all(len(written_json_lines(p)) >= n for p, n in outputs.items()):
                break
            if task.done():
                break
            await asyncio.sleep(0.05)
    finally:
        pipeline.request_stop()
        assert await asyncio.wait_for(task, 20) == 0
    return {p: written_json_lines(p) for p in outputs}


JAVA = [
    'Exception in thread "main" java.lang.IllegalStateException: boom',
    "\tat com.example.App.run(App.java:42)",
    "\tat com.example.App.main(App.java:10)",
]


async def test_run_11_multiline_two_steps(work: Path) -> None:
    """Fluent Bit docs (Multiline filter): cri pieces are records from tail, the filter joins the
    java trace (built-in java rules) and the custom parser's lines with a newline; the first
    record's other keys stay."""
    container_log(
        work,
        "app-1",
        "shop",
        "java",
        [
            ("stdout", JAVA[0]),
            ("stdout", JAVA[1]),
            ("stdout", JAVA[2]),
            ("stdout", "Dec 14 06:41:08 Exception in thread main"),
            ("stdout", "    at com.a(A.java:1)"),
            ("stdout", "plain line"),
        ],
    )
    out = work / "out" / "joined.jsonl"
    result = await run_until(localise(work, "11-java-python-multiline.conf"), {out: 3})
    assert result[out] == [
        cri(0, "stdout", "\n".join(JAVA)),
        cri(3, "stdout", "Dec 14 06:41:08 Exception in thread main\n    at com.a(A.java:1)"),
        cri(5, "stdout", "plain line"),
    ]


async def test_run_12_rewrite_tag_and_grep(work: Path) -> None:
    """rewrite_tag docs: a matching record is re-emitted under the new tag from the start of the
    pipeline and, with KEEP false, the original is gone; grep's Exclude drops matches."""
    container_log(
        work,
        "web-1",
        "shop",
        "app",
        [("stdout", "GET /healthz 200"), ("stdout", "level=debug msg=x"), ("stderr", "oops"), ("stdout", "hello")],
    )
    app, errors = work / "out" / "app.jsonl", work / "out" / "errors.jsonl"
    result = await run_until(localise(work, "12-rewrite-tag-namespaces.conf"), {app: 1, errors: 1})
    assert result[app] == [cri(3, "stdout", "hello")]
    assert result[errors] == [cri(2, "stderr", "oops")]


async def test_run_13_tag_regex_grep_modify(work: Path) -> None:
    """tail docs (tag_regex): <name> in the tag is the named group of the path; grep's Regex on a
    tag of kube-system keeps stderr only; modify adds and renames."""
    container_log(work, "web-1", "shop", "app", [("stdout", "hello"), ("stdout", "   ")])
    container_log(work, "coredns-1", "kube-system", "coredns", [("stdout", "info line"), ("stderr", "err line")])
    out = work / "out" / "tagged.jsonl"
    result = await run_until(localise(work, "13-grep-modify-cluster.conf"), {out: 2})

    def expected(i: int, stream: str, message: str) -> dict[str, Any]:
        body = cri(i, stream, message)
        del body["log"]
        return {**body, "message": message, "cluster": "c1", "node": "node-a"}

    assert sorted(result[out], key=lambda r: r["message"]) == [
        expected(1, "stderr", "err line"),
        expected(0, "stdout", "hello"),
    ]


async def test_run_15_record_modifier(work: Path) -> None:
    """record_modifier docs: Record adds, UUID_Key adds a random UUID, Allowlist_key keeps only
    the listed keys."""
    container_log(work, "web-1", "shop", "app", [("stdout", "hello")])
    out = work / "out" / "modified.jsonl"
    [record] = (await run_until(localise(work, "15-record-modifier-cluster.conf"), {out: 1}))[out]
    event_id = record.pop("event_id")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", event_id)
    assert record == {"log": "hello", "stream": "stdout", "cluster_name": "c1", "environment": "production"}


async def test_run_16_parser_filter_nginx(work: Path) -> None:
    """parser filter docs: the stock nginx regex's groups replace the key; Reserve_Data keeps the
    other keys, Preserve_Key Off drops log; Time_Key's value becomes the record time."""
    line = '10.0.0.1 - - [01/May/2024:10:00:00 +0000] "GET /index.html HTTP/1.1" 200 612 "-" "curl/8.0"'
    container_log(work, "ingress-nginx-controller-abc", "ingress", "controller", [("stdout", line)])
    out = work / "out" / "ingress.jsonl"
    [record] = (await run_until(localise(work, "16-parser-filter-nginx.conf"), {out: 1}))[out]
    assert record == {
        "time": "2024-05-01T10:00:00.000000001Z",
        "stream": "stdout",
        "_p": "F",
        "remote": "10.0.0.1",
        "host": "-",
        "user": "-",
        "method": "GET",
        "path": "/index.html",
        "code": "200",
        "size": "612",
        "referer": "-",
        "agent": "curl/8.0",
    }


async def test_run_18_lua(work: Path) -> None:
    """lua filter docs: return code 1 replaces the record with the one the function returns."""
    container_log(work, "web-1", "shop", "app", [("stdout", "ERROR disk full"), ("stdout", "ok")])
    out = work / "out" / "levels.jsonl"
    result = await run_until(localise(work, "18-lua-level.conf"), {out: 2})
    assert result[out] == [
        {**cri(0, "stdout", "ERROR disk full"), "level": "error"},
        {**cri(1, "stdout", "ok"), "level": "info"},
    ]


async def test_run_29_processors(work: Path) -> None:
    """content_modifier docs: upsert sets the value (a string), hash is the SHA-256 hex of the
    value, rename keeps the value; the output's processor deletes only in that output."""
    app = work / "app" / "a.log"
    app.parent.mkdir(parents=True)
    app.write_text('{"msg": "signed in", "user_email": "a@b.c", "password": "x", "level": "info"}\n')
    out = work / "out" / "processed.jsonl"
    [record] = (await run_until(localise(work, "29-processors-content-modifier.yaml"), {out: 1}))[out]
    assert record == {
        "message": "signed in",
        "user_email": hashlib.sha256(b"a@b.c").hexdigest(),
        "level": "info",
        "my_new_key": "123",
    }


async def test_run_31_inline_multiline_parser(work: Path) -> None:
    """multiline parsing docs (the multiline-regex-test example): a start_state line and the
    'cont' lines after it are one record; a message open at the end goes out on flush."""
    java = work / "app" / "java.log"
    java.parent.mkdir(parents=True)
    lines = ["Dec 14 06:41:08 Exception in thread main", "    at com.a(A.java:1)", "    at com.b(B.java:2)"]
    java.write_text("\n".join([*lines, "Dec 14 06:41:09 next"]) + "\n")
    out = work / "out" / "java.jsonl"
    result = await run_until(localise(work, "31-yaml-inline-multiline-parsers.yaml"), {out: 1})
    await asyncio.sleep(0)
    assert result[out][0] == {"log": "\n".join(lines)}
    # The last message was held (buffer on) and flushed when the pipeline stopped.
    assert written_json_lines(out) == [{"log": "\n".join(lines)}, {"log": "Dec 14 06:41:09 next"}]


async def test_run_33_rewrite_tag_keep_and_output_processors(work: Path) -> None:
    """rewrite_tag with KEEP true: the original stays under its tag and a copy goes to the new
    one; the copy's output processors change only what that output writes."""
    app = work / "app" / "a.log"
    app.parent.mkdir(parents=True)
    app.write_text('{"level": "error", "msg": "boom", "stack": "trace"}\n{"level": "info", "msg": "ok"}\n')
    everything, alerts = work / "out" / "all.jsonl", work / "out" / "alerts.jsonl"
    result = await run_until(localise(work, "33-yaml-rewrite-tag-processors.yaml"), {everything: 2, alerts: 1})
    assert result[everything] == [{"level": "error", "msg": "boom", "stack": "trace"}, {"level": "info", "msg": "ok"}]
    assert result[alerts] == [{"level": "error", "msg": "boom", "alert": "true"}]


async def test_run_44_tail_multiline_regex(work: Path) -> None:
    """Fluent Bit's multiline parsing docs example: the custom parser's start line and the lines
    its "cont" rule takes are one record ``{log: ...}``; the java parser joins its trace."""
    app = work / "app" / "test.log"
    app.parent.mkdir(parents=True)
    dated = [
        'Dec 14 06:41:08 Exception in thread "main" java.lang.RuntimeException: Something has gone wrong',
        "    at com.myproject.module.MyProject.badMethod(MyProject.java:22)",
        "    at com.myproject.module.MyProject.main(MyProject.java:6)",
    ]
    app.write_text("\n".join(["single line...", *dated, *JAVA, "another line..."]) + "\n")
    out = work / "out" / "test.jsonl"
    result = await run_until(localise(work, "44-tail-multiline-regex.conf"), {out: 4})
    assert [r["log"] for r in result[out]] == [
        "single line...",
        "\n".join(dated),
        "\n".join(JAVA),
        "another line...",
    ]


async def test_run_42_logfmt(work: Path) -> None:
    """Fluent Bit's logfmt parser: key=value pairs, quoted values unquoted, values as strings."""
    container_log(work, "api-1", "shop", "api", [("stdout", 'level=info msg="request done" status=200')])
    out = work / "out" / "parsed.jsonl"
    [record] = (await run_until(localise(work, "42-logfmt-parser-filter.conf"), {out: 1}))[out]
    assert record == {
        "time": "2024-05-01T10:00:00.000000001Z",
        "stream": "stdout",
        "_p": "F",
        "level": "info",
        "msg": "request done",
        "status": "200",
    }


def first_stdout_record(config: Path) -> dict[str, Any]:
    """Run ``kubetrail run`` as a process until it prints one JSON line, then SIGTERM it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **ENV},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    record: dict[str, Any] = orjson.loads(line)
    return record


def test_run_23_dummy_modify_stdout(work: Path) -> None:
    """dummy docs: the Dummy JSON is the record; stdout json_lines puts the time under
    json_date_key in the json_date_format (iso8601)."""
    record = first_stdout_record(work / "configs" / "23-dummy-stdout.conf")
    date = record.pop("date")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", date)
    assert record == {"message": "custom dummy", "level": "info", "source": "smoke-test"}


def test_run_41_content_modifier_chain(work: Path) -> None:
    """content_modifier docs, the whole chain of actions on the dummy record: insert, upsert,
    delete, rename, hash, extract (named groups become keys) and convert to double."""
    record = first_stdout_record(work / "configs" / "41-yaml-dummy-processors.yaml")
    record.pop("date")
    assert record == {
        "key1": 123.4,
        "key2": "replaced",
        "email": hashlib.sha256(b"a@b.c").hexdigest(),
        "http": "GET /x 200",
        "renamed": "something",
        "verb": "GET",
        "path": "/x",
        "code": "200",
    }
