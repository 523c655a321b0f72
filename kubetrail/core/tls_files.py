"""Client TLS contexts built from files that rotate (``tls.crt_file``, ``tls.key_file``, ``tls.ca_file``).

cert-manager renews a client certificate (and a CA bundle) by writing the Secret again; the
kubelet swaps the volume's ``..data`` symlink. An output that loaded its ``SSLContext`` once at
start would keep presenting the old certificate, and its connections would start failing when it
expires or when the server stops trusting the old CA. :class:`ClientTls` is the one mechanism
every output that builds a client context from files uses (the HTTP outputs through
:mod:`kubetrail.sinks.http_base`, the stream outputs ``forward``, ``syslog`` and ``gelf`` through
:mod:`kubetrail.sinks.stream_base`):

* **When it looks.** :meth:`ClientTls.context` is called where a connection is about to be made
  (each request of the HTTP client, each connect of a stream). It stats the files at most once a
  second (:data:`kubetrail.core.secrets.CHECK_INTERVAL`: the same cadence and the same
  (inode, mtime, size) stamp as the ``${file:...}`` credentials, which catch a ``..data`` swap,
  a rename over the file and a rewrite in place), so the cost on the hot path is a clock read.
* **What changes.** A changed stamp re-reads the files; if their bytes are what was loaded
  (a volume re-synced with the same data), nothing is rebuilt. Otherwise a new ``SSLContext`` is
  built with the same builder as at start and replaces the current one: new connections use it,
  connections already open keep the context they were made with until they are closed (an
  ``SSLContext`` is not changed in place; a live TLS session cannot change its certificate).
* **Bad files.** At start a bad file is a :class:`~kubetrail.core.errors.ConfigError` naming the
  option (the builder's). Later, a file that cannot be read, is not PEM, or a key that does not
  match its certificate (most often a half-written rotation of two files that are not in one
  Secret volume) keeps the last good context, is logged once per distinct problem naming the
  option and the file, and counts ``kubetrail_secret_reload_errors_total{option}`` at each
  failing check (at most once a second), like a bad credential file. A check after a failure
  reads the files again even if the stamps did not move, so a permission fixed with ``chmod`` is
  picked up; bytes that already failed to build are not built again (a build loads the system
  CAs: about 57 ms of the event loop here, once per rotation rather than every second).
  A good rebuild counts ``kubetrail_secret_reloads_total{option}`` for each option whose file
  changed and logs which.

The builder is passed in (the ``tls.*`` semantics live in the sinks' layer,
:func:`kubetrail.sinks.http_base.build_ssl_context`); it must raise ``ConfigError`` with ``key``
set to the option at fault, which is what this module reports.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from kubetrail.core import secrets
from kubetrail.core.errors import ConfigError

if TYPE_CHECKING:
    from kubetrail.core.secrets import _Metrics

_log = logging.getLogger("kubetrail.tls")

Stamps = tuple[tuple[str, tuple[int, int, int] | None], ...]


class _Problem(Exception):
    def __init__(self, option: str, path: str, message: str) -> None:
        super().__init__(message)
        self.option, self.path, self.message = option, path, message

    def __str__(self) -> str:
        return f"{self.option} ({self.path}): {self.message}"


class ClientTls:
    """A client ``SSLContext`` built from files (option -> path), rebuilt when one changes.

    ``directories`` are options naming a directory (``tls.ca_path``): every file in it is watched.
    """

    def __init__(
        self,
        files: Mapping[str, str | None],
        build: Callable[[], ssl.SSLContext],
        directories: Mapping[str, str | None] | None = None,
    ) -> None:
        self.files = {option: path for option, path in files.items() if path}
        self.directories = {option: path for option, path in (directories or {}).items() if path}
        self._build = build
        self.logger: logging.Logger = _log
        self._errors: Any = None
        self._reloads: Any = None
        self.version = 0  # bumped by every rebuild
        stamps = self._stat()
        self.current: ssl.SSLContext = build()  # ConfigError naming the option: a bad file must not start
        try:
            self._contents = self._read()
        except _Problem as problem:
            raise ConfigError(f"cannot read {problem.path}: {problem.message}", key=problem.option) from None
        self._stamps = stamps
        self._checked = time.monotonic()
        self._problem: str | None = None  # what was last logged, so each problem is logged once
        self._failed_build: tuple[dict[str, dict[str, bytes]], _Problem] | None = None

    def bind(self, logger: logging.Logger, metrics: _Metrics | None) -> None:
        """Log and count as the plugin that owns these files."""
        self.logger = logger
        if metrics is not None:
            self._errors, self._reloads = secrets.reload_counters(metrics)

    def context(self) -> ssl.SSLContext:
        """The context for a new connection: rebuilt first if a file changed (checked once a second)."""
        now = time.monotonic()
        if now - self._checked >= secrets.CHECK_INTERVAL:
            self._checked = now
            self._refresh()
        return self.current

    # -- internals --------------------------------------------------------------------------

    def _paths(self) -> list[tuple[str, str]]:
        """(option, file) for every watched file, a directory's files by name."""
        paths = list(self.files.items())
        for option, directory in self.directories.items():
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                paths.append((option, directory))  # read as a file: its error names the directory
                continue
            paths += [(option, os.path.join(directory, n)) for n in names if not n.startswith(".")]
        return paths

    def _stat(self) -> Stamps:
        return tuple((path, secrets.file_stamp(path)) for _, path in self._paths())

    def _read(self) -> dict[str, dict[str, bytes]]:
        """option -> {file: bytes}."""
        contents: dict[str, dict[str, bytes]] = {}
        for option, path in self._paths():
            try:
                with open(path, "rb") as handle:
                    contents.setdefault(option, {})[path] = handle.read()
            except IsADirectoryError:
                raise _Problem(option, path, "is a directory, not a file") from None
            except OSError as exc:
                raise _Problem(option, path, exc.strerror or str(exc)) from None
        return contents

    def _refresh(self) -> None:
        stamps = self._stat()
        if stamps == self._stamps and self._problem is None:
            return
        try:
            contents = self._read()
            if contents == self._contents:
                self._stamps = stamps
                self._recovered()
                return
            if self._failed_build is not None and contents == self._failed_build[0]:
                # The same bad bytes as at the last check: not built again (a build loads the
                # system CAs, tens of milliseconds of the event loop, every second).
                raise self._failed_build[1]
            try:
                context = self._build()
            except ConfigError as exc:
                option = exc.key or next(iter(self.files), "tls")
                problem = _Problem(option, self._path_of(option), exc.message)
                self._failed_build = (contents, problem)
                raise problem from None
        except _Problem as problem:
            self._failed(problem)
            return
        self._failed_build = None
        changed = sorted(o for o in {*contents, *self._contents} if contents.get(o) != self._contents.get(o))
        self.current = context
        self._contents = contents
        self._stamps = stamps
        self.version += 1
        self._recovered()
        for option in changed:
            if self._reloads is not None:
                self._reloads.labels(option).inc()
        self.logger.info(
            "TLS files changed: new connections use the new certificate/key/CA, open ones keep theirs",
            extra={"changed": changed, "files": [self._path_of(o) for o in changed]},
        )

    def _path_of(self, option: str) -> str:
        return self.files.get(option) or self.directories.get(option) or "?"

    def _recovered(self) -> None:
        if self._problem is not None:
            self.logger.warning("TLS files usable again", extra={"files": sorted(self.files.values())})
            self._problem = None

    def _failed(self, problem: _Problem) -> None:
        if self._errors is not None:
            self._errors.labels(problem.option).inc()
        text = str(problem)
        if text != self._problem:
            self._problem = text
            self.logger.error(
                f"cannot reload a TLS file; new connections keep the last good certificate/key/CA: {text}",
                extra={"option": problem.option, "path": problem.path},
            )
