"""Credentials that rotate: the bearer token file and the CA bundle.

Mounted Secrets and projected service-account tokens are replaced on disk while the process
runs (the kubelet swaps a projected volume's ``..data`` symlink atomically, at 80% of the token's
lifetime). The token is re-read when its file's (inode, mtime, size) changes, checked at most once
a second, so a rotated token is used from the next request on and the old one never reaches its
expiry in use; also after ``kube_token_ttl`` (for files whose stamp does not change, such as a
network filesystem) and whenever the server answers 401. The TLS context is rebuilt when any CA
or client certificate file changes, by the outputs' :mod:`kubetrail.core.tls_files`. Nothing here
ever reads an environment variable.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetrail.core.errors import ConfigError
from kubetrail.core.secrets import CHECK_INTERVAL, file_stamp
from kubetrail.core.tls_files import ClientTls


class CredentialError(Exception):
    """A credential file is missing, empty or unreadable."""


class TokenSource:
    def __init__(self, path: str | None, ttl: float, on_read: Callable[[str], None] | None = None) -> None:
        self.path = path or None
        self.ttl = ttl
        self._token: str | None = None
        self._read_at = 0.0
        self._checked = 0.0
        self._stamp: tuple[int, int, int] | None = None
        # Why the file is read next (first, changed, ttl, 401): the kubetrail_kube_token_reads metric.
        self.on_read = on_read
        self._why = "first"

    def header(self) -> dict[str, str]:
        token = self.token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def token(self) -> str | None:
        if self.path is None:
            return None  # no token file configured: e.g. behind `kubectl proxy`
        now = time.monotonic()
        if self._token is not None and now - self._checked >= CHECK_INTERVAL:
            self._checked = now
            if file_stamp(self.path) != self._stamp:
                self._token, self._why = None, "changed"
            elif now - self._read_at >= self.ttl:
                self._token, self._why = None, "ttl"
        if self._token is None:
            self._stamp = file_stamp(self.path)
            self._token = self._read()
            self._read_at = self._checked = now
            if self.on_read is not None:
                self.on_read(self._why)
        return self._token

    def invalidate(self) -> None:
        """Forget the cached token (after a 401): the next request re-reads the file."""
        self._token, self._why = None, "401"

    def _read(self) -> str:
        assert self.path is not None
        try:
            token = Path(self.path).read_text().strip()
        except OSError as exc:
            raise CredentialError(f"cannot read token file {self.path}: {exc.strerror}") from None
        if not token:
            raise CredentialError(f"token file {self.path} is empty")
        return token


class TLSContextSource:
    """An SSL context for the API server, rebuilt when its files change.

    The rebuilding is the outputs' mechanism, :class:`~kubetrail.core.tls_files.ClientTls`:
    the files checked at most once a second, a half-written rotation (a key that does not match
    its certificate yet) keeps the last good context and is logged once, counted under
    ``kubetrail_secret_reload_errors_total{option}``. What is particular to the API server is
    when it starts: on first use, not at construction, so that a CA file mounted after start is
    a :class:`CredentialError` that the caller retries like any other failed request."""

    def __init__(
        self,
        ca_file: str | None,
        ca_path: str | None,
        verify: bool,
        client_cert: str | None = None,
        client_key: str | None = None,
    ) -> None:
        self.ca_file = ca_file
        self.ca_path = ca_path
        self.verify = verify
        self.client_cert = client_cert
        self.client_key = client_key
        self._files: ClientTls | None = None
        self._owner: tuple[logging.Logger, Any] | None = None

    def bind(self, logger: logging.Logger, metrics: Any) -> None:
        """Log and count reloads as this component (``metrics``: its ``counter`` factory, or None)."""
        self._owner = (logger, metrics)
        if self._files is not None:
            self._files.bind(logger, metrics)

    def context(self) -> ssl.SSLContext:
        if self._files is None:
            try:
                files = {
                    "kube_ca_file": self.ca_file,
                    "client-certificate": self.client_cert,
                    "client-key": self.client_key,
                }
                self._files = ClientTls(
                    files,
                    self._build,
                    directories={"kube_ca_path": self.ca_path},
                )
            except ConfigError as exc:
                raise CredentialError(exc.message) from None
            if self._owner is not None:
                self._files.bind(*self._owner)
        return self._files.context()

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            if self.ca_file or self.ca_path:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = True
                ctx.verify_mode = ssl.CERT_REQUIRED
            try:
                if self.ca_file:
                    ctx.load_verify_locations(cafile=self.ca_file)
                if self.ca_path:
                    for name in sorted(os.listdir(self.ca_path)):
                        full = os.path.join(self.ca_path, name)
                        if os.path.isfile(full):
                            ctx.load_verify_locations(cafile=full)
            except (OSError, ssl.SSLError) as exc:
                option = "kube_ca_file" if self.ca_file else "kube_ca_path"
                raise ConfigError(f"cannot load CA from {self.ca_file or self.ca_path}: {exc}", key=option) from None
        if self.client_cert:
            try:
                ctx.load_cert_chain(self.client_cert, self.client_key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot load client certificate {self.client_cert}: {exc}", key="client-certificate"
                ) from None
        return ctx
