# ruff: noqa: E501  (expected outputs are clearer on one line)
import io
import logging
from pathlib import Path

import orjson
import pytest

from kubetrail.core.component import ComponentContext
from kubetrail.core.metrics import MetricsRegistry
from kubetrail.core.options import resolve_options
from kubetrail.core.record import Batch, Record
from kubetrail.parsers.registry import ParserRegistry
from kubetrail.sinks.file import FileSink
from kubetrail.sinks.stdout import StdoutSink
from tests.unit.helpers import build, section

T = 1_795_867_200_123_456_789  # 2026-11-28T12:00:00.123456789Z


def batch() -> Batch:
    raw = b'{"a":"x","n":1}'
    return Batch("app.tag", [Record("app.tag", T, None, raw), Record("app.tag", T, {"a": 'q"uote', "n": 2})])


def stdout_sink(**props: str) -> tuple[StdoutSink, io.BytesIO]:
    stream = io.BytesIO()
    values = resolve_options(section("output", **props), StdoutSink.options, "stdout")
    ctx = ComponentContext(
        "stdout.0", MetricsRegistry().component("stdout.0", "sink", "stdout"), logging.getLogger("t"), ParserRegistry()
    )
    return StdoutSink(ctx, values, stream=stream), stream


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        (
            {"format": "json_lines"},
            b'{"date":1795867200.1234567,"a":"x","n":1}\n{"date":1795867200.1234567,"a":"q\\"uote","n":2}\n',
        ),
        ({"format": "json_lines", "json_date_key": "false"}, b'{"a":"x","n":1}\n{"a":"q\\"uote","n":2}\n'),
        (
            {"format": "json_stream", "json_date_key": "ts", "json_date_format": "epoch"},
            b'{"ts":1795867200,"a":"x","n":1}{"ts":1795867200,"a":"q\\"uote","n":2}',
        ),
        (
            {"format": "json", "json_date_format": "iso8601"},
            b'[{"date":"2026-11-28T12:00:00.123456Z","a":"x","n":1},{"date":"2026-11-28T12:00:00.123456Z","a":"q\\"uote","n":2}]\n',
        ),
        (
            {"format": "json_lines", "json_date_format": "java_sql_timestamp"},
            b'{"date":"2026-11-28 12:00:00.123456","a":"x","n":1}\n{"date":"2026-11-28 12:00:00.123456","a":"q\\"uote","n":2}\n',
        ),
        (
            {},
            b'[0] app.tag: [1795867200.123456789, {"a":"x","n":1}]\n[1] app.tag: [1795867200.123456789, {"a":"q\\"uote","n":2}]\n',
        ),
    ],
)
async def test_stdout_formats(props: dict[str, str], expected: bytes) -> None:
    sink, stream = stdout_sink(**props)
    await sink.write(batch())
    assert stream.getvalue() == expected


@pytest.mark.parametrize(
    ("props", "expected"),
    [
        ({"format": "plain"}, '{"a":"x","n":1}\n{"a":"q\\"uote","n":2}\n'),
        (
            {},
            'app.tag: [1795867200.123456789, {"a":"x","n":1}]\napp.tag: [1795867200.123456789, {"a":"q\\"uote","n":2}]\n',
        ),
        ({"format": "csv"}, '1795867200.123456789,"x","1"\n1795867200.123456789,"q""uote","2"\n'),
        (
            {"format": "csv", "delimiter": "tab", "csv_column_names": "on"},
            'time\ta\tn\n1795867200.123456789\t"x"\t"1"\n1795867200.123456789\t"q""uote"\t"2"\n',
        ),
        ({"format": "ltsv"}, 'time:1795867200.123456789\ta:x\tn:1\ntime:1795867200.123456789\ta:q"uote\tn:2\n'),
        (
            {"format": "template", "template": "{time} a={a} n={n} missing={zz}"},
            '1795867200.123456789 a=x n=1 missing=\n1795867200.123456789 a=q"uote n=2 missing=\n',
        ),
    ],
)
async def test_file_formats(tmp_path: Path, props: dict[str, str], expected: str) -> None:
    sink = build(FileSink, path=str(tmp_path), **props)
    await sink.start()
    await sink.write(batch())
    await sink.close()
    assert (tmp_path / "app.tag").read_text() == expected


async def test_file_mkdir_and_missing_directory(tmp_path: Path) -> None:
    from kubetrail.core.errors import RetryableError

    missing = build(FileSink, path=str(tmp_path / "no" / "dir"), format="plain")
    with pytest.raises(RetryableError, match="does not exist"):
        await missing.start()
    made = build(FileSink, path=str(tmp_path / "new" / "dir"), file="x.log", format="plain", mkdir="on")
    await made.start()
    await made.write(batch())
    await made.close()
    assert [orjson.loads(x)["n"] for x in (tmp_path / "new" / "dir" / "x.log").read_bytes().splitlines()] == [1, 2]


async def test_file_where_the_directory_should_be_is_retryable(tmp_path: Path) -> None:
    from kubetrail.core.errors import RetryableError

    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    with pytest.raises(RetryableError, match="cannot create output directory"):
        await build(FileSink, path=str(blocker / "sub"), mkdir="on").start()


async def test_file_failed_write_is_cut_back_so_the_retry_leaves_one_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data reached the file but the fsync failed (EIO): the batch is retried, and the file
    must end with exactly one copy of it, not a copy from each attempt."""
    import errno
    import os

    from kubetrail.core.errors import RetryableError
    from kubetrail.sinks import file as file_module

    sink = build(FileSink, path=str(tmp_path), file="out.log", format="plain")
    await sink.start()
    await sink.write(batch())  # a good batch before: must survive the cut
    real_fsync = os.fsync
    calls = {"n": 0}

    def failing_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(file_module.os, "fsync", failing_fsync)
    with pytest.raises(RetryableError, match="Input/output error"):
        await sink.write(batch())
    await sink.write(batch())  # the retry
    await sink.close()
    assert [orjson.loads(x)["n"] for x in (tmp_path / "out.log").read_bytes().splitlines()] == [1, 2, 1, 2]
