"""The ``kubernetes_audit`` filter: flatten, drop, redact and deduplicate audit events.

Input: records whose body is an ``audit.k8s.io`` Event, from the ``kubernetes_audit`` webhook
input or from ``tail`` with the ``k8s_audit`` parser. Other records pass through untouched.

**Flattening.** The fields people query are copied to top-level keys, named after the
OpenTelemetry semantic conventions where one exists, and the original event stays as it is:

=====================================  ==============================================
key                                    from
=====================================  ==============================================
``time``                               ``stageTimestamp``
``k8s.audit.id``                       ``auditID``
``k8s.audit.stage``                    ``stage``
``k8s.audit.level``                    ``level``
``user.name`` / ``user.id`` (semconv)  ``user.username`` / ``user.uid``
``user.groups``                        ``user.groups``
``k8s.audit.impersonated_user.name``   ``impersonatedUser.username``
``k8s.audit.impersonated_user.groups`` ``impersonatedUser.groups``
``k8s.audit.verb``                     ``verb``
``k8s.audit.resource``                 ``objectRef.resource``
``k8s.audit.subresource``              ``objectRef.subresource``
``k8s.namespace.name`` (semconv)       ``objectRef.namespace``
``k8s.audit.object.name``              ``objectRef.name``
``k8s.audit.api_group``                ``objectRef.apiGroup``
``client.address`` (semconv)           ``sourceIPs[0]`` (the original client)
``k8s.audit.source_ips``               ``sourceIPs``
``user_agent.original`` (semconv)      ``userAgent``
``url.original`` (semconv)             ``requestURI``
``http.response.status_code`` (semc.)  ``responseStatus.code``
``k8s.audit.authz.decision``           ``annotations["authorization.k8s.io/decision"]``
``k8s.audit.authz.reason``             ``annotations["authorization.k8s.io/reason"]``
``k8s.audit.redacted``                 ``true`` when this filter replaced secret values
=====================================  ==============================================

Absent fields are omitted, not null.

**Speed.** Per-record Python work is the budget, so an event is never parsed into a dict unless
it must be redacted. A *scan* of the whole batch decodes just the fields above from each event,
writes them as a small JSON object and splices it in front of the event's original bytes:
``{"time":...,"k8s.audit.id":...,<original members>}``; a record keeps those bytes as its body
(parsed lazily if anything later asks), so a sink writes them as they are. The scan is native
(``kubetrail_native``, Rust, built from ``native/`` by ``scripts/setup``) when installed and
pure Python (msgspec ``decode_lines`` into structs) otherwise; both give the same output, and the
tests compare them. A tailed file's lazy batch is filtered as one block into a new block, so no
record object is built per line unless a sink asks for records. The native scan runs without
the GIL (the sinks' threads need it meanwhile) and cuts big batches in parts for threads
(``scan_threads``). The router calls the filter's async entry: the scan (and, for a block, the
new block as it is when every line goes on) runs in the filter's own scan thread while the
event loop's thread reads on; the tail hands over its next batch before the last is routed and
the router keeps their order. What needs the filter's state (dedupe) or is rare (redaction)
stays on the event loop, in Python, either way.

**Parsed once.** The scan decodes and validates every line, so it takes a tailed block before
the tail's json parser validated it (``Batch.pending_block``; see :mod:`kubetrail.core.block`):
each audit line is parsed once, here, in the scan thread. Only a block with a line that is not
an audit event is validated as the parser would have (a line that is not JSON then sends the
block the record way); a record's time comes from the parser if someone builds the records.

**Redaction, on by default.** ``data`` and ``stringData`` values of Secrets (and of each item of
a SecretList) in ``requestObject`` and ``responseObject``, their
``kubectl.kubernetes.io/last-applied-configuration`` annotation (which repeats the data), every
``value`` of a JSON patch sent to a Secret, and ``status.token`` of TokenRequest responses are
replaced by ``[REDACTED]`` (keys kept: which key changed is useful and not secret). An event is
parsed for this only when its ``objectRef`` is ``secrets`` or ``serviceaccounts/token``, or its
bytes mention a Secret or TokenRequest kind, so ordinary events never pay for it. ``redact``
adds dotted paths (``requestObject.spec.password``, ``*`` for any key or list item), checked
only in events whose bytes contain the path's last key.

**Deduplication by (auditID, stage)** within ``dedupe_window``, the window the API server's
retries can span, across every path into the filter: one filter may take the webhook input
*and* a tail of the same API server's audit log (two copies of every event, for redundancy)
and still let each key through once. Correctness needs to know which records were
*delivered*, not merely seen, and that comes from each batch's acknowledgement token (any
source's: the webhook's answers the API server; a tail's moves its checkpoint):

* a batch's new keys go into ``seen`` when it is filtered (a later copy is removed at once) and
  are *in flight* until its token completes: then *delivered* (and written to ``db``, in a
  hook that runs before the source's callback, so before a tail checkpoint or a 2xx moves past
  them), or forgotten if a sink dropped the batch (its source sends it again);
* a batch that had a copy removed while its twin may still be in flight *holds* its token
  (:meth:`~kubetrail.core.acks.AckToken.hold`): its source is told only once every batch then in
  flight is delivered, and told "not delivered" if one was dropped: the dropped key is
  forgotten, and the webhook's copy comes again (the API server re-sends its batch when the
  webhook answered 503, for the twin or for this batch). What the batch
  itself delivered counts as delivered at once. The native fast path keeps no text per key, so
  which batch holds the twin is not known: it waits for all of them (a delay of at most the
  sinks' latency, only for batches that had a copy removed);
* hence, with ``db`` set on the filter, a SIGKILL at any moment loses nothing and repeats
  nothing: a key delivered by either path is in ``db`` before its source's checkpoint or 2xx
  passes it, so neither the API server's re-sent batches nor the tail's re-read lines come out
  twice, and a removed copy's source was not told before its twin was delivered, so it is sent
  again if the twin was not. Left: a kill between a sink's write and its acknowledgement (the
  same window a single path has; idempotent sinks use the records' identity for it). Without
  ``db`` the same holds within one process; a restart forgets the keys.

With no token (``process`` called on records alone) keys are remembered at once, in memory.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import orjson

from kubetrail.core.acks import AckToken
from kubetrail.core.audit_event import AuditEvent
from kubetrail.core.block import ReadyBlock, valid_utf8
from kubetrail.core.component import ComponentContext, Transform
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Batch, Record, decode_json
from kubetrail.core.state import DB_OPTIONS, StateDB

try:  # optional: the native scan, built from native/ (see "Speed" above)
    from kubetrail_native import AuditScanner as NativeScanner
    from kubetrail_native import KeySet as NativeKeySet
except ImportError:  # pragma: no cover - depends on the installation
    NativeScanner = None
    NativeKeySet = None

REDACTED = "[REDACTED]"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
STAGES = ("RequestReceived", "ResponseStarted", "ResponseComplete", "Panic")
LEVELS = ("None", "Metadata", "Request", "RequestResponse")
# One character per known stage keeps the in-memory dedupe keys short (memory per key matters
# at hundreds of thousands of keys).
_STAGE_CODE = {"RequestReceived": "0", "ResponseStarted": "1", "ResponseComplete": "2", "Panic": "3"}
_SECRET_HINTS = (b'"kind":"Secret', b'"kind":"TokenRequest"', b'"kind": "Secret', b'"kind": "TokenRequest"')
# What a scan says of each line (the native scan uses the same numbers):
PASS = 0  # not an audit event (not JSON, no auditID/stage, a field of the wrong type): untouched
DROP = 1  # its stage or level is in drop_stages / drop_levels
DONE = 2  # an event the scan finished: its output is the flat prefix spliced onto its bytes
SLOW = 3  # an event this module finishes per record: may need redaction, or is no object literal
RETRY = 4  # native scan only: a line it did not decode; the Python scan decides (see _Retried)


def _hinted(raw: bytes) -> bool:
    return any(hint in raw for hint in _SECRET_HINTS)


_BODILESS = frozenset({"Metadata", "None"})
DB_PRUNE_INTERVAL = 60.0

# One row per delivered batch, its keys a JSON array: a tail delivers thousands of keys a batch,
# and a row per key cost ~15 us each (1M keys: 15 s of CPU), one row per batch ~0.1 us a key.
# audit_dedupe (a row per key) is what earlier versions wrote: still read, and pruned.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_dedupe (
    key TEXT PRIMARY KEY,
    delivered_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS audit_dedupe_age ON audit_dedupe (delivered_at);
CREATE TABLE IF NOT EXISTS audit_dedupe_batches (
    delivered_at REAL NOT NULL,
    keys BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_dedupe_batches_age ON audit_dedupe_batches (delivered_at);
"""


# -- what is decoded from each event: kubetrail.core.audit_event (shared with detect) -----

_Event = AuditEvent


class _Flat(
    msgspec.Struct,
    gc=False,
    omit_defaults=True,
    rename={
        "time": "time",
        "audit_id": "k8s.audit.id",
        "stage": "k8s.audit.stage",
        "level": "k8s.audit.level",
        "user_name": "user.name",
        "user_id": "user.id",
        "user_groups": "user.groups",
        "imp_name": "k8s.audit.impersonated_user.name",
        "imp_groups": "k8s.audit.impersonated_user.groups",
        "verb": "k8s.audit.verb",
        "resource": "k8s.audit.resource",
        "subresource": "k8s.audit.subresource",
        "namespace": "k8s.namespace.name",
        "name": "k8s.audit.object.name",
        "api_group": "k8s.audit.api_group",
        "client": "client.address",
        "source_ips": "k8s.audit.source_ips",
        "user_agent": "user_agent.original",
        "uri": "url.original",
        "code": "http.response.status_code",
        "decision": "k8s.audit.authz.decision",
        "reason": "k8s.audit.authz.reason",
        "redacted": "k8s.audit.redacted",
    },
):
    time: str | None = None
    audit_id: str | None = None
    stage: str | None = None
    level: str | None = None
    user_name: str | None = None
    user_id: str | None = None
    user_groups: list[str] | None = None
    imp_name: str | None = None
    imp_groups: list[str] | None = None
    verb: str | None = None
    resource: str | None = None
    subresource: str | None = None
    namespace: str | None = None
    name: str | None = None
    api_group: str | None = None
    client: str | None = None
    source_ips: list[str] | None = None
    user_agent: str | None = None
    uri: str | None = None
    code: int | None = None
    decision: str | None = None
    reason: str | None = None
    redacted: bool = False


_DECODE_LINES = msgspec.json.Decoder(_Event).decode_lines
_DECODE_ONE = msgspec.json.Decoder(_Event).decode
_ENCODE = msgspec.json.Encoder().encode


def _flat(ev: _Event, redacted: bool) -> bytes:
    user, imp, ref, status, notes = ev.user, ev.impersonatedUser, ev.objectRef, ev.responseStatus, ev.annotations
    ips = ev.sourceIPs
    flat = _Flat(
        ev.stageTimestamp,
        ev.auditID,
        ev.stage,
        ev.level,
        user.username if user else None,
        user.uid if user else None,
        user.groups if user else None,
        imp.username if imp else None,
        imp.groups if imp else None,
        ev.verb,
        ref.resource if ref else None,
        ref.subresource if ref else None,
        ref.namespace if ref else None,
        ref.name if ref else None,
        ref.apiGroup if ref else None,
        ips[0] if ips else None,
        ips,
        ev.userAgent,
        ev.requestURI,
        status.code if status else None,
        notes.decision if notes else None,
        notes.reason if notes else None,
        redacted,
    )
    return _ENCODE(flat)


# -- redaction ------------------------------------------------------------------------------


def _redact_values(mapping: Any) -> bool:
    if not isinstance(mapping, dict) or not mapping:
        return False
    for key in mapping:
        mapping[key] = REDACTED
    return True


def _redact_secret(obj: Any) -> bool:
    """A Secret (or a merge patch of one): data, stringData, the last-applied annotation."""
    if not isinstance(obj, dict):
        return False
    changed = _redact_values(obj.get("data"))
    changed |= _redact_values(obj.get("stringData"))
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        notes = meta.get("annotations")
        if isinstance(notes, dict) and LAST_APPLIED in notes:
            notes[LAST_APPLIED] = REDACTED
            changed = True
    return changed


def _redact_object(obj: Any, secret_resource: bool, token_resource: bool) -> bool:
    if isinstance(obj, list):
        # A JSON patch (list of operations) sent to a Secret: any value may be secret data.
        changed = False
        if secret_resource:
            for op in obj:
                if isinstance(op, dict) and "value" in op:
                    op["value"] = REDACTED
                    changed = True
        return changed
    if not isinstance(obj, dict):
        return False
    kind = obj.get("kind")
    changed = False
    if kind == "Secret" or (secret_resource and kind is None):
        changed |= _redact_secret(obj)
    elif kind == "SecretList" or (secret_resource and isinstance(obj.get("items"), list)):
        for item in obj.get("items") or ():
            changed |= _redact_secret(item)
    elif kind == "TokenRequest" or token_resource:
        status = obj.get("status")
        if isinstance(status, dict) and "token" in status:
            status["token"] = REDACTED
            changed = True
    elif kind == "List" and isinstance(obj.get("items"), list):
        for item in obj["items"]:
            if isinstance(item, dict) and item.get("kind") == "Secret":
                changed |= _redact_secret(item)
    return changed


def _compile_path(text: str) -> tuple[tuple[str, ...], bytes | None]:
    parts = tuple(part for part in text.strip().split(".") if part)
    if not parts:
        raise ConfigError(f"empty path {text!r}", key="redact")
    last = parts[-1]
    return parts, (None if last == "*" else orjson.dumps(last))


def _redact_path(node: Any, parts: tuple[str, ...]) -> bool:
    if not parts:
        return False
    head, rest = parts[0], parts[1:]
    if isinstance(node, dict):
        keys = list(node) if head == "*" else ([head] if head in node else [])
        changed = False
        for key in keys:
            if rest:
                changed |= _redact_path(node[key], rest)
            else:
                node[key] = REDACTED
                changed = True
        return changed
    if isinstance(node, list):
        if head == "*":
            indexes = range(len(node))
        elif head.isdigit() and int(head) < len(node):
            indexes = range(int(head), int(head) + 1)
        else:
            return False
        changed = False
        for index in indexes:
            if rest:
                changed |= _redact_path(node[index], rest)
            else:
                node[index] = REDACTED
                changed = True
        return changed
    return False


# -- the scan --------------------------------------------------------------------------------


def _splice(prefix: bytes, raw: bytes) -> bytes:
    """``prefix`` (a JSON object) merged in front of the members of ``raw`` (an object literal)."""
    if raw[:1] == b"{" and len(prefix) > 2:
        return prefix[:-1] + (b"}" if raw[1:2] == b"}" else b"," + raw[1:])
    merged = orjson.loads(prefix)  # not an object literal as expected: the slow way
    merged.update(orjson.loads(raw))
    return orjson.dumps(merged)


class _ScanOptions(msgspec.Struct, frozen=True):
    drop_stages: frozenset[str]
    drop_levels: frozenset[str]
    redact_secrets: bool
    needles: tuple[bytes | None, ...]  # per redact path: its last key as JSON, None = any line
    flatten: bool


class _PyScan:
    """The pure-Python scan of a batch's lines: codes, dedupe keys, identities and outputs.

    The reference for ``kubetrail_native.AuditScan``, with the same methods and results.
    """

    def __init__(self, options: _ScanOptions, lines: list[bytes]) -> None:
        self.flatten = options.flatten
        block = b"\n".join(lines)
        events: list[_Event | None]
        try:
            events = _DECODE_LINES(block)  # type: ignore[assignment]
            if len(events) != len(lines):
                raise ValueError("line count")
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError):  # UnicodeDecodeError too
            events = [_decode_event(raw) for raw in lines]
        # One scan of the whole batch instead of one per line: most batches hold no Secret.
        hinted = options.redact_secrets and (b"Secret" in block or b"TokenRequest" in block)
        codes = bytearray(len(lines))
        keys: list[str | None] = [None] * len(lines)
        for index, (raw, ev) in enumerate(zip(lines, events, strict=True)):
            # Invalid UTF-8 in a member msgspec skipped: not a well-formed event (the native scan
            # checks all of it).
            if ev is None or ev.auditID is None or ev.stage is None or not valid_utf8(raw):
                continue  # PASS
            if ev.stage in options.drop_stages or ev.level in options.drop_levels:
                codes[index] = DROP
                continue
            keys[index] = ev.auditID + _STAGE_CODE.get(ev.stage, ev.stage)
            codes[index] = SLOW if _needs_python(options, raw, ev, hinted) else DONE
        self.lines = lines
        self.events = events
        self.codes = bytes(codes)
        self.keys = keys

    def __len__(self) -> int:
        return len(self.codes)

    def identities(self) -> list[tuple[str, str] | None]:
        return [
            (ev.auditID, ev.stage) if key is not None and ev is not None else None  # type: ignore[misc]
            for key, ev in zip(self.keys, self.events, strict=True)
        ]

    def splice(self, index: int, raw: bytes) -> bytes:
        ev = self.events[index]
        if self.codes[index] != DONE or not self.flatten or ev is None:
            return raw
        return _splice(_flat(ev, False), raw)

    def build(self, keep: bytes | None = None, replacements: dict[int, bytes] | None = None) -> bytes:
        """The output block: kept lines (replaced, or spliced), each followed by a newline."""
        out = []
        for index, raw in enumerate(self.lines):
            if keep is None or keep[index]:
                out.append(replacements[index] if replacements and index in replacements else self.splice(index, raw))
        return b"".join(line + b"\n" for line in out)

    def release(self) -> None:
        """Nothing held here (the native scan frees its buffers)."""


class _Retried:
    """A native scan whose RETRY lines the Python scan decided.

    msgspec is the reference decoder: it takes a repeated key's last value and integers of any
    size, where the native decoder gives up. Those lines (and every line that is not JSON) are
    decoded here; an event among them is finished per record (SLOW), like a redaction candidate.
    """

    def __init__(self, native: Any, lines: list[bytes], options: _ScanOptions) -> None:
        self.native = native
        codes = bytearray(native.codes)
        keys: list[str | None] = list(native.keys)
        retried = [index for index, code in enumerate(codes) if code == RETRY]
        python = _PyScan(options, [lines[index] for index in retried])
        python_ids = python.identities()
        self._identities: dict[int, tuple[str, str] | None] = {}
        for at, index in enumerate(retried):
            code = python.codes[at]
            codes[index] = SLOW if code == DONE else code
            keys[index] = python.keys[at]
            self._identities[index] = python_ids[at]
        self.codes = bytes(codes)
        self.keys = keys

    def __len__(self) -> int:
        return len(self.codes)

    def identities(self) -> list[tuple[str, str] | None]:
        identities: list[tuple[str, str] | None] = self.native.identities()
        for index, identity in self._identities.items():
            identities[index] = identity
        return identities

    def splice(self, index: int, raw: bytes) -> bytes:
        return self.native.splice(index, raw)  # type: ignore[no-any-return]

    def build(self, keep: bytes | None = None, replacements: dict[int, bytes] | None = None) -> bytes:
        return self.native.build(keep, replacements)  # type: ignore[no-any-return]

    def release(self) -> None:
        self.native.release()


def _needs_python(options: _ScanOptions, raw: bytes, ev: _Event, hinted: bool) -> bool:
    """SLOW: the event may hold a secret to redact, or is not an object literal to splice onto."""
    # Metadata and None levels carry no request/response bodies: nothing to redact.
    bodied = options.redact_secrets and ev.level not in _BODILESS
    if bodied and (any(_secret_resource(ev)) or (hinted and _hinted(raw))):
        return True
    if any(needle is None or needle in raw for needle in options.needles):
        return True
    return options.flatten and raw[:1] != b"{"


def _secret_resource(ev: _Event) -> tuple[bool, bool]:
    """Whether the event's object is a Secret, and whether it is a service account token request."""
    ref = ev.objectRef
    if ref is None:
        return False, False
    return ref.resource == "secrets", ref.resource == "serviceaccounts" and ref.subresource == "token"


def _decode_event(raw: bytes) -> _Event | None:
    try:
        return _DECODE_ONE(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):  # not ours: untouched
        return None


# -- what the detect filter takes from the scan ---------------------------------------------


class ScannedBlock(ReadyBlock):
    """The filter's output block, with the native scan's detection classes of its lines
    (``kubetrail_native`` ``auditclass.rs``): the ``detect`` filter decides a class of events
    once instead of decoding every line again (see :func:`detect_classes`)."""

    __slots__ = ("classes",)

    def __init__(
        self, data: bytes, count: int, build: Callable[[], list[Record]], classes: tuple[Any, bytes] | None
    ) -> None:
        super().__init__(data, count, build)
        self.classes = classes


def detect_classes(batch: Batch) -> tuple[Any, bytes] | None:
    """``(scanner, class ids)`` for a batch this filter made from a block, still as it made it:
    the native scanner (``class_values(id)`` tells a class) and one native-endian u32 per line
    (``0xffffffff``: no class, decide the line itself). None otherwise."""
    block = batch.line_block  # this module made it
    if not isinstance(block, ScannedBlock) or block.classes is None:
        return None
    return block.classes


# -- deduplication state -----------------------------------------------------------------------


class _PyKeySet:
    """The remembered dedupe keys as a Python set; ``kubetrail_native.KeySet`` has the same
    methods and keeps them compact (a canonical-UUID key in 24 bytes instead of ~100)."""

    def __init__(self) -> None:
        self._keys: set[str] = set()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def isdisjoint(self, keys: Collection[str]) -> bool:
        return self._keys.isdisjoint(keys)

    def add(self, keys: Collection[str]) -> Collection[str]:
        """Adds ``keys``; what it returns is what ``forget`` takes when their window ends."""
        self._keys.update(keys)
        return keys

    def forget(self, batch: Collection[str]) -> None:
        self._keys.difference_update(batch)


class _Flying:
    """One batch's new keys between filtering and delivery (already in ``seen``), and the
    batches that wait for it: those with a copy removed as a duplicate while it flew."""

    __slots__ = ("handle", "keys", "waiters")

    def __init__(self, handle: Any, keys: Collection[str] | None) -> None:
        self.handle = handle  # what seen.add returned: forgotten if the batch is not delivered
        self.keys = keys  # the keys as text, for db (None without db)
        self.waiters: list[AckToken] = []


def _raws(records: list[Record]) -> list[bytes]:
    """Each record's JSON bytes: as it came, or encoded from its body."""
    return [record.raw if record.raw is not None else orjson.dumps(record.body) for record in records]


def _lazy_block(batch: Batch) -> bytes | None:
    """The block of a lazy batch the filter can take whole: newline-terminated lines, no record
    built yet (before its parser validated it, when that changes no byte). None otherwise (the
    filter then works on the records)."""
    if batch.is_materialized or not len(batch):
        return None
    block = batch.pending_block()
    if block is None:
        block = batch.raw_block  # validated first: its parser rewrites lines (or it was done)
    if block is None or batch.is_materialized or not block.endswith(b"\n"):
        return None
    return block


class KubernetesAuditTransform(Transform):
    plugin_name = "kubernetes_audit"
    description = "Flattens audit events into queryable keys, redacts secrets, drops stages/levels, deduplicates"
    options = (
        Option("flatten", "bool", True, help="Add the queried fields as top-level keys (original kept)"),
        Option("drop_stages", "list", [], help="Stages to drop, e.g. RequestReceived"),
        Option("drop_levels", "list", [], help="Levels to drop, e.g. None,Metadata"),
        Option("redact_secrets", "bool", True, help="Redact Secret data and TokenRequest tokens"),
        Option(
            "redact",
            multiple=True,
            help="Also redact this dotted path (* = any key/item), e.g. requestObject.spec.password",
        ),
        Option("dedupe", "bool", True, help="Drop repeated (auditID, stage) within dedupe_window"),
        Option("dedupe_window", "duration", 600.0, help="How long a delivered (auditID, stage) is remembered"),
        Option("dedupe_max_keys", "int", 2_000_000, help="Most keys remembered; the oldest go first (counted)"),
        Option("native", "bool", True, help="Use the native scan (kubetrail_native) when it is installed"),
        Option(
            "scan_threads",
            "int",
            0,
            help="Threads the native scan cuts a big batch into; 0 = the CPUs this process may use but one, 1 to 4",
        ),
        *DB_OPTIONS,
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.flatten: bool = config["flatten"]
        for option, allowed in (("drop_stages", STAGES), ("drop_levels", LEVELS)):
            unknown = [v for v in config[option] if v not in allowed]
            if unknown:
                raise ConfigError(f"unknown {unknown}; allowed: {', '.join(allowed)}", key=option)
        self.drop_stages = frozenset(config["drop_stages"])
        self.drop_levels = frozenset(config["drop_levels"])
        self.redact_secrets: bool = config["redact_secrets"]
        self.paths = [_compile_path(text) for text in config["redact"]]
        self.dedupe: bool = config["dedupe"]
        self.scan_options = _ScanOptions(
            self.drop_stages, self.drop_levels, self.redact_secrets, tuple(n for _, n in self.paths), self.flatten
        )
        # A redact path ending in * matches every event: nothing left for a native scan to do.
        self.native: Any = None
        if config["native"] and NativeScanner is not None and None not in self.scan_options.needles:
            self.native = NativeScanner(
                sorted(self.drop_stages),
                sorted(self.drop_levels),
                self.redact_secrets,
                list(self.scan_options.needles),
                self.flatten,
                max(0, config["scan_threads"]),
            )
        elif config["native"] and NativeScanner is None:
            self.log.info("kubetrail_native is not installed: the audit filter uses its pure-Python scan")
        self.window: float = config["dedupe_window"]
        self.max_keys: int = max(1, config["dedupe_max_keys"])
        self.seen: Any = _PyKeySet() if self.native is None else NativeKeySet()
        self._expiry: deque[tuple[float, Any]] = deque()  # (when, what seen.add returned)
        self.flying: dict[_Flying, None] = {}  # batches filtered and not yet delivered, in order
        self.db: StateDB | None = None
        self._last_db_prune = 0.0
        self._warned_evict = False
        self._executor: ThreadPoolExecutor | None = None  # the scan thread (made on first use)
        if self.dedupe and config.get("db"):
            self.db = StateDB.from_options(config)
            assert self.db is not None
            self.db.conn.executescript(_SCHEMA)
            self._load()
        # The router counts every removed record as dropped{reason="filtered"}; these say why.
        self.m_duplicates = self.metrics.counter(
            "kubetrail_audit_duplicates_removed", "Audit events whose (auditID, stage) was already seen"
        )
        self.m_dropped_by_rule = self.metrics.counter(
            "kubetrail_audit_dropped_by_rule", "Audit events removed by drop_stages or drop_levels"
        )

    # -- state -----------------------------------------------------------------------------

    def _load(self) -> None:
        assert self.db is not None
        self._prune(time.time() - self.window)
        # One expiry entry per delivery time, as _landed made them, in delivery order.
        groups: dict[float, list[str]] = {}
        for key, at in self.db.execute("SELECT key, delivered_at FROM audit_dedupe ORDER BY delivered_at"):
            groups.setdefault(at, []).append(key)
        for at, keys in self.db.execute("SELECT delivered_at, keys FROM audit_dedupe_batches"):
            groups.setdefault(at, []).extend(orjson.loads(keys))
        for at in sorted(groups):
            self._expiry.append((at, self.seen.add(groups[at])))
        self.log.info("dedupe keys loaded", extra={"keys": len(self.seen), "db": str(self.db.path)})

    def _persist(self, keys: Collection[str], now: float) -> None:
        assert self.db is not None
        self.db.execute("INSERT INTO audit_dedupe_batches VALUES (?, ?)", (now, orjson.dumps(list(keys))))

    def _prune(self, cutoff: float) -> None:
        assert self.db is not None
        self.db.execute("DELETE FROM audit_dedupe WHERE delivered_at < ?", (cutoff,))
        self.db.execute("DELETE FROM audit_dedupe_batches WHERE delivered_at < ?", (cutoff,))

    def _expire(self) -> None:
        now = time.time()
        cutoff = now - self.window
        expiry, seen = self._expiry, self.seen
        while expiry and (expiry[0][0] < cutoff or len(seen) > self.max_keys):
            at, batch = expiry.popleft()
            if at >= cutoff and not self._warned_evict:
                self._warned_evict = True
                self.log.warning(
                    "dedupe_max_keys reached: forgetting keys before dedupe_window ends",
                    extra={"max_keys": self.max_keys},
                )
            seen.forget(batch)
        if self.db is not None and now - self._last_db_prune >= DB_PRUNE_INTERVAL:
            self._last_db_prune = now
            try:
                self._prune(cutoff)
            except Exception:  # db unwritable: dedupe goes on in memory (see _landed)
                self.metrics.error("db")
                self.log.exception("cannot prune expired dedupe keys in db")

    def _fly(self, token: AckToken | None, handle: Any, keys: Collection[str] | None) -> None:
        """New keys (``handle``: what ``seen`` returned for them) of a batch with ``token``: in
        flight until the token completes, then delivered (in ``db``) or forgotten."""
        if token is None or token.done:  # nothing tells when it is delivered: remembered now
            self._expiry.append((time.time(), handle))
            return
        state = _Flying(handle, keys if self.db is not None else None)
        self.flying[state] = None
        token.on_complete(lambda ok: self._landed(state, ok))

    def _landed(self, state: _Flying, ok: bool) -> None:
        """A batch's token completed (before its source's callback: before a tail checkpoint or a
        webhook answer moves past it). Its keys are delivered, or forgotten if a sink dropped it."""
        self.flying.pop(state, None)
        if ok:
            now = time.time()
            self._expiry.append((now, state.handle))
            if state.keys and self.db is not None:
                try:
                    self._persist(state.keys, now)
                except Exception:  # db unwritable: keep serving; a restart may then repeat these
                    self.metrics.error("db")
                    self.log.exception("cannot store delivered dedupe keys in db")
        else:
            # A sink dropped it: the API server re-sends a webhook batch (it was answered 503);
            # for a tail the drop is final (the sink's retry_limit), and a copy that comes by
            # the webhook must now go through.
            self.seen.forget(state.handle)
        for waiter in state.waiters:
            waiter.unhold(ok)  # a batch that dropped a copy of these keys may now tell its source

    # -- the filter --------------------------------------------------------------------------

    def _scan_lines(self, lines: list[bytes]) -> _PyScan | _Retried | Any:
        if self.native is None:
            return _PyScan(self.scan_options, lines)
        scan = self.native.scan_lines(lines)
        return _Retried(scan, lines, self.scan_options) if RETRY in scan.codes else scan

    def _scan_block(self, block: bytes) -> _PyScan | _Retried | Any:
        """A block of newline-terminated lines: split in Python only when Python reads them."""
        if self.native is None:
            return _PyScan(self.scan_options, block.split(b"\n")[:-1])
        scan = self.native.scan_block(block)
        return _Retried(scan, block.split(b"\n")[:-1], self.scan_options) if RETRY in scan.codes else scan

    def process(self, records: list[Record]) -> list[Record]:
        """Records without their batch: no token tells when they are delivered, so their keys are
        remembered at once, in memory (the router always calls :meth:`process_batch`)."""
        return self._process_records(records, None)

    def _process_records(self, records: list[Record], token: AckToken | None) -> list[Record]:
        if not records:
            return records
        raws = _raws(records)
        return self._process_scanned(records, raws, self._scan_lines(raws), token)

    def _records_batch(self, batch: Batch) -> Batch:
        """A batch filtered as its records (dedupe tied to its token)."""
        return batch.derive(self._process_records(batch.records, batch.ack))

    def _process_scanned(
        self, records: list[Record], raws: list[bytes], scan: _PyScan | _Retried | Any, token: AckToken | None
    ) -> list[Record]:
        keep = self._select(scan, token)
        codes = scan.codes
        identities = scan.identities()
        flatten = self.flatten
        out: list[Record] = []
        append = out.append
        for index, record in enumerate(records):
            if keep is not None and not keep[index]:
                continue
            code = codes[index]
            if code in (DONE, SLOW):
                if code == SLOW:
                    raw, changed = self._finish(raws[index])
                else:
                    raw, changed = scan.splice(index, raws[index]), flatten
                if changed:
                    record.raw = raw
                    record.body_ = None
                # The same occurrence has the same identity whether it came by webhook or from
                # the log file (where the tail gave it a file offset): idempotent sinks store it once.
                record.identity = identities[index]
            append(record)
        return out

    def process_batch(self, batch: Batch) -> Batch:
        """A tailed file's lazy batch is filtered as its block: no record is built per line."""
        block = _lazy_block(batch)
        if block is None:
            return self._records_batch(batch)
        return self._process_block(batch, block, self._scan_block(block))

    async def process_batch_async(self, batch: Batch) -> Batch:
        """As :meth:`process_batch`, with the native scan (most of the work, without the GIL) in
        the filter's scan thread: the event loop's thread reads the next batch meanwhile (the
        tail sends a batch and reads on; see ``TailSource._send``). Only the scan moves: every
        decision on the filter's state (dedupe) stays on the event loop, batch by batch."""
        if self.native is None or not len(batch):
            return self.process_batch(batch)
        loop = asyncio.get_running_loop()
        block = _lazy_block(batch)
        if block is not None:
            scan, built = await loop.run_in_executor(self._scan_thread(), self._scan_and_build, block)
            return self._process_block(batch, block, scan, built)
        records = batch.records
        raws = _raws(records)
        scanned = await loop.run_in_executor(self._scan_thread(), self._scan_lines, raws)
        return batch.derive(self._process_scanned(records, raws, scanned, batch.ack))

    def _scan_and_build(self, block: bytes) -> tuple[_PyScan | _Retried | Any, bytes | None]:
        """In the scan thread: the scan, and the new block as it is when every line goes on (no
        line for Python to finish, none dropped by rule). Whether dedupe removes lines is decided
        afterwards on the event loop; when it does, the block is built again there (rare)."""
        scan = self._scan_block(block)
        codes = scan.codes
        if SLOW in codes or DROP in codes:
            return scan, None
        return scan, scan.build()

    def _scan_thread(self) -> ThreadPoolExecutor:
        # One thread: batches are scanned one at a time, as they would be on the event loop.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="kubernetes_audit-scan")
        return self._executor

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        await super().close()

    def _process_block(
        self, batch: Batch, block: bytes, scan: _PyScan | _Retried | Any, built: bytes | None = None
    ) -> Batch:
        """The filtered lazy batch of a scanned block. ``built``: the new block as the scan
        thread built it for the case that every line goes on (used when that is so)."""
        codes = scan.codes  # a copy each time it is asked for (native)
        # A line that is not an audit event may not be JSON at all: the block is validated by its
        # parser (the scan checked the others; a no-op when already done), and one that fails
        # is filtered as the records its source parsed line by line.
        if (len(scan) != len(batch) or PASS in codes) and batch.raw_block is not block:
            scan.release()
            return self._records_batch(batch)
        if len(scan) != len(batch):
            scan.release()
            return self._records_batch(batch)  # not one document per line after all
        keep = self._select(scan, batch.ack)
        replacements: dict[int, bytes] | None = None
        if SLOW in codes:
            lines = block.split(b"\n")
            replacements = {}
            for index, code in enumerate(codes):
                if code == SLOW and (keep is None or keep[index]):
                    replacements[index] = self._finish(lines[index])[0]
        count = len(batch) if keep is None else keep.count(1)
        if count and (built is None or keep is not None or replacements):
            built = scan.build(keep, replacements)
        # The detect filter's classes, when the new block has every scanned line in its place.
        classes = (
            (self.native, scan.class_ids)
            if keep is None and not replacements and not isinstance(scan, _PyScan | _Retried)
            else None
        )
        scan.release()
        if not count or built is None:
            return batch.derive([])
        return self._block_batch(batch, scan, keep, count, built, classes)

    def _block_batch(
        self,
        batch: Batch,
        scan: _PyScan | _Retried | Any,
        keep: bytes | None,
        count: int,
        new_block: bytes,
        classes: tuple[Any, bytes] | None = None,
    ) -> Batch:
        """The lazy batch of the filtered block (carrying the scan's detection classes)."""
        source = batch

        def materialize() -> list[Record]:
            # The source's records (their times, tags and tail identities) with the new bytes.
            lines = new_block.split(b"\n")
            identities = scan.identities()
            records: list[Record] = []
            for index, record in enumerate(source.records):
                if keep is None or keep[index]:
                    record.raw = lines[len(records)]
                    record.body_ = None
                    if identities[index] is not None:
                        record.identity = identities[index]
                    records.append(record)
            return records

        return Batch(
            batch.tag,
            None,
            batch.ack,
            batch.size_bytes,
            batch.created,
            block=ScannedBlock(new_block, count, materialize, classes),
        )

    def _finish(self, raw: bytes) -> tuple[bytes, bool]:
        """A SLOW event's output bytes (redacted, flattened) and whether they differ from ``raw``."""
        ev = _decode_event(raw)
        if ev is None:  # pragma: no cover - the scan found an event in these bytes
            return raw, False
        redacted = False
        body: Any = None
        # Metadata and None levels carry no request/response bodies: nothing to redact.
        if self.redact_secrets and ev.level not in _BODILESS:
            secret_res, token_res = _secret_resource(ev)
            if secret_res or token_res or _hinted(raw):
                body = decode_json(raw)  # a number orjson refuses must not skip the redaction
                for field in ("requestObject", "responseObject"):
                    if field in body:
                        redacted |= _redact_object(body[field], secret_res, token_res)
        for parts, needle in self.paths:
            if needle is None or needle in raw:
                if body is None:
                    body = decode_json(raw)
                redacted |= _redact_path(body, parts)
        if redacted:
            raw = orjson.dumps(body)
        if self.flatten:
            raw = _splice(_flat(ev, redacted), raw)
        return raw, self.flatten or redacted

    def _select(self, scan: _PyScan | Any, token: AckToken | None) -> bytes | None:
        """Which lines go on (one byte each, 0 = removed; None = all): drop rules and dedupe.

        ``token``: the batch's acknowledgement token (any source's: the webhook's, a tail's),
        whose completion tells when the batch's keys are delivered; None when unknown.
        """
        codes: bytes = scan.codes
        dropped = codes.count(DROP)
        if not self.dedupe:
            return self._rule_drops(codes, dropped)
        self._expire()
        persist = self.db is not None and token is not None
        if self.native is not None and not isinstance(scan, _Retried):
            # The common case in one native call, without a Python string per key: no key
            # repeats within the batch and none is seen or in flight.
            handle = self.seen.add_scan_if_new(scan)
            if handle is not None:
                # With db the keys are needed as text, to be stored once delivered.
                self._fly(token, handle, [k for k in scan.keys if k is not None] if persist else None)
                return self._rule_drops(codes, dropped)
        keys: list[str | None] = scan.keys  # Python strings from here on
        if self.native is None or isinstance(scan, _Retried):
            # The same common case in C (set operations) for the Python key set.
            events = len(codes) - dropped - codes.count(PASS)
            batch_keys = set(keys)
            batch_keys.discard(None)
            if len(batch_keys) == events and self.seen.isdisjoint(batch_keys):
                if batch_keys:
                    self._fly(token, self.seen.add(batch_keys), batch_keys)  # type: ignore[arg-type]
                return self._rule_drops(codes, dropped)
        return self._select_each(codes, keys, token, dropped)

    def _rule_drops(self, codes: bytes, dropped: int) -> bytes | None:
        if dropped:
            self.m_dropped_by_rule.inc(dropped)
            return bytes(code != DROP for code in codes)
        return None

    def _select_each(self, codes: bytes, keys: list[str | None], token: AckToken | None, dropped: int) -> bytes:
        """The per-line dedupe: repeats within the batch and keys seen (delivered or in flight)."""
        seen = self.seen
        keep = bytearray(b"\x01") * len(codes)
        duplicates = 0
        seen_before = False
        new_keys: list[str] = []
        batch_keys: set[str] = set()
        for index, code in enumerate(codes):
            if code == PASS:
                continue  # not an audit event: not ours to change
            if code == DROP:
                keep[index] = 0
                continue
            key = keys[index]
            assert key is not None
            if key in batch_keys:
                duplicates += 1  # its twin goes on in this very batch
                keep[index] = 0
                continue
            if key in seen:
                duplicates += 1
                keep[index] = 0
                seen_before = True
                continue
            batch_keys.add(key)
            new_keys.append(key)
        if seen_before and token is not None and not token.done and self.flying:
            # A removed copy's twin may still be in flight (seen holds both kinds, and the native
            # fast path keeps no text per key to tell which): this batch's source is told only
            # once every batch in flight now is delivered, and told "not delivered" if one was
            # dropped (its keys are forgotten then: the source sends this one again and the copy
            # goes through). Its own keys count as delivered as soon as it is (AckToken.hold).
            # Those batches were all filtered before this one: waits never form a cycle.
            for state in self.flying:
                token.hold()
                state.waiters.append(token)
        if new_keys:
            self._fly(token, seen.add(new_keys), new_keys)
        # The router counts what a filter removes (dropped{reason="filtered"}); these split it.
        if duplicates:
            self.m_duplicates.inc(duplicates)
        if dropped:
            self.m_dropped_by_rule.inc(dropped)
        return bytes(keep)


__all__ = ["KubernetesAuditTransform"]
