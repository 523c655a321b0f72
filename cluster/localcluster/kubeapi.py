"""A deliberately tiny, synchronous Kubernetes REST client (stdlib ``http.client``).

Why not kubetrail's own client or the official one: the harness must not depend on the code
under test, and it must work in a bare ``python3`` with only ``cryptography`` installed.  It
returns every status code instead of raising, because the tests assert on 403/410 as much as
on 200, and it exposes watches as a line-by-line stream so a test can open a watch, cause
something, and then read what arrived.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def audit_id(self) -> str | None:
        """The ``Audit-Id`` response header: the auditID of this request's audit records."""
        return self.headers.get("audit-id")

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.body[:500].decode(errors='replace')}"


class WatchStream:
    """An open watch: iterate or call :meth:`next` to get decoded watch events."""

    def __init__(self, conn: http.client.HTTPSConnection, resp: http.client.HTTPResponse) -> None:
        self._conn = conn
        self._resp = resp
        self.status = resp.status

    def next(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """The next watch event, or None when the server ended the stream.

        Raises ``TimeoutError`` when nothing arrives within ``timeout`` seconds.
        """
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        try:
            line = self._resp.readline()
        except TimeoutError as exc:
            raise TimeoutError(f"no watch event within {timeout}s") from exc
        if not line:
            return None
        decoded: dict[str, Any] = json.loads(line)
        return decoded

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while (event := self.next()) is not None:
            yield event

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class KubeAPI:
    """Talk to one API server as one identity (bearer token), verifying its CA."""

    def __init__(self, url: str, ca_file: Path | str, token: str | None = None, timeout: float = 30.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.url = url.rstrip("/")
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 443
        self.token = token
        self.timeout = timeout
        self._ssl = ssl.create_default_context(cafile=str(ca_file))

    def _connect(self, timeout: float | None) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self._ssl, timeout=timeout or self.timeout)

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    @staticmethod
    def _target(path: str, params: Mapping[str, Any] | None) -> str:
        if not params:
            return path
        clean = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in params.items() if v is not None}
        return f"{path}?{urllib.parse.urlencode(clean)}"

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        content_type: str = "application/json",
    ) -> ApiResponse:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        conn = self._connect(timeout)
        try:
            conn.request(
                method,
                self._target(path, params),
                body=data,
                headers=self._headers(content_type if data is not None else None),
            )
            resp = conn.getresponse()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            return ApiResponse(resp.status, resp.read(), headers)
        finally:
            conn.close()

    def get(self, path: str, **params: Any) -> ApiResponse:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any, **params: Any) -> ApiResponse:
        return self.request("POST", path, body, params=params)

    def put(self, path: str, body: Any, **params: Any) -> ApiResponse:
        return self.request("PUT", path, body, params=params)

    def delete(self, path: str, **params: Any) -> ApiResponse:
        return self.request("DELETE", path, params=params)

    def watch(self, path: str, timeout: float = 30.0, **params: Any) -> WatchStream:
        """Open ``GET path?watch=true&...``; the caller reads events from the stream."""
        conn = self._connect(timeout)
        conn.request("GET", self._target(path, {"watch": "true", **params}), headers=self._headers(None))
        resp = conn.getresponse()
        if resp.status != 200:
            body = resp.read()
            conn.close()
            raise WatchError(ApiResponse(resp.status, body))
        return WatchStream(conn, resp)

    def ensure(self, collection: str, obj: dict[str, Any]) -> ApiResponse:
        """Create ``obj`` in ``collection``, or replace it if it already exists (idempotent apply)."""
        created = self.post(collection, obj)
        if created.status != 409:
            return created
        name = obj["metadata"]["name"]
        current = self.get(f"{collection}/{name}")
        if not current.ok:
            return current
        updated = json.loads(json.dumps(obj))
        updated["metadata"]["resourceVersion"] = current.json()["metadata"]["resourceVersion"]
        return self.put(f"{collection}/{name}", updated)


class WatchError(RuntimeError):
    def __init__(self, response: ApiResponse) -> None:
        super().__init__(f"watch refused: {response}")
        self.response = response
