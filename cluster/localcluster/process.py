"""Starting, watching and stopping control-plane processes.

Why process groups: each component is started with ``start_new_session=True`` so it leads
its own process group.  ``down`` can then signal the whole group (``killpg``) from any later
process that only knows the pid from the state file, and a Ctrl-C aimed at the terminal
running ``local-cluster up`` or pytest does not hit the components half-way through a
controlled shutdown.

Why pid + argv checks: a state file can outlive its processes (reboot, SIGKILL of the
harness).  Before signalling a pid, :meth:`Component.alive` checks that
``/proc/<pid>/cmdline`` still starts with the binary we launched, so a recycled pid belonging
to someone else is never killed.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ComponentError(RuntimeError):
    """A component died or did not become ready; the message carries its last log lines."""


@dataclass
class Component:
    name: str
    args: list[str]
    log_path: Path
    port: int
    pid: int | None = None
    env: dict[str, str] | None = field(default=None, repr=False, compare=False)  # None: inherit
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            log.write(f"=== localcluster: starting {self.name} at {stamp}\n".encode())
            log.flush()
            try:
                self._popen = subprocess.Popen(
                    self.args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    env=self.env,
                )
            except OSError as exc:
                raise ComponentError(f"cannot start {self.name} ({self.args[0]}): {exc}") from exc
        self.pid = self._popen.pid

    def _proc_matches(self) -> bool:
        """True if /proc says ``pid`` is a live (non-zombie) process running our binary."""
        if self.pid is None:
            return False
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        state = stat.rsplit(")", 1)[-1].split()[0]
        return state not in ("Z", "X") and cmdline[0].decode(errors="replace") == self.args[0]

    def alive(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        return self._proc_matches()

    def exit_code(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    def stop(self, timeout: float = 15.0, graceful: bool = True) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` seconds.

        ``graceful=False`` sends SIGKILL at once: a crash, as clients see it (connections reset).
        """
        if self.pid is None:
            return
        steps = [(signal.SIGTERM, timeout)] if graceful else []
        for sig, wait in [*steps, (signal.SIGKILL, 10.0)]:
            if not self.alive():
                break
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            except PermissionError:
                os.kill(self.pid, sig)
            deadline = time.monotonic() + wait
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        if self._popen is not None:
            try:
                self._popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.alive():
            raise ComponentError(f"{self.name} (pid {self.pid}) survived SIGKILL")

    def log_tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                tail = collections.deque(fh, maxlen=lines)
        except OSError as exc:
            return f"<cannot read {self.log_path}: {exc}>"
        return b"".join(tail).decode(errors="replace").rstrip()

    def rss_kb(self) -> int | None:
        """VmRSS from /proc/<pid>/status, in kB."""
        if not self.alive():
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def failure(self, what: str) -> ComponentError:
        code = self.exit_code()
        status = f" (exit code {code})" if code is not None else ""
        return ComponentError(f"{self.name} {what}{status}. Last lines of {self.log_path}:\n{self.log_tail()}")

    def wait_ready(self, check: Callable[[], tuple[bool, str]], timeout: float) -> float:
        """Poll ``check`` until it succeeds; fail fast if the process dies.  Returns seconds."""
        started = time.monotonic()
        deadline = started + timeout
        detail = "not checked yet"
        while True:
            if not self.alive():
                raise self.failure("exited during startup")
            ok, detail = check()
            if ok:
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise self.failure(f"was not ready after {timeout:.0f}s (last check: {detail})")
            time.sleep(0.25)

    def to_state(self) -> dict[str, Any]:
        return {"pid": self.pid, "args": self.args, "log": str(self.log_path), "port": self.port}

    @classmethod
    def from_state(cls, name: str, state: dict[str, Any]) -> Component:
        return cls(name, list(state["args"]), Path(state["log"]), int(state["port"]), state.get("pid"))


def http_call(
    method: str,
    url: str,
    body: Any = None,
    *,
    token: str | None = None,
    context: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """One HTTP(S) request without proxies (stdlib urllib would honour *_proxy variables)."""
    parts = urllib.parse.urlsplit(url)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def probe(url: str, **kwargs: Any) -> tuple[bool, str]:
    """A readiness check: (HTTP 200?, short description)."""
    try:
        status, body = http_call("GET", url, **kwargs)
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return status == 200, f"HTTP {status} {body[:200].decode(errors='replace')}"


def free_port(taken: set[int]) -> int:
    """An unused 127.0.0.1 TCP port, distinct from ``taken``."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port
    raise ComponentError("could not find a free loopback port")


def port_is_free(port: int) -> bool:
    """No one listens on 127.0.0.1:``port``.

    SO_REUSEADDR, as the Go servers use it: connections left over from a previous process
    (TIME_WAIT, a client's half-closed watch) must not count as "in use" on a restart.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
