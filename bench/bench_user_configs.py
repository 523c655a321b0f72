"""Benchmark: the configs Fluent Bit users bring (their own parsers), each beside a naive loop.

Every row runs kubetrail as a child process (tail, read_from_head, exit_on_eof -> one file
output) and, in the same round, a naive Python loop doing the same work on the same input
(``orjson.loads``, ``datetime.strptime``, ``re.match``, ``orjson.dumps``, write), so that the
ratio survives this shared machine's noise. Rounds alternate the rows; medians are printed.

    .venv/bin/python bench/bench_user_configs.py [--audit-lines 300000] [--cri-lines 500000]
        [--repeat 3] [--rows NAME,...] [--formats]

Rows (issue 18), targets in brackets:

* ``k8s_audit``: the built-in parser, ``format plain`` (the reference row);
* ``json``: ``[PARSER] format json`` without time [<= 1.3x the reference];
* ``json+time``: ``time_key stageTimestamp``, ``time_format %Y-%m-%dT%H:%M:%S.%LZ``,
  ``time_keep off``, ``format plain`` [<= 1.3x the reference];
* ``json+time out_file``: the same parser, the file output's default format [<= 1.3x];
* ``cri``: CRI lines (10% of messages cut into ``P``/``F`` pieces), ``multiline.parser cri``,
  ``format plain`` [<= 2.0 s for 500,000 lines];
* ``regex``: a ``[PARSER] format regex`` (the CRI shape, with time) on the same CRI lines;
* ``multiline``: a ``[MULTILINE_PARSER]`` (a start line and indented continuations) in the
  ``multiline`` filter, on 300,000 plain text lines.

``--formats`` adds the file output's and stdout's formats on the ``json+time`` parser, and the
``http`` output's ``json`` and ``json_lines`` to a local receiver (a process of its own,
appending each body to a file: a small Go ``net/http`` program built once into the bench cache,
or with ``--python-receiver`` or no Go an aiohttp one), each against ``plain`` [each within 10%
of plain].
``--before DIR`` also runs each row with the kubetrail of another checkout (e.g. ``git
archive`` of an older commit unpacked in DIR; the same venv), alternating with this one in
every round: the change's effect in one run.
``--no-naive`` skips the naive loops. ``--filter-only`` times the ``multiline`` row's filter
alone in this process (run it from the checkout to measure, with ``PYTHONPATH`` set to it).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from _common import CACHE, Measured, audit_lines_file, cpu_count_hint, measure, warm_free_memory

# Service lines added to every row by --monitoring (the chart turns the monitoring server on in
# every part, for its probes and metrics; it imports aiohttp, which the http rows import anyway).
MONITORING = ""

SERVICE = """
[SERVICE]
    log_level warn
    grace     60
[PARSER]
    name        audit_time
    format      json
    time_key    stageTimestamp
    time_format %Y-%m-%dT%H:%M:%S.%LZ
[PARSER]
    name        plain_json
    format      json
[PARSER]
    name        cri_regex
    format      regex
    regex       ^(?<time>[^ ]+) (?<stream>stdout|stderr) (?<logtag>[^ ]*) (?<log>.*)$
    time_key    time
    time_format %Y-%m-%dT%H:%M:%S.%L%z
[MULTILINE_PARSER]
    name          app_trace
    type          regex
    flush_timeout 1000
    rule "start_state" "/^\\d{4}-\\d{2}-\\d{2} /" "cont"
    rule "cont"        "/^\\s+at /"                   "cont"
"""

INPUT = """
[INPUT]
    name           tail
    path           {src}
    tag            bench
    read_from_head on
    exit_on_eof    on
{extra}
"""

FILE_OUTPUT = """
[OUTPUT]
    name   file
    match  *
    path   {out}
    file   out.txt
    format {fmt}
"""

STDOUT_OUTPUT = """
[OUTPUT]
    name   stdout
    match  *
    format {fmt}
"""

HTTP_OUTPUT = """
[OUTPUT]
    name   http
    match  *
    host   127.0.0.1
    port   {port}
    uri    /
    format {fmt}
"""

# The http rows' receiver: a Go program (standard library only) built once into the bench cache
# (never committed as a binary): it copies each body into one file and answers 201, costing far
# less CPU than a Python server on the same two cores; the bench counts what arrived after the
# run. Without Go, the aiohttp receiver below does the same (and costs more of the shared CPU).
GO_RECEIVER = r"""
package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
)

func main() {
	out, err := os.OpenFile(os.Args[1], os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		panic(err)
	}
	listener, err := net.Listen("tcp", "127.0.0.1:"+os.Args[2])
	if err != nil {
		panic(err)
	}
	var lock sync.Mutex
	handler := func(w http.ResponseWriter, r *http.Request) {
		lock.Lock()
		_, err := io.Copy(out, r.Body)
		lock.Unlock()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.WriteHeader(http.StatusCreated)
	}
	fmt.Println("ready")
	panic(http.Serve(listener, http.HandlerFunc(handler)))
}
"""

PY_RECEIVER = r"""
import sys
from aiohttp import web
target = sys.argv[1]
async def receive(request):
    body = await request.read()
    with open(target, "ab") as out:
        out.write(body)
    return web.Response(status=201)
app = web.Application(client_max_size=1 << 30)
app.router.add_post("/", receive)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=lambda *a: print("ready", flush=True))
"""


# The naive loops: the obvious Python for the same work (read, parse, take the time, write).
NAIVE_JSON = r"""
import sys, orjson
from datetime import datetime, timezone
src, dst, mode = sys.argv[1], sys.argv[2], sys.argv[3]
with open(src, "rb") as f, open(dst, "wb") as out:
    for line in f:
        record = orjson.loads(line)
        if mode != "none":
            stamp = record.pop("stageTimestamp")
            t = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
        if mode == "out_file":
            out.write(b"bench: [%.9f, " % t + orjson.dumps(record) + b"]\n")
        else:
            out.write(orjson.dumps(record) + b"\n")
"""

NAIVE_CRI = r"""
import sys, orjson
src, dst = sys.argv[1], sys.argv[2]
pending = {}
with open(src, "rb") as f, open(dst, "wb") as out:
    for line in f:
        stamp, stream, tag, text = line.rstrip(b"\n").split(b" ", 3)
        if tag == b"P":
            pending.setdefault(stream, []).append(text)
            continue
        pieces = pending.pop(stream, [])
        pieces.append(text)
        record = {"time": stamp.decode(), "stream": stream.decode(), "_p": "F", "log": b"".join(pieces).decode()}
        out.write(orjson.dumps(record) + b"\n")
"""

NAIVE_REGEX = r"""
import sys, re, orjson
from datetime import datetime
src, dst = sys.argv[1], sys.argv[2]
rx = re.compile(r"^(?P<time>[^ ]+) (?P<stream>stdout|stderr) (?P<logtag>[^ ]*) (?P<log>.*)$")
with open(src, "r") as f, open(dst, "wb") as out:
    for line in f:
        m = rx.match(line.rstrip("\n"))
        body = m.groupdict()
        t = datetime.strptime(body.pop("time")[:26] + "+0000", "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
        out.write(orjson.dumps(body) + b"\n")
"""

NAIVE_MULTILINE = r"""
import sys, re, orjson
src, dst = sys.argv[1], sys.argv[2]
start = re.compile(r"^\d{4}-\d{2}-\d{2} ")
cont = re.compile(r"^\s+at ")
message = None
with open(src, "r") as f, open(dst, "wb") as out:
    for line in f:
        line = line.rstrip("\n")
        if message is not None and cont.match(line):
            message.append(line)
            continue
        if message is not None:
            out.write(orjson.dumps({"log": "\n".join(message)}) + b"\n")
        message = [line]
    if message is not None:
        out.write(orjson.dumps({"log": "\n".join(message)}) + b"\n")
"""


@dataclass
class Row:
    name: str
    src: Path
    tail_extra: str
    filters: str
    fmt: str
    records: int  # records the output must hold
    naive: str | None
    naive_args: tuple[str, ...] = ()
    output: str = "file"  # file, stdout or http


def cri_file(count: int) -> Path:
    """``count`` messages as CRI lines, ~100 bytes each, 10% cut into a P and an F piece."""
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / f"cri10-{count}.log"
    if not target.exists():
        rnd = random.Random(18)
        out: list[bytes] = []
        for n in range(count):
            stamp = f"2026-12-01T12:{(n // 60_000) % 60:02d}:{(n // 1000) % 60:02d}.{(n * 7919) % 1_000_000_000:09d}Z"
            stream = "stderr" if n % 7 == 0 else "stdout"
            message = f'level=info msg="request handled" path=/api/v{n % 3}/items/{n} took={rnd.random():.4f}'
            if n % 10 == 0:
                half = len(message) // 2
                out.append(f"{stamp} {stream} P {message[:half]}\n".encode())
                out.append(f"{stamp} {stream} F {message[half:]}\n".encode())
            else:
                out.append(f"{stamp} {stream} F {message}\n".encode())
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(b"".join(out))
        tmp.rename(target)
    return target


def trace_file(messages: int) -> tuple[Path, int]:
    """Application log lines: every 4th message is a stack trace of 3 indented lines."""
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / f"traces-{messages}.log"
    if not target.exists():
        out: list[str] = []
        for n in range(messages):
            out.append(f"2026-12-01 12:00:{n % 60:02d},{n % 1000:03d} ERROR request {n} failed: boom\n")
            if n % 4 == 0:
                out.extend(f"    at com.example.Handler.step{k}(Handler.java:{n % 500 + k})\n" for k in range(3))
        tmp = target.with_suffix(".tmp")
        tmp.write_text("".join(out))
        tmp.rename(target)
    return target, messages


def count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def rows(args: argparse.Namespace) -> list[Row]:
    audit = audit_lines_file(args.audit_lines)
    cri = cri_file(args.cri_lines)
    traces, messages = trace_file(args.trace_messages)
    n = args.audit_lines
    out = [
        Row("k8s_audit", audit, "    parser k8s_audit", "", "plain", n, NAIVE_JSON, ("none",)),
        Row("json", audit, "    parser plain_json", "", "plain", n, NAIVE_JSON, ("none",)),
        Row("json+time", audit, "    parser audit_time", "", "plain", n, NAIVE_JSON, ("plain",)),
        Row("json+time out_file", audit, "    parser audit_time", "", "out_file", n, NAIVE_JSON, ("out_file",)),
        Row("cri", cri, "    multiline.parser cri", "", "plain", args.cri_lines, NAIVE_CRI),
        Row("regex", cri, "    parser cri_regex", "", "plain", count_lines(cri), NAIVE_REGEX),
        Row(
            "multiline",
            traces,
            "",
            "[FILTER]\n    name multiline\n    match *\n    multiline.key_content log\n"
            "    multiline.parser app_trace\n",
            "plain",
            messages,
            NAIVE_MULTILINE,
        ),
    ]
    if args.formats:
        for fmt in ("csv", "ltsv", "template"):
            out.append(Row(f"json+time {fmt}", audit, "    parser audit_time", "", fmt, n, None))
        for fmt in ("msgpack", "json_lines"):
            out.append(
                Row(f"json+time stdout {fmt}", audit, "    parser audit_time", "", fmt, n, None, output="stdout")
            )
        for fmt in ("json", "json_lines"):
            out.append(Row(f"json+time http {fmt}", audit, "    parser audit_time", "", fmt, n, None, output="http"))
    if args.rows:
        wanted = set(args.rows.split(","))
        out = [row for row in out if row.name in wanted]
    return out


def go_receiver() -> Path | None:
    """The Go receiver's binary, built from :data:`GO_RECEIVER` once per source text (the file
    name carries its hash); None without a ``go`` command."""
    import hashlib
    import subprocess

    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if go is None:
        return None
    digest = hashlib.sha256(GO_RECEIVER.encode()).hexdigest()[:12]
    binary = CACHE / f"http-receiver-{digest}"
    if not binary.exists():
        build = Path(tempfile.mkdtemp(prefix="http-receiver-", dir=CACHE))
        try:
            (build / "main.go").write_text(GO_RECEIVER)
            subprocess.run([go, "build", "-o", str(build / "receiver"), "main.go"], cwd=build, check=True)
            (build / "receiver").rename(binary)  # whole or not at all
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return binary


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Receiver:
    """The HTTP receiver process for the http rows; what it received is in ``target``."""

    def __init__(self, directory: Path, python: bool = False) -> None:
        import subprocess

        self.target = directory / "http-received"
        self.port = free_port()
        binary = None if python else go_receiver()
        if binary is not None:
            command = [str(binary)]
            self.kind = "Go net/http"
        else:
            script = directory / "receiver.py"
            script.write_text(PY_RECEIVER)
            command = [sys.executable, str(script)]
            self.kind = "Python aiohttp"
        self.proc = subprocess.Popen([*command, str(self.target), str(self.port)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("FAILED: the HTTP receiver did not start")

    def records(self, fmt: str) -> int:
        """Records received (json: one array per body, each body one line)."""
        import orjson

        data = self.target.read_bytes() if self.target.exists() else b""
        if data:
            os.truncate(self.target, 0)  # not unlinked: the Go receiver keeps it open (O_APPEND)
        if fmt == "json_lines":
            return data.count(b"\n")
        return sum(len(orjson.loads(body)) for body in data.splitlines())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


RECEIVER_PROC: Receiver | None = None


def run_row(
    row: Row, work: Path, cold: bool, tree: str | None = None, naive: bool = True
) -> tuple[Measured, Measured | None]:
    out_file = work / "out.txt"
    port = RECEIVER_PROC.port if RECEIVER_PROC is not None else 0
    template = {"file": FILE_OUTPUT, "stdout": STDOUT_OUTPUT, "http": HTTP_OUTPUT}[row.output]
    output = template.format(out=work, fmt=row.fmt, port=port)
    config = work / "bench.conf"
    service = SERVICE.replace("[PARSER]", MONITORING + "[PARSER]", 1) if MONITORING else SERVICE
    config.write_text(service + INPUT.format(src=row.src, extra=row.tail_extra) + row.filters + output)
    if not cold:
        warm_free_memory(work)
    command = [sys.executable, "-m", "kubetrail.cli.main", "run", "-c", str(config)]
    if row.output == "stdout":
        with out_file.open("wb") as stdout:
            m = measure(command, stdout=stdout, cwd=tree)
    else:
        m = measure(command, cwd=tree)
    if row.output == "http":
        assert RECEIVER_PROC is not None
        written = RECEIVER_PROC.records(row.fmt)
    else:
        written = count_lines(out_file)
    if m.returncode or written != row.records:
        raise SystemExit(f"FAILED: {row.name}: rc={m.returncode}, {written} of {row.records} records")
    out_file.unlink(missing_ok=True)
    if not naive:
        return m, None
    if row.naive is not None:
        script = work / "naive.py"
        script.write_text(row.naive)
        naive_m = measure([sys.executable, str(script), str(row.src), str(out_file), *row.naive_args])
        if naive_m.returncode:
            raise SystemExit(f"FAILED: naive loop of {row.name}: rc={naive_m.returncode}")
        out_file.unlink()
        return m, naive_m
    return m, None


def median(ms: list[Measured]) -> Measured:
    return sorted(ms, key=lambda m: m.wall)[len(ms) // 2]


STARTUP_LINES = 2_000


def median_cpu(ms: list[Measured]) -> float:
    return sorted(m.cpu for m in ms)[len(ms) // 2]


def multiline_filter_only(args: argparse.Namespace) -> int:
    """The ``multiline`` row's filter alone (no tail, no output): the trace lines as the tail's
    records, through the filter in batches of 20,000, best CPU time of ``--repeat`` rounds."""
    import time

    from kubetrail.core.config import load_config
    from kubetrail.core.record import Record
    from kubetrail.parsers.registry import ParserRegistry
    from kubetrail.transforms.multiline import MultilineTransform
    from tests.unit.helpers import build

    traces, _ = trace_file(args.trace_messages)
    lines = traces.read_bytes().split(b"\n")[:-1]
    config = Path(tempfile.mkdtemp(prefix="kubetrail-bench-")) / "multiline.conf"
    config.write_text(SERVICE)
    parsers = ParserRegistry()
    parsers.multiline_sections = list(load_config(config).multiline_parsers)  # type: ignore[attr-defined]
    shutil.rmtree(config.parent)
    best, out = float("inf"), 0
    for _ in range(args.repeat):
        records = [Record("bench", 0, {"log": line.decode()}) for line in lines]
        options = {"multiline.parser": "app_trace", "multiline.key_content": "log", "buffer": "off"}
        transform = build(MultilineTransform, parsers=parsers, **options)
        start, out = time.process_time(), 0
        for at in range(0, len(records), 20_000):
            out += len(transform.process(records[at : at + 20_000]))
        best = min(best, time.process_time() - start)
    print(f"multiline filter alone: {len(lines):,} lines -> {out:,} records, {best:.3f} s CPU (best of {args.repeat})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audit-lines", type=int, default=300_000)
    parser.add_argument("--cri-lines", type=int, default=500_000, help="CRI messages (10%% are two lines)")
    parser.add_argument("--trace-messages", type=int, default=240_000, help="log messages, every 4th a trace")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of all rows; medians are compared")
    parser.add_argument("--rows", help="comma list of row names to run")
    parser.add_argument("--formats", action="store_true", help="also the file and stdout formats (item 4)")
    parser.add_argument("--output-dir", help="where outputs are written (default: the temp dir)")
    parser.add_argument("--cold", action="store_true", help="skip writing and deleting 2 GB before each run")
    parser.add_argument("--before", help="also run each row with the kubetrail of this checkout, alternating")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive loops")
    parser.add_argument(
        "--monitoring",
        action="store_true",
        help="every row with the monitoring server on (http_server: health and metrics), as the chart runs it",
    )
    parser.add_argument("--python-receiver", action="store_true", help="http rows: the aiohttp receiver, not Go's")
    parser.add_argument(
        "--startup",
        action="store_true",
        help=f"also run the audit rows on {STARTUP_LINES:,} lines: their fixed cost, and the CPU beyond it",
    )
    parser.add_argument(
        "--filter-only",
        action="store_true",
        help="only the multiline row's filter, in this process: CPU seconds of its records through it",
    )
    args = parser.parse_args()
    if args.monitoring:
        global MONITORING
        MONITORING = f"    http_server on\n    http_listen 127.0.0.1\n    http_port {free_port()}\n"
    if args.filter_only:
        return multiline_filter_only(args)
    selected = rows(args)
    results = Results.of(selected)
    global RECEIVER_PROC
    if any(row.output == "http" for row in selected):
        directory = Path(tempfile.mkdtemp(prefix="kubetrail-bench-http-", dir=args.output_dir))
        RECEIVER_PROC = Receiver(directory, python=args.python_receiver)
        print(f"http rows: receiver {RECEIVER_PROC.kind} (its CPU is not the row's; it shares the cores)")
    try:
        rounds(args, selected, results)
    finally:
        if RECEIVER_PROC is not None:
            RECEIVER_PROC.stop()
            shutil.rmtree(RECEIVER_PROC.target.parent, ignore_errors=True)
    report(args, selected, results)
    return 0


@dataclass
class Results:
    """Each row's measurements by name: with this checkout, with the naive reference command,
    and with the ``--before`` checkout."""

    runs: dict[str, list[Measured]]
    naive_runs: dict[str, list[Measured]]
    before_runs: dict[str, list[Measured]]
    # --startup: (row, tree or None) -> the same row on STARTUP_LINES lines: its fixed cost.
    startup: dict[tuple[str, str | None], list[Measured]] = field(default_factory=dict)

    @classmethod
    def of(cls, selected: list[Row]) -> Results:
        return cls(*({row.name: [] for row in selected} for _ in range(3)))


def rounds(args: argparse.Namespace, selected: list[Row], results: Results) -> None:
    runs, naive_runs, before_runs = results.runs, results.naive_runs, results.before_runs
    for round_ in range(args.repeat):
        for row in selected:
            # The two trees take turns going first: the first run of a pair measured a few
            # percent slower (a row's run before it leaves less in the page cache).
            trees: list[str | None] = [args.before, None] if args.before else [None]
            for tree in trees if round_ % 2 == 0 else trees[::-1]:
                work = Path(tempfile.mkdtemp(prefix="kubetrail-bench-", dir=args.output_dir))
                try:
                    m, naive = run_row(row, work, args.cold, tree, not args.no_naive and tree is None)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                (before_runs if tree else runs)[row.name].append(m)
                if naive is not None:
                    naive_runs[row.name].append(naive)
                if args.startup and row.src.name.startswith("audit-"):
                    small = replace(row, src=audit_lines_file(STARTUP_LINES), records=STARTUP_LINES)
                    work = Path(tempfile.mkdtemp(prefix="kubetrail-bench-", dir=args.output_dir))
                    try:
                        m, _ = run_row(small, work, True, tree, False)
                    finally:
                        shutil.rmtree(work, ignore_errors=True)
                    results.startup.setdefault((row.name, tree), []).append(m)


def report_startup(args: argparse.Namespace, selected: list[Row], results: Results) -> None:
    """Each row's CPU beyond its fixed cost (the same config on STARTUP_LINES lines: imports,
    e.g. aiohttp for the http output, and set-up), against ``json+time``'s: the per-record
    cost, which a larger input does not dilute."""
    trees: list[str | None] = [*([args.before] if args.before else []), None]
    print(f"CPU s beyond start-up (median CPU minus the median CPU of the same row on {STARTUP_LINES:,} lines):")
    for tree in trees:
        label = "before" if tree else "now"
        plain_key = ("json+time", tree)
        base = None
        if plain_key in results.startup:
            plain_runs = results.before_runs if tree else results.runs
            base = median_cpu(plain_runs["json+time"]) - median_cpu(results.startup[plain_key])
        for row in selected:
            if (row.name, tree) not in results.startup:
                continue
            full = median_cpu((results.before_runs if tree else results.runs)[row.name])
            fixed = median_cpu(results.startup[(row.name, tree)])
            ratio = f"{(full - fixed) / base:.2f}x plain's" if base else ""
            figures = f"cpu {full:5.2f} start-up {fixed:5.2f} beyond {full - fixed:5.2f}"
            print(f"  {label:<6} {row.name:<28} {figures}  {ratio}")


def report(args: argparse.Namespace, selected: list[Row], results: Results) -> None:
    if args.startup:
        report_startup(args, selected, results)
    runs, naive_runs, before_runs = results.runs, results.naive_runs, results.before_runs
    print(f"{cpu_count_hint()}; median of {args.repeat} rounds; input sizes:")
    for row in selected:
        print(f"  {row.name}: {row.src.name} ({row.src.stat().st_size / 1e6:.0f} MB) -> {row.records:,} records")
    reference = median(runs["k8s_audit"]).wall if "k8s_audit" in runs else None
    plain = median(runs["json+time"]).wall if "json+time" in runs else None
    plain_cpu = median_cpu(runs["json+time"]) if "json+time" in runs else None
    print(f"{'row':<30} {'wall s':>7} {'(all)':<20} {'cpu s':>6} {'RSS MB':>7} {'naive s':>8} {'x naive':>8}  target")
    for row in selected:
        m = median(runs[row.name])
        walls = ",".join(f"{x.wall:.2f}" for x in runs[row.name])
        naive_text = speed = ""
        if naive_runs[row.name]:
            nm = median(naive_runs[row.name])
            naive_text = f"{nm.wall:8.2f}"
            speed = f"{nm.wall / m.wall:7.2f}x"
        if row.name == "cri":
            verdict = f"<= 2.0 s: {'PASS' if m.wall <= 2.0 else 'MISS'}"
        elif row.name.startswith("json+time ") and plain is not None and row.name != "json+time out_file":
            # Checked before the reference row's presence: these rows compare with plain only.
            verdict = f"{m.wall / plain:.2f}x plain; <= 1.10x: {'PASS' if m.wall <= 1.10 * plain else 'MISS'}"
            if plain_cpu:  # the walls swing with the machine's load; CPU seconds much less
                verdict += f"; median CPU {median_cpu(runs[row.name]) / plain_cpu:.2f}x plain's"
        elif row.name == "k8s_audit" or reference is None:
            verdict = "(reference)" if row.name == "k8s_audit" else ""
        else:
            ratio = m.wall / reference
            verdict = f"{ratio:.2f}x k8s_audit; <= 1.3x: {'PASS' if ratio <= 1.3 else 'MISS'}"
            if row.name == "json+time out_file" and plain is not None:
                verdict += f"; {m.wall / plain:.2f}x plain"
        # CPU: the median of the row's CPU seconds (the median-wall run's CPU can be an outlier).
        cpu = median_cpu(runs[row.name])
        figures = f"{m.wall:7.2f} ({walls:<18}) {cpu:6.2f} {m.max_rss_mb:7.1f} {naive_text:>8} {speed:>8}"
        print(f"{row.name:<30} {figures}  {verdict}")
    if args.before:
        print(f"before: {args.before}")
        for row in selected:
            b, m = median(before_runs[row.name]), median(runs[row.name])
            walls = ",".join(f"{x.wall:.2f}" for x in before_runs[row.name])
            cpus = ",".join(f"{x.cpu:.2f}" for x in before_runs[row.name])
            now_cpus = ",".join(f"{x.cpu:.2f}" for x in runs[row.name])
            b_cpu, m_cpu = median_cpu(before_runs[row.name]), median_cpu(runs[row.name])  # medians of CPU
            before_ratio = ""
            if row.name.startswith("json+time ") and "json+time" in before_runs:
                base = median_cpu(before_runs["json+time"])
                before_ratio = f"; before: median CPU {b_cpu / base:.2f}x its plain's"
            print(
                f"{row.name:<30} before wall {b.wall:6.2f} ({walls}) cpu {b_cpu:5.2f} ({cpus}) RSS {b.max_rss_mb:5.1f}"
                f" | now wall {m.wall:6.2f} cpu {m_cpu:5.2f} ({now_cpus}) | now/before wall {m.wall / b.wall:.2f}"
                f" cpu {m_cpu / b_cpu:.2f}{before_ratio}"
            )


if __name__ == "__main__":
    sys.exit(main())
