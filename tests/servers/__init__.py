"""Real servers for the sink tests, fetched from the registries this machine reaches.

* ``search``: OpenSearch and Elasticsearch from Maven Central (codelibs' runners, pinned in
  ``tests/servers/{opensearch,elasticsearch}/pom.xml``), run with the local Java 17.
* ``loki``: Loki built from its Go module (pinned in ``tests/servers/loki/go.mod``).
* ``minio``: MinIO built from its Go module (``tests/servers/minio/go.mod``), for ``s3``.
* ``moto``: moto's AWS API emulator in server mode (PyPI, ``requirements/ci.txt``), for
  ``cloudwatch_logs``: AWS itself cannot be reached from here.
* ``gelf``: graygelf's GELF UDP server (npm, ``tests/servers/gelf/package-lock.json``) run by Node.

They are fetched or built once into ``~/.cache/kubetrail/`` (or ``$KUBETRAIL_CACHE_DIR``),
keyed by version (:func:`go_build`, :func:`maven_lib`). ``python -m tests.servers build`` does
it ahead of the tests (scripts/test calls it); the test fixtures build on demand too and skip
with a message when they cannot (:func:`running`).

Every wrapper (these, ``otelcol``, ``rsyslog``, each Kafka node) runs its process through
:class:`ServerProcess`: spawn in a session of its own with a log file, poll readiness, retry on
fresh ports, the log's last lines when it does not start, SIGTERM then SIGKILL to stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from tests.timing import scaled

HERE = Path(__file__).resolve().parent


class ServerUnavailable(Exception):
    """The server cannot be built or started here; the message says how to get it."""


def cache_root() -> Path:
    base = os.environ.get("KUBETRAIL_CACHE_DIR")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "kubetrail"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port free now (TCP, or UDP with ``socket.SOCK_DGRAM``); it can be taken
    before the server binds it, which is why :meth:`ServerProcess.start_attempts` retries."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    """Something accepts TCP connections on the loopback ``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def udp_bound(port: int) -> bool:
    """Someone holds the loopback UDP ``port`` (our own bind is refused): a UDP server's readiness."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def http_get(url: str, timeout: float = 5.0) -> bytes | None:
    """The body of a 2xx answer, None for anything else (refused, error status, timeout)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body: bytes = response.read()
            return body
    except (urllib.error.URLError, OSError):
        return None


class ServerProcess:
    """What every server wrapper here shares, so none repeats it: the process in a session of
    its own (a wrapper script's children stop with it) writing to a log file in a work
    directory; readiness polled until the process is ready, exits or runs out of time; a few
    attempts on fresh ports (a free port can be taken between picking and binding); the log's
    last lines in the error when it does not start; stopping with SIGTERM to the whole group,
    SIGKILL when it does not go in time.

    ``name`` is used in messages; ``start_error`` is what a failed start raises
    (:class:`ServerUnavailable`, which the fixtures turn into a skip, or ``RuntimeError`` for
    servers whose failure to start is a test failure)."""

    name = "server"
    start_error: type[Exception] = ServerUnavailable
    stop_timeout = 30.0
    workdir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def spawn(
        self,
        args: Sequence[str],
        *,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | None = None,
        log_mode: str = "ab",
        **popen: Any,
    ) -> subprocess.Popen[bytes]:
        """Start ``args`` in a session of its own, output to :attr:`log_path` (or, with ``stdout``
        such as ``subprocess.PIPE``, only its stderr there)."""
        with open(self.log_path, log_mode) as log:
            self.proc = subprocess.Popen(
                list(args),
                stdin=stdin,
                stdout=log if stdout is None else stdout,
                stderr=subprocess.STDOUT if stdout is None else log,
                start_new_session=True,
                **popen,
            )
        return self.proc

    def wait_until(self, ready: Callable[[], bool | None], timeout: float, interval: float = 0.2) -> bool:
        """Poll ``ready`` until it says True (ready) or False (this attempt failed, stop waiting);
        None means not yet. False too when the process exits or ``timeout`` passes: ``timeout``
        as on an idle machine, stretched by :func:`tests.timing.scaled` on a loaded one (a JVM
        took minutes to start at load 25 in CI; the wait still ends as soon as it is ready)."""
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            answer = ready()
            if answer is not None:
                return answer
            time.sleep(interval)
        return False

    def start_attempts(
        self,
        launch: Callable[[int], object],
        ready: Callable[[], bool | None],
        timeout: float,
        interval: float = 0.2,
        attempts: int = 3,
    ) -> None:
        """``launch(attempt)`` (which calls :meth:`spawn`) until ``ready`` within ``timeout``;
        else :attr:`start_error` with the log's last lines."""
        for attempt in range(attempts):
            launch(attempt)
            if self.wait_until(ready, timeout, interval):
                return
            self.stop_process()
        raise self.start_error(f"{self.name} did not start; last log lines:\n{self.log_tail()}")

    def stop_process(self, kill: bool = False, timeout: float | None = None) -> None:
        """SIGTERM to the process group (``kill``: SIGKILL), SIGKILL if it is not gone in time."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # a runner whose main waits on its input stops at its end
        os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_timeout if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def stop(self) -> None:
        self.stop_process()
        shutil.rmtree(self.workdir, ignore_errors=True)


class Startable(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


S = TypeVar("S", bound=Startable)


@contextmanager
def running(make: Callable[[], S], unavailable: str, build_hint: bool = True) -> Iterator[S]:
    """The server ``make()`` returns, started, and stopped at the end: what every server fixture
    does. When it cannot be had here (:class:`ServerUnavailable`), the test is skipped with
    ``unavailable`` and the reason (and how to build the servers ahead, with ``build_hint``).

    In CI the test fails instead (:mod:`tests.required`)."""
    from tests.required import unavailable as missing  # pytest: only the tests use this

    server: S | None = None
    try:
        server = make()
        server.start()
    except ServerUnavailable as exc:
        if server is not None:
            server.stop()  # what did start (a cluster's first nodes, a work directory) goes
        hint = " (python -m tests.servers build)" if build_hint else ""
        missing(f"{unavailable}: {exc}{hint}", kind="servers")
    try:
        yield server
    finally:
        server.stop()


# -- fetching and building, once into the cache --------------------------------------------------

GO_BUILD_ENV = {"GOWORK": "off", "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}


def find_go(what: str) -> str:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)
    if go is None:
        raise ServerUnavailable(f"Go is not installed (needed to build {what}): install Go 1.26")
    return go


def go_version(go: str) -> str:
    return subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60).stdout.strip()


def go_build(what: str, go: str, module_dir: Path, package: str, target: Path, timeout: float) -> Path:
    """``target`` built from ``package`` of the pinned ``module_dir`` (go.mod, go.sum), once.

    The build runs in a copy of the module files (``-mod=mod`` may tidy go.mod, and the work
    tree is not the build's to change) and lands by an atomic rename, so a killed build leaves
    nothing half-written where the next run looks."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    with tempfile.TemporaryDirectory(prefix=f"kubetrail-{target.name}-build-") as workdir:
        for path in module_dir.iterdir():  # go.mod, go.sum and any tools.go
            if path.is_file():
                shutil.copy(path, Path(workdir) / path.name)
        try:
            proc = subprocess.run(
                [go, "build", "-trimpath", "-o", str(tmp), package],
                cwd=workdir,
                env={**os.environ, **GO_BUILD_ENV},
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            tmp.unlink(missing_ok=True)
            raise ServerUnavailable(f"building {what} took over {timeout // 60:.0f} minutes") from None
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ServerUnavailable(f"building {what} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    os.replace(tmp, target)
    return target


def maven_lib(what: str, pom: Path, lib: Path) -> Path:
    """The jars ``pom`` depends on, copied once into ``lib`` (``mvn dependency:copy-dependencies``);
    a ``.complete`` stamp marks a finished copy."""
    if (lib / ".complete").exists():
        return lib
    if shutil.which("java") is None:
        raise ServerUnavailable("no 'java' on PATH: install Java 17 (apt-get install openjdk-17-jre-headless)")
    if shutil.which("mvn") is None:
        raise ServerUnavailable("no 'mvn' on PATH: install Maven (apt-get install maven)")
    tmp = lib.with_name(f"lib.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(
        ["mvn", "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={tmp}"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ServerUnavailable(f"fetching {what} from Maven Central failed:\n{(proc.stdout + proc.stderr)[-2000:]}")
    (tmp / ".complete").touch()
    shutil.rmtree(lib, ignore_errors=True)
    tmp.rename(lib)
    return lib
