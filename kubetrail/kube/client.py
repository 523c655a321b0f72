"""Requests, paginated lists and watch streams against the API server.

Watch streams are newline-delimited JSON inside chunked HTTP. They are split on ``\\n`` only,
across chunk boundaries, with a cap on a line's length; a line that does not decode is logged
(at most once a minute) and skipped, and the stream goes on: one bad line never stalls a
watch (Fluent Bit issue #11252).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson

from kubetrail import __version__
from kubetrail.core.metrics import ComponentMetrics
from kubetrail.kube.config import ConnectionConfig
from kubetrail.kube.credentials import CredentialError, TLSContextSource, TokenSource

DEFAULT_MAX_LINE = 16 * 1024 * 1024


class ApiError(Exception):
    """An answer other than 2xx, or a 2xx that is not what the API promises."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{status} {reason}: {message}")

    @classmethod
    def from_body(cls, status: int, body: bytes, what: str) -> ApiError:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and doc.get("kind") == "Status":
            return cls(status, str(doc.get("reason") or ""), str(doc.get("message") or ""))
        snippet = body[:200].decode("utf-8", "replace").replace("\n", " ")
        return cls(status, "NotKubernetes", f"{what}: the answer is not a Kubernetes Status: {snippet!r}")


class KubeClient:
    def __init__(
        self,
        config: ConnectionConfig,
        logger: logging.Logger | None = None,
        max_line: int = DEFAULT_MAX_LINE,
        on_bad_line: Callable[[str], None] | None = None,
        metrics: ComponentMetrics | None = None,
    ) -> None:
        self.config = config
        self.log = logger or logging.getLogger("kubetrail.kube")
        self.max_line = max_line
        self.on_bad_line = on_bad_line
        # Per component: answers by HTTP status (401s show a credential problem) and token reads
        # by reason (a "changed" read is a rotation picked up).
        self._m_responses = (
            metrics.counter("kubetrail_kube_responses", "API server answers, by HTTP status", "code")
            if metrics is not None
            else None
        )
        token_reads = (
            metrics.counter("kubetrail_kube_token_reads", "Token file reads, by reason", "reason")
            if metrics is not None
            else None
        )
        self.tokens = TokenSource(
            config.token_file,
            config.token_ttl,
            on_read=(lambda why: token_reads.labels(why).inc()) if token_reads is not None else None,
        )
        self.tls = (
            TLSContextSource(
                config.ca_file, config.ca_path, config.tls_verify, config.client_cert_file, config.client_key_file
            )
            if config.url.startswith("https")
            else None
        )
        if self.tls is not None:
            self.tls.bind(self.log, metrics)  # a half-written rotation logs and counts as this component
        self._session: aiohttp.ClientSession | None = None
        self._bad_line_logged = 0.0
        self.requests = 0  # requests sent, for metrics and the efficiency benchmark
        self.bytes_received = 0

    def _session_(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": f"kubetrail/{__version__}", "Accept": "application/json"},
                timeout=aiohttp.ClientTimeout(total=None, connect=10),
            )
        return self._session

    def _count(self, status: int) -> None:
        if self._m_responses is not None:
            self._m_responses.labels(str(status)).inc()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _tls_kwargs(self) -> dict[str, Any]:
        if self.tls is None:
            return {}
        kwargs: dict[str, Any] = {"ssl": self.tls.context()}
        if self.config.tls_vhost:
            kwargs["server_hostname"] = self.config.tls_vhost
        return kwargs

    async def request(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        body: Any = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """One API call; a 401 re-reads the token file once and tries again."""
        data = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in range(2):
            self.requests += 1
            async with self._session_().request(
                method,
                self.config.url + path,
                params=params,
                data=data,
                headers={**headers, **self.tokens.header()},
                timeout=aiohttp.ClientTimeout(total=timeout),
                **self._tls_kwargs(),
            ) as response:
                payload = await response.read()
                self.bytes_received += len(payload)
                self._count(response.status)
                if response.status == 401 and attempt == 0 and self.tokens.path:
                    self.tokens.invalidate()
                    continue
                if response.status >= 300:
                    raise ApiError.from_body(response.status, payload, f"{method} {path}")
                try:
                    doc = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    raise ApiError.from_body(response.status, payload, f"{method} {path}") from None
                if not isinstance(doc, dict):
                    raise ApiError(response.status, "NotKubernetes", f"{method} {path}: not a JSON object")
                return doc
        raise AssertionError("unreachable")

    async def list_pages(
        self, path: str, params: dict[str, str] | None = None, limit: int = 500
    ) -> AsyncIterator[dict[str, Any]]:
        """Each page of a paginated list (``limit`` + ``continue``)."""
        query = dict(params or {})
        if limit > 0:
            query["limit"] = str(limit)
        while True:
            page = await self.request("GET", path, query)
            yield page
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return
            query["continue"] = token

    async def watch(self, path: str, params: dict[str, str], timeout_seconds: int) -> AsyncIterator[dict[str, Any]]:
        """Watch events as dicts, until the server ends the stream."""
        query = {**params, "watch": "1", "timeoutSeconds": str(timeout_seconds)}
        for attempt in range(2):
            self.requests += 1
            async with self._session_().get(
                self.config.url + path,
                params=query,
                headers=self.tokens.header(),
                timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=timeout_seconds + 30),
                **self._tls_kwargs(),
            ) as response:
                self._count(response.status)
                if response.status == 401 and attempt == 0 and self.tokens.path:
                    self.tokens.invalidate()
                    continue
                if response.status >= 300:
                    raise ApiError.from_body(response.status, await response.read(), f"watch {path}")
                async for event in self._decode_stream(response.content):
                    yield event
                return

    async def _decode_stream(self, content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
        pending = b""
        skipping = False
        async for chunk in content.iter_any():
            self.bytes_received += len(chunk)
            pending = pending + chunk if pending else chunk
            start = 0
            while True:
                end = pending.find(b"\n", start)
                if end < 0:
                    break
                line = pending[start:end]
                start = end + 1
                if skipping:
                    skipping = False
                    continue
                if line.strip():
                    event = self._decode_line(line)
                    if event is not None:
                        yield event
            pending = pending[start:]
            if len(pending) > self.max_line:
                self._bad_line(f"line longer than {self.max_line} bytes skipped")
                pending = b""
                skipping = True
        if pending.strip() and not skipping:
            event = self._decode_line(pending)
            if event is not None:
                yield event

    def _decode_line(self, line: bytes) -> dict[str, Any] | None:
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            self._bad_line(f"undecodable line skipped: {line[:120]!r}")
            return None
        if not isinstance(event, dict) or "type" not in event or not isinstance(event.get("object"), dict):
            self._bad_line(f"not a watch event, skipped: {line[:120]!r}")
            return None
        return event

    def _bad_line(self, message: str) -> None:
        if self.on_bad_line is not None:
            self.on_bad_line(message)
        now = time.monotonic()
        if now - self._bad_line_logged >= 60:
            self._bad_line_logged = now
            self.log.warning("watch stream: " + message)


__all__ = ["ApiError", "CredentialError", "KubeClient"]
