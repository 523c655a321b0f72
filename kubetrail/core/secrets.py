"""Credentials in option values, read from mounted files that rotate: ``${file:/path}``.

kubetrail's rule is that credentials come from mounted files that rotate, never from environment
variables (which a process cannot re-read, and which leak into ``/proc/PID/environ``, crash
reports and ``kubectl describe``). The kube client does it for its token
(:mod:`kubetrail.kube.credentials`); this module does it for every plugin option that holds a
credential (``http_passwd``, ``bearer_token``, ``splunk_token``, ``http_api_key``, ``header``,
``shared_key``, ``rdkafka.sasl.password``, ...): the option's value may name files instead of
holding the secret::

    http_user    ${file:/etc/kubetrail/secrets/es/username}
    http_passwd  ${file:/etc/kubetrail/secrets/es/password}
    header       Authorization Bearer ${file:/var/run/secrets/tokens/api}

**Why this syntax.** Fluent Bit has no way to read an output's secret from a file (it has
``${ENV}`` and the YAML ``env:`` section, both environment). The OpenTelemetry Collector's
confmap writes ``${file:/path}`` (and ``${env:NAME}``), Vector writes ``SECRET[backend.key]``
with a ``file``/``directory`` backend. ``${file:...}`` is the Collector's spelling, familiar to
the same users, and it keeps a Fluent Bit config a Fluent Bit config: the option keeps its
Fluent Bit name (no ``http_passwd_file`` twin that Fluent Bit would refuse as an unknown
property), and the classic and YAML readers of both tools see an ordinary ``${...}`` reference
(``file:`` is not a valid variable name, so kubetrail's own ``${VAR}`` expansion leaves it to this
module). Unlike the Collector, which reads the file once at start, the value here follows the
file while the process runs.

**Rotation.** A Kubernetes Secret volume is a directory of symlinks into a timestamped directory
reached through ``..data``; the kubelet writes the new version beside the old one and swaps the
``..data`` symlink atomically. A key's path therefore never changes, but ``stat`` through the
symlinks sees a different inode after a swap, so the file's (inode, mtime, size) stamp is what is
watched (as :class:`~kubetrail.kube.credentials.TokenSource` does), and it also catches files
rewritten in place or renamed over. The stamp is checked at most once a second per file, when a
plugin asks for the value (each request, each new connection, each handshake), so the cost on
the hot path is a clock read, and a rotated secret is in use within a second of the swap. Each
file is checked on its own: a user and a password swapped together are both seen within that
second, and a request sent between the two reads carries one old and one new, is refused (401,
an authentication error) and retried like any refusal, so nothing is lost.

**Bad files.** At start (``kubetrail check`` and ``run``) a file that is missing, unreadable,
empty, of more than one line, larger than a Kubernetes Secret can be (1 MiB) or not UTF-8 is a configuration error
naming the option, the path and what is wrong (exit 2). Later the same problems keep the last
good value (an empty file is most often one caught half-written), log once per distinct problem
and count ``kubetrail_secret_reload_errors_total{option}`` at each check that still fails (at
most once a second); a good read after that logs that the value is back and counts
``kubetrail_secret_reloads_total{option}``, as every rotation does.

**Value.** The file's text minus trailing line breaks (``kubectl create secret --from-file``
of a file an editor saved keeps its final newline); other whitespace is part of the secret.
Several references and literal text may share one value (``Bearer ${file:/t}``).

A plugin reads an option through :func:`reveal` (a plain string is returned as it is, so code
and tests that pass literal values need nothing else), and builds values derived from
credentials (a Basic authorization header from a user and a password) with :func:`derive`,
which recomputes them only when an input changed. :func:`bind` gives a plugin's secrets its
logger and metrics; an unbound secret logs to ``kubetrail.secrets`` and counts nothing.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

CHECK_INTERVAL = 1.0  # seconds between two stats of one file
MAX_BYTES = 1024 * 1024  # a Kubernetes Secret holds at most 1 MiB
FILE_REFERENCE = re.compile(r"\$\{file:([^}]*)\}")
MARKER = "${file:"

_log = logging.getLogger("kubetrail.secrets")


class SecretFileError(Exception):
    """A secret file cannot be used (missing, unreadable, empty, too large, not UTF-8)."""


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows the ..data symlink: a swap shows as a new inode
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


file_stamp = _stamp  # the same stamp for TLS files (core/tls_files.py) and librdkafka's ssl.*.location


def read_secret_file(path: str) -> str:
    """The secret in ``path`` (trailing line breaks removed), or :class:`SecretFileError` saying why."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except IsADirectoryError:
        raise SecretFileError(f"{path} is a directory, not a file") from None
    except OSError as exc:
        raise SecretFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise SecretFileError(f"{path} is larger than 1 MiB (a Kubernetes Secret's limit): not a credential file?")
    try:
        text = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise SecretFileError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    if not text:
        raise SecretFileError(f"{path} is empty")
    if "\n" in text or "\r" in text:
        # A header or a SASL password cannot hold one (HTTP header injection); most often two
        # secrets pasted into one key.
        raise SecretFileError(f"{path} has more than one line (a credential is one line; trailing breaks are removed)")
    return text


class SecretFile:
    """One watched file: its last good value, re-read when its stamp changes."""

    def __init__(self, path: str, option: str) -> None:
        self.path = path
        self.option = option
        self.logger: logging.Logger = _log
        self.errors: _Counter | None = None
        self.reloads: _Counter | None = None
        self.version = 0  # bumped by every successful re-read
        self._value = ""
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._problem: str | None = None  # what was last logged, so each problem is logged once

    def load(self) -> None:
        """The first read; :class:`SecretFileError` when the file cannot be used."""
        stamp = _stamp(self.path)
        self._value = read_secret_file(self.path)
        self._stamp = stamp
        self._checked = time.monotonic()

    def value(self) -> str:
        now = time.monotonic()
        if now - self._checked >= CHECK_INTERVAL:
            self._checked = now
            self._refresh()
        return self._value

    def _refresh(self) -> None:
        stamp = _stamp(self.path)
        if stamp == self._stamp and self._problem is None:
            return
        try:
            value = read_secret_file(self.path)
        except SecretFileError as exc:
            self._failed(str(exc))
            return
        # A read after a failure whose content did not change is no reload, just the end of the problem.
        changed = value != self._value
        self._stamp = stamp
        self._value = value
        if self._problem is not None:
            self.logger.warning(
                "credential file readable again", extra={"option": self.option, "path": self.path, "changed": changed}
            )
            self._problem = None
        if changed:
            self.version += 1
            if self.reloads is not None:
                self.reloads.inc()
            self.logger.info("credential file changed: the new value is used from now on", extra=self._extra())

    def _failed(self, problem: str) -> None:
        if self.errors is not None:
            self.errors.inc()
        if problem != self._problem:
            self._problem = problem
            self.logger.error(
                f"cannot re-read a credential file; keeping the last good value: {problem}", extra=self._extra()
            )

    def _extra(self) -> dict[str, str]:
        return {"option": self.option, "path": self.path}


class Secret:
    """An option value made of literal text and files (``Bearer ${file:/t}``): :meth:`get` is current."""

    def __init__(self, text: str, parts: tuple[str | SecretFile, ...]) -> None:
        self.text = text  # as written in the config: shown by ``kubetrail check``
        self.parts = parts

    @property
    def files(self) -> list[SecretFile]:
        return [p for p in self.parts if isinstance(p, SecretFile)]

    def get(self) -> str:
        return "".join(p if isinstance(p, str) else p.value() for p in self.parts)

    def __repr__(self) -> str:
        return f"Secret({self.text!r})"


class Derived(Secret):
    """A value computed from secrets (a Basic header from a user and a password), recomputed
    only when one of them changed."""

    def __init__(self, compute: Callable[..., str], inputs: tuple[str | Secret, ...], text: str) -> None:
        files = [f for v in inputs if isinstance(v, Secret) for f in v.files]
        super().__init__(text, tuple(files))
        self._compute = compute
        self._inputs = inputs
        self._last: tuple[tuple[str, ...], str] | None = None

    def get(self) -> str:
        current = tuple(v if isinstance(v, str) else v.get() for v in self._inputs)
        if self._last is None or self._last[0] != current:
            self._last = (current, self._compute(*current))
        return self._last[1]


Text = str | Secret


def has_reference(text: str) -> bool:
    return MARKER in text


def parse_secret(text: str, option: str) -> Text:
    """``text`` with its ``${file:...}`` references read once (the start-up check).

    Returns ``text`` itself when it has none. :class:`SecretFileError` names the path and the
    problem; the caller adds the option and the config location.
    """
    if MARKER not in text:
        return text
    parts: list[str | SecretFile] = []
    position = 0
    for match in FILE_REFERENCE.finditer(text):
        if match.start() > position:
            parts.append(text[position : match.start()])
        path = match.group(1).strip()
        if not path:
            raise SecretFileError(f"{match.group(0)} names no file; write ${{file:/path/to/secret}}")
        secret_file = SecretFile(path, option)
        secret_file.load()
        parts.append(secret_file)
        position = match.end()
    rest = text[position:]
    if MARKER in rest:
        raise SecretFileError(f"unclosed {MARKER}...: write ${{file:/path/to/secret}}")
    if rest:
        parts.append(rest)
    return Secret(text, tuple(parts))


def reveal(value: Text | None) -> str | None:
    """The current text of an option value (None stays None)."""
    if value is None or isinstance(value, str):
        return value
    return value.get()


def read_now(value: Text | None) -> str | None:
    """The text of an option value with its files read now, not their last checked value: for a
    value used only inside a rebuild that a watcher of the same files has just found due (the
    password of a rotated TLS key, :mod:`kubetrail.core.tls_files`), which must not see the
    previous second's value. :class:`SecretFileError` when a file cannot be used."""
    if value is None or isinstance(value, str):
        return value
    return "".join(p if isinstance(p, str) else read_secret_file(p.path) for p in value.parts)


def derive(compute: Callable[..., str], *inputs: Text | None) -> Text:
    """``compute(*current values)``: a plain string when no input comes from a file, else a
    :class:`Derived` secret that follows the files. None inputs are passed as empty strings."""
    values: tuple[Text, ...] = tuple("" if v is None else v for v in inputs)
    if not any(isinstance(v, Secret) for v in values):
        return compute(*values)
    text = " ".join(v.text for v in values if isinstance(v, Secret))
    return Derived(compute, values, text)


def shown(value: Any) -> Any:
    """A value as ``kubetrail check`` prints it: a secret as its ``${file:...}`` text."""
    if isinstance(value, Secret):
        return value.text
    if isinstance(value, list):
        return [shown(v) for v in value]
    if isinstance(value, dict):
        return {k: shown(v) for k, v in value.items()}
    return value


def secrets_in(values: Iterable[Any]) -> list[Secret]:
    """Every :class:`Secret` in option values (lists and ``prefix.*`` dicts included)."""
    found: list[Secret] = []
    for value in values:
        if isinstance(value, Secret):
            found.append(value)
        elif isinstance(value, list):
            found.extend(secrets_in(value))
        elif isinstance(value, dict):
            found.extend(secrets_in(value.values()))
    return found


class _Metrics(Protocol):
    def counter(self, name: str, doc: str, *labels: str) -> Any: ...


def reload_counters(metrics: _Metrics) -> tuple[Any, Any]:
    """A plugin's (errors, reloads) counters by ``option``; also used for TLS files
    (:mod:`kubetrail.core.tls_files`), so one pair of metrics covers every credential file."""
    errors = metrics.counter(
        "kubetrail_secret_reload_errors",
        "Checks of a changed or failing credential file that could not read it (the last good value is kept)",
        "option",
    )
    reloads = metrics.counter(
        "kubetrail_secret_reloads", "Credential files re-read after they changed (rotations)", "option"
    )
    return errors, reloads


def bind(config: Mapping[str, Any], logger: logging.Logger, metrics: _Metrics | None) -> list[SecretFile]:
    """Give every secret file of a plugin's options the plugin's logger and metrics."""
    files = [f for s in secrets_in(config.values()) for f in s.files]
    if files and metrics is not None:
        errors, reloads = reload_counters(metrics)
    for secret_file in files:
        secret_file.logger = logger
        if metrics is not None:
            secret_file.errors = errors.labels(secret_file.option)
            secret_file.reloads = reloads.labels(secret_file.option)
    return files
