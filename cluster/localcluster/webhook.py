"""A minimal HTTPS receiver for the kube-apiserver audit webhook backend.

Why it exists: the webhook's URL, CA and credentials are fixed when kube-apiserver starts,
so a receiver must be listening (or at least have its port and certificate) before the
cluster comes up.  The socket is bound in the constructor, which removes any race between
picking a port and using it.  It runs on a stdlib ``ThreadingHTTPServer`` in a background
thread so it works in any test, sync or async.

It records every POST (accepted or not) with the audit IDs it carried, and can be told to
answer the next N requests with an error, which is how the tests observe the apiserver's
retry-with-backoff behaviour.
"""

from __future__ import annotations

import hmac
import json
import secrets
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from . import pki


@dataclass(frozen=True)
class Delivery:
    """One POST from the apiserver."""

    received_at: float
    status: int  # what the sink answered
    path: str  # including the query string the apiserver adds (``?timeout=30s``)
    authenticated: bool
    body: dict[str, Any] = field(repr=False)

    @property
    def items(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.body.get("items") or []
        return items

    @property
    def audit_ids(self) -> list[str]:
        return [item.get("auditID", "") for item in self.items]


class AuditSink:
    """HTTPS audit-webhook receiver with its own CA, serving cert and bearer token.

    Pass ``webhook_url=sink.url, webhook_ca=sink.ca_file, webhook_token_file=sink.token_file``
    to :meth:`LocalCluster.up`.
    """

    def __init__(self, directory: Path, path: str = "/audit") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        ca = pki.make_ca("kubetrail-audit-sink-ca")
        self.ca_file = directory / "sink-ca.crt"
        pki.write_cert(self.ca_file, ca.cert)
        serving = pki.serving_cert(ca, "audit-sink")
        serving.write(directory / "sink.crt", directory / "sink.key")
        self.token = secrets.token_hex(16)
        self.token_file = directory / "sink.token"
        pki.write_secret(self.token_file, self.token)
        self._lock = threading.Condition()
        self._deliveries: list[Delivery] = []
        self._fail: list[int] = []  # statuses to answer with, next request first

        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                expected = f"Bearer {sink.token}"
                authed = hmac.compare_digest(self.headers.get("Authorization", ""), expected)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"unparseable": raw[:200].decode(errors="replace")}
                with sink._lock:
                    if not authed:
                        status = 401
                    elif self.path.split("?", 1)[0] != path:  # the apiserver adds ?timeout=30s
                        status = 404
                    elif sink._fail:
                        status = sink._fail.pop(0)
                    else:
                        status = 200
                    sink._deliveries.append(Delivery(time.time(), status, self.path, authed, body))
                    sink._lock.notify_all()
                reply = b"{}" if status == 200 else b'{"error":"audit sink told to fail"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(directory / "sink.crt", directory / "sink.key")
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.port = int(self._server.server_address[1])
        self.url = f"https://127.0.0.1:{self.port}{path}"
        self._thread: threading.Thread | None = None

    def start(self) -> AuditSink:
        self._thread = threading.Thread(target=self._server.serve_forever, name="audit-sink", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail_next(self, count: int, status: int = 500) -> None:
        """Answer the next ``count`` POSTs with ``status`` instead of 200."""
        with self._lock:
            self._fail = [status] * count

    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._deliveries)

    def accepted_events(self) -> list[dict[str, Any]]:
        """All audit events from POSTs answered with 200, in arrival order."""
        return [item for d in self.deliveries() if d.status == 200 for item in d.items]

    def wait_for(self, predicate: Callable[[list[Delivery]], bool], timeout: float = 30.0) -> list[Delivery]:
        """Block until ``predicate(deliveries)`` holds; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(list(self._deliveries)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"audit sink condition not met within {timeout}s ({len(self._deliveries)} deliveries so far)"
                    )
                self._lock.wait(min(remaining, 0.5))
            return list(self._deliveries)
