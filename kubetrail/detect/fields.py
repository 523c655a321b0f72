"""The fields rules read: Falco's k8saudit plugin (``ka.*``) and json plugin (``jevt.*``).

Every field is a string or a list of strings, as in the plugins: a JSON value that is not a
string is written as compact JSON (``true``, ``201``, an object). A value that is not there
(the key is missing, or a list came out empty) is *not available*: every comparison on it is
false, so ``not`` of it is true (Falco's semantics), and an output shows ``<NA>``.

**Speed.** Most rules read a handful of top-level members (user, verb, objectRef, stage), so an
:class:`Event` holds a small msgspec struct of just those (:class:`Light`: the
``kubernetes_audit`` filter's own ``AuditEvent``, one definition for both; decoded for a whole
block at once by :func:`decode_block`); the event is parsed in full with orjson only when a rule
reaches into ``requestObject``/``responseObject`` or a ``jevt`` field. Values are cached per
event, since many rules ask for the same ones. :func:`class_of` is the Python side of the native
scan's detection classes (the ``detect`` filter's fast path).

Where the plugin's code and its documentation disagree, the documentation is followed:
``ka.sourceips`` is the request's ``sourceIPs`` (the plugin reads it under
``requestObject.rules``), and ``...eff_run_as_user``/``eff_run_as_group`` combine the pod's and
the container's ``securityContext`` (the plugin looks outside them).
"""

from __future__ import annotations

import datetime as dt
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson

from kubetrail.core.audit_event import AuditEvent
from kubetrail.core.record import decode_json

try:  # optional: kubetrail_native (see native/src/alerts.rs)
    from kubetrail_native import cut_lines as _cut_lines
except ImportError:  # pragma: no cover - depends on the installation
    _cut_lines = None

# -- the event ----------------------------------------------------------------------------


# The members most rules read, as the ``kubernetes_audit`` filter decodes them: one definition
# (:class:`~kubetrail.transforms.kubernetes_audit.AuditEvent`) for the filter's scan, the rules
# and the native scan's mirror of it, whose detection classes (:func:`class_of`) the ``detect``
# filter takes instead of decoding each line again. Typed members: msgspec decodes typed structs
# about three times faster than ``Any``. An event whose members have other types fails this
# decode and is read from its parsed document instead (same values, slower), so odd input
# changes speed, never results.
Light = AuditEvent


def class_of(light: Light) -> tuple[Any, ...]:
    """The event's detection class, in the native scan's order (``native/src/auditclass.rs``):
    stage, verb, resource, subresource, user, impersonated user, namespace, authorization
    decision, response code, whether it has a request object, a response object. Rules
    specialised for the first four that read only these (see ``engine._FEW_VALUES``) decide
    every event of a class alike; the two flags decide what rules read in those objects when an
    event has none (see :func:`object_member`)."""
    ref, user, imp, notes, status = (
        light.objectRef,
        light.user,
        light.impersonatedUser,
        light.annotations,
        light.responseStatus,
    )
    return (
        light.stage,
        light.verb,
        ref.resource if ref else None,
        ref.subresource if ref else None,
        user.username if user else None,
        imp.username if imp else None,
        ref.namespace if ref else None,
        notes.decision if notes else None,
        status.code if status else None,
        _present(light.requestObject),
        _present(light.responseObject),
    )


def _present(raw: msgspec.Raw) -> bool:
    return bool(raw) and bytes(raw) != b"null"  # null: Event.member gives None, as for none


# ka.req.* fields that do not read the request object.
_NOT_OF_REQUEST = frozenset({"ka.req.binding.subject.has_name", "ka.req.configmap.name"})


def object_member(spelling: str) -> str | None:
    """``requestObject`` or ``responseObject`` when the field (as a rule spells it, with its
    argument) reads only inside that member, so it is not available on an event without it;
    None for any other field. The tests check this against every field."""
    name, _, arg = spelling.partition("[")
    if name.startswith("ka.req.") and name not in _NOT_OF_REQUEST and name in FIELDS:
        return "requestObject"
    if name == "ka.resp.name":
        return "responseObject"
    if name in ("jevt.value", "json.value"):
        for member in ("requestObject", "responseObject"):
            if arg.startswith(f"/{member}/") or arg == f"/{member}]":
                return member
    return None


_DECODE_ONE = msgspec.json.Decoder(Light).decode
_DECODE_LINES = msgspec.json.Decoder(Light).decode_lines
_MISSING = object()


class Event:
    """One audit event as rules see it: its bytes, the light struct, the parsed document on
    demand, and the values rules asked for so far."""

    __slots__ = ("_cache", "_doc", "_objects", "_raw", "light", "time_ns")

    def __init__(
        self, raw: bytes | tuple[Lines, int], light: Light | None = None, time_ns: int | None = None, doc: Any = None
    ) -> None:
        self._raw = raw  # or (block, line number): a block is cut into lines only if one is needed
        self.light = light
        self._doc = doc
        self.time_ns = time_ns
        self._cache: dict[str, Any] | None = None  # made on first use: most events never need it
        self._objects: dict[str, Any] | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any], time_ns: int | None = None) -> Event:
        raw = orjson.dumps(body)
        return cls(raw, _light(raw), time_ns, body)

    @property
    def raw(self) -> bytes:
        raw = self._raw
        if not isinstance(raw, bytes):
            lines, index = raw
            raw = self._raw = lines.line(index)
        return raw

    def doc(self) -> Any:
        """The whole event parsed (``{}`` when it is not JSON)."""
        doc = self._doc
        if doc is None:
            try:
                doc = decode_json(self.raw)
            except ValueError:
                doc = {}
            self._doc = doc
        return doc

    def member(self, name: str) -> Any:
        """``requestObject`` or ``responseObject`` parsed (None when the event has none)."""
        light = self.light
        if light is None:
            doc = self.doc()
            return doc.get(name) if isinstance(doc, dict) else None
        raw = getattr(light, name)
        if not raw:
            return None
        objects = self._objects
        if objects is None:
            objects = self._objects = {}
        if name not in objects:
            objects[name] = decode_json(bytes(raw))  # a number orjson refuses must not blind a rule
        return objects[name]

    def value(self, ref: FieldRef) -> Any:
        cache = self._cache
        if cache is None:
            cache = self._cache = {}
        value = cache.get(ref.key, _MISSING)
        if value is _MISSING:
            try:
                value = ref.spec.extract(self, ref.arg)
            except (TypeError, ValueError, KeyError, IndexError, AttributeError):
                value = None  # a value of an unexpected shape: not available, never an error
            if value is not None and not isinstance(value, str) and not value:
                value = None  # an empty list is not available either
            cache[ref.key] = value
        return value

    def is_audit_event(self) -> bool:
        """Whether it has an ``auditID`` (the k8saudit plugin extracts nothing otherwise)."""
        if self.light is not None:
            return self.light.auditID is not None
        doc = self.doc()  # members of unexpected types: the light decode refused it
        return isinstance(doc, dict) and doc.get("auditID") is not None

    def timestamp_ns(self) -> int:
        """The event's time: its record's, else ``stageTimestamp``, else now (an event always has
        a time in Falco: the plugin stamps one it cannot read with the time it got it)."""
        if self.time_ns is not None:
            return self.time_ns
        stamp = self.light.stageTimestamp if self.light is not None else None
        if stamp is None and self.light is None:
            doc = self.doc()
            stamp = doc.get("stageTimestamp") if isinstance(doc, dict) else None
        if isinstance(stamp, str):
            try:
                parsed = dt.datetime.fromisoformat(stamp)
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=dt.UTC)
                self.time_ns = int(parsed.timestamp()) * 1_000_000_000 + parsed.microsecond * 1000 or 1
                return self.time_ns  # never 0: rules read `jevt.rawtime=0` as "never" (see fold)
            except ValueError:
                pass
        self.time_ns = time.time_ns()
        return self.time_ns


def _light(raw: bytes) -> Light | None:
    try:
        light = _DECODE_ONE(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        return None
    return light if isinstance(light, Light) else None


def decode_block(lines: list[bytes]) -> list[Event]:
    """Events for JSON lines, decoded in one call when every line decodes (the common case)."""
    try:
        lights: list[Light | None] = _DECODE_LINES(b"\n".join(lines))  # type: ignore[assignment]
        if len(lights) != len(lines):
            raise ValueError("line count")
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError, ValueError):
        lights = [_light(raw) for raw in lines]
    return [Event(raw, light) for raw, light in zip(lines, lights, strict=True)]


def decode_lines_block(block: bytes, count: int) -> list[Event] | None:
    """Events for a block of ``count`` newline-terminated JSON lines without cutting it into
    lines (each event's bytes are cut out only if a rule needs the whole event); None when the
    block does not decode as ``count`` light events at once (the caller goes line by line)."""
    try:
        lights: list[Light] = _DECODE_LINES(block)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        return None
    if len(lights) != count:
        return None
    lines = Lines(block)
    return [Event((lines, index), light) for index, light in enumerate(lights)]


class Lines:
    """A block's lines, each cut out on request (only as far into the block as asked: cutting
    all of a big block into lines costs more than the few a filter usually needs)."""

    __slots__ = ("_block", "_starts")

    def __init__(self, block: bytes) -> None:
        self._block = block
        self._starts = [0]  # where each line found so far starts, and one past the last's end

    def line(self, index: int) -> bytes:
        block, starts = self._block, self._starts
        find = block.find
        while len(starts) <= index + 1:
            start = starts[-1]
            if start > len(block):
                raise IndexError("line index out of range")
            end = find(b"\n", start)
            starts.append((len(block) if end < 0 else end) + 1)
        return block[starts[index] : starts[index + 1] - 1]

    def many(self, indexes: list[int]) -> list[bytes]:
        """Several lines at once (natively, when built: one pass over the block in Rust)."""
        if _cut_lines is not None and len(indexes) > 1:
            return _cut_lines(self._block, indexes)  # type: ignore[no-any-return]
        return [self.line(index) for index in indexes]


# -- values ---------------------------------------------------------------------------------


def as_text(value: Any) -> str | None:
    """A JSON value as the plugins give it: a string as it is, anything else as compact JSON."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, msgspec.Struct):
        value = msgspec.to_builtins(value)
    return orjson.dumps(value).decode()


def _light_path(ev: Event, keys: tuple[str, ...]) -> Any:
    node: Any = ev.light
    if node is None:
        return _doc_path(ev.doc(), keys)
    for key in keys:
        if node is None:
            return None
        node = node.get(key) if isinstance(node, dict) else getattr(node, key, None)
    return node


def _doc_path(node: Any, keys: tuple[str, ...] | list[str]) -> Any:
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _index(arg: str | None) -> int | None:
    if arg is None or arg == "":
        return None
    return int(arg)


def _each(node: Any, index: int | None, keys: tuple[str, ...]) -> list[Any] | None:
    """The plugin's getValuesRecursive: ``keys`` under each item of the list ``node`` (or of
    item ``index`` only); an item without them gives None. None: ``node`` is no list."""
    if not isinstance(node, list):
        return None
    items = node if index is None else (node[index : index + 1] if 0 <= index < len(node) else [])
    if index is not None and not items:
        return None
    return [_doc_path(item, keys) for item in items]


def _texts(values: list[Any] | None) -> list[str] | None:
    """Values as strings, the missing ones skipped (arrayAsStringsSkipNil)."""
    if values is None:
        return None
    return [text for value in values if (text := as_text(value)) is not None]


# -- field specifications ------------------------------------------------------------------------

Extract = Callable[[Event, str | None], Any]


@dataclass(frozen=True)
class FieldSpec:
    name: str
    extract: Extract
    is_list: bool = False
    arg: str = "none"  # none, required (a key or pointer), index (optional container index)
    desc: str = ""
    light: tuple[str, ...] | None = None  # a scalar the light struct holds at this path


@dataclass(frozen=True)
class FieldRef:
    """A field as a rule names it: spec plus its argument (``ka.uri.param[command]``)."""

    spec: FieldSpec
    arg: str | None
    key: str  # as written, the cache key
    light: tuple[str, ...] | None = None  # read straight from the light struct (see fast_getter)

    @property
    def name(self) -> str:
        return self.spec.name


FIELDS: dict[str, FieldSpec] = {}


def _add(name: str, extract: Extract, is_list: bool = False, arg: str = "none", desc: str = "") -> None:
    FIELDS[name] = FieldSpec(name, extract, is_list, arg, desc, getattr(extract, "light_path", None))


def _top(*keys: str) -> Extract:
    def extract(ev: Event, arg: str | None) -> Any:
        return as_text(_light_path(ev, keys))

    extract.light_path = keys  # type: ignore[attr-defined]
    return extract


def _top_list(*keys: str) -> Extract:
    def extract(ev: Event, arg: str | None) -> Any:
        value = _light_path(ev, keys)  # typed list[str] in the light struct, else the document's
        return _texts(value) if isinstance(value, list) else None

    return extract


def _req(member: str, *keys: str) -> Extract:
    def extract(ev: Event, arg: str | None) -> Any:
        return as_text(_doc_path(ev.member(member), keys))

    return extract


def _req_list(member: str, *keys: str) -> Extract:
    def extract(ev: Event, arg: str | None) -> Any:
        value = _doc_path(ev.member(member), keys)
        return _texts(value) if isinstance(value, list) else None

    return extract


def _annotation(name: str, attribute: str) -> Extract:
    def extract(ev: Event, arg: str | None) -> Any:
        if ev.light is not None:
            return _light_path(ev, ("annotations", attribute))
        notes = _doc_path(ev.doc(), ("annotations",))
        return as_text(notes.get(name)) if isinstance(notes, dict) else None

    extract.light_path = ("annotations", attribute)  # type: ignore[attr-defined]
    return extract


def _response_reason(ev: Event, arg: str | None) -> Any:
    light = ev.light
    if light is None:
        return as_text(_doc_path(ev.doc(), ("responseStatus", "reason")))
    status = light.responseStatus
    if status is None or not status.reason:
        return None
    return as_text(orjson.loads(bytes(status.reason)))  # kept raw: any JSON type (see AuditEvent)


def _uri_param(ev: Event, arg: str | None) -> Any:
    uri = _light_path(ev, ("requestURI",))
    if not isinstance(uri, str) or arg is None:
        return None
    values = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query, keep_blank_values=True).get(arg)
    return values[0] if values else None


def _spec(ev: Event) -> Any:
    return _doc_path(ev.member("requestObject"), ("spec",))


def _container_values(kind: str, *keys: str) -> Extract:
    def extract(ev: Event, arg: str | None) -> Any:
        return _texts(_each(_doc_path(_spec(ev), (kind,)), _index(arg), keys))

    return extract


def _images(kind: str) -> Extract:
    def extract(ev: Event, arg: str | None) -> Any:
        images = _each(_doc_path(_spec(ev), (kind,)), _index(arg), ("image",))
        if images is None or any(image is None for image in images):
            return None  # the plugin fails the field when a container has no image
        return [as_text(image) for image in images]

    return extract


def _repository(image: str) -> str:
    # The plugin's rule: up to the first ':' (tag), then up to '@' (digest).
    return image.split(":")[0].split("@")[0]


def _repositories(kind: str) -> Extract:
    images = _images(kind)

    def extract(ev: Event, arg: str | None) -> Any:
        found = images(ev, arg)
        return None if found is None else [_repository(image) for image in found]

    return extract


def _host_ports(kind: str) -> Extract:
    def extract(ev: Event, arg: str | None) -> Any:
        per_container = _each(_doc_path(_spec(ev), (kind,)), _index(arg), ("ports",))
        if per_container is None:
            return None
        out: list[str] = []
        for ports in per_container:
            for port in ports if isinstance(ports, list) else ():
                if not isinstance(port, dict):
                    continue
                # hostPort, else containerPort (with hostNetwork that is the host's port)
                value = port.get("hostPort", port.get("containerPort"))
                if value is not None:
                    out.append(as_text(value))  # type: ignore[arg-type]
        return out

    return extract


def _effective(kind: str, key: str) -> Extract:
    def extract(ev: Event, arg: str | None) -> Any:
        spec = _spec(ev)
        pod = as_text(_doc_path(spec, ("securityContext", key))) or "0"
        values = _each(_doc_path(spec, (kind,)), _index(arg), ("securityContext", key))
        if values is None:
            return None
        return [pod if value is None else as_text(value) for value in values]

    return extract


def _any_privileged(ev: Event, arg: str | None) -> Any:
    values = _each(_doc_path(_spec(ev), ("containers",)), None, ("securityContext", "privileged"))
    if values is None:
        return None
    return "true" if any(value is True for value in values) else "false"


def _first(extract: Extract) -> Extract:
    def first(ev: Event, arg: str | None) -> Any:
        values = extract(ev, "0")
        return values[0] if values else None

    return first


def _rules_field(key: str) -> Extract:
    def extract(ev: Event, arg: str | None) -> Any:
        values = _each(_doc_path(ev.member("requestObject"), ("rules",)), _index(arg), (key,))
        if values is None:
            return None
        out: list[str] = []
        for value in values:
            if isinstance(value, list):
                out.extend(text for item in value if (text := as_text(item)) is not None)
        return out

    return extract


def _volume_hostpath(ev: Event, arg: str | None) -> Any:
    paths = _texts(_each(_doc_path(_spec(ev), ("volumes",)), None, ("hostPath", "path")))
    if paths is None or arg is None:
        return None
    # A trailing * is a prefix match, anything else equality (the deprecated field's rule).
    if arg.endswith("*"):
        return "true" if any(path.startswith(arg[:-1]) for path in paths) else "false"
    return "true" if arg in paths else "false"


def _volume_types(ev: Event, arg: str | None) -> Any:
    volumes = _each(_doc_path(_spec(ev), ("volumes",)), _index(arg), ())
    if volumes is None:
        return None
    return [key for volume in volumes if isinstance(volume, dict) for key in volume if key != "name"]


# JSON pointers the light struct answers without a full parse (``kevt`` reads /stage on every event).
_ANNOTATION_ATTRIBUTES = {"authorization.k8s.io/decision": "decision", "authorization.k8s.io/reason": "reason"}


def _light_pointer(parts: tuple[str, ...]) -> tuple[str, ...] | None:
    """The light struct's path for a JSON pointer's parts, or None when it does not hold it."""
    if parts in _LIGHT_POINTERS:
        return parts
    if len(parts) == 2 and parts[0] == "annotations" and parts[1] in _ANNOTATION_ATTRIBUTES:
        return ("annotations", _ANNOTATION_ATTRIBUTES[parts[1]])
    return None


_LIGHT_POINTERS = {
    ("auditID",),
    ("stage",),
    ("verb",),
    ("requestURI",),
    ("userAgent",),
    ("stageTimestamp",),
    ("user", "username"),
    ("impersonatedUser", "username"),
    ("objectRef", "resource"),
    ("objectRef", "subresource"),
    ("objectRef", "namespace"),
    ("objectRef", "name"),
    ("responseStatus", "code"),
}


def _jevt_value(ev: Event, arg: str | None) -> Any:
    if not arg:
        return None
    parts = tuple(part.replace("~1", "/").replace("~0", "~") for part in arg.lstrip("/").split("/"))
    light = _light_pointer(parts)
    if ev.light is not None and light is not None:
        return as_text(_light_path(ev, light))
    node = ev.doc()
    for part in parts:
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
        if node is None:
            return None
    return as_text(node)


def _jevt_obj(ev: Event, arg: str | None) -> Any:
    return orjson.dumps(ev.doc(), option=orjson.OPT_INDENT_2).decode()


def _time_of(ev: Event) -> dt.datetime:
    return dt.datetime.fromtimestamp(ev.timestamp_ns() / 1e9, tz=dt.UTC)


def _jevt_time(ev: Event, arg: str | None) -> Any:
    ns = ev.timestamp_ns()
    return _time_of(ev).strftime("%H:%M:%S") + f".{ns % 1_000_000_000:09d}"


def _jevt_iso(ev: Event, arg: str | None) -> Any:
    ns = ev.timestamp_ns()
    return _time_of(ev).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 1_000_000_000:09d}Z"


def _jevt_rawtime(ev: Event, arg: str | None) -> Any:
    return str(ev.timestamp_ns())


_add("ka.auditid", _top("auditID"), desc="The unique id of the audit event")
_add("ka.stage", _top("stage"), desc="Stage of the request")
_add("ka.auth.decision", _annotation("authorization.k8s.io/decision", "decision"), desc="The authorization decision")
_add("ka.auth.reason", _annotation("authorization.k8s.io/reason", "reason"), desc="The authorization reason")
_add("ka.user.name", _top("user", "username"), desc="The user name performing the request")
_add("ka.user.groups", _top_list("user", "groups"), is_list=True, desc="The groups of the user")
_add("ka.impuser.name", _top("impersonatedUser", "username"), desc="The impersonated user name")
_add("ka.verb", _top("verb"), desc="The action being performed")
_add("ka.uri", _top("requestURI"), desc="The request URI as sent from client to server")
_add("ka.uri.param", _uri_param, arg="required", desc="A query parameter of the URI: ka.uri.param[key]")
_add("ka.target.name", _top("objectRef", "name"), desc="The target object name")
_add("ka.target.namespace", _top("objectRef", "namespace"), desc="The target object namespace")
_add("ka.target.resource", _top("objectRef", "resource"), desc="The target object resource")
_add("ka.target.subresource", _top("objectRef", "subresource"), desc="The target object subresource")
_add("ka.req.binding.subjects", _req_list("requestObject", "subjects"), is_list=True, desc="A binding's subjects")
_add("ka.req.binding.role", _req("requestObject", "roleRef", "name"), desc="The role a binding links")
_add("ka.req.binding.subject.has_name", lambda ev, arg: "true", arg="required", desc="Deprecated: always true")
_add("ka.req.configmap.name", _top("objectRef", "name"), desc="A configmap's name")
_add("ka.req.configmap.obj", _req("requestObject", "data"), desc="A configmap's data, as JSON")
for _kind in ("containers", "initContainers", "ephemeralContainers"):
    _p = f"ka.req.pod.{_kind}"
    _add(f"{_p}.image", _images(_kind), True, "index", "The images of the pod's " + _kind)
    _add(f"{_p}.image.repository", _repositories(_kind), True, "index", "The images' repositories")
    _add(f"{_p}.host_port", _host_ports(_kind), True, "index", "hostPort (else containerPort) values")
    for _field, _keys in (
        ("privileged", ("securityContext", "privileged")),
        ("allow_privilege_escalation", ("securityContext", "allowPrivilegeEscalation")),
        ("read_only_fs", ("securityContext", "readOnlyRootFilesystem")),
        ("run_as_user", ("securityContext", "runAsUser")),
        ("run_as_group", ("securityContext", "runAsGroup")),
        ("proc_mount", ("securityContext", "procMount")),
        ("add_capabilities", ("securityContext", "capabilities", "add")),
    ):
        _add(f"{_p}.{_field}", _container_values(_kind, *_keys), True, "index", f"securityContext of {_kind}")
    _add(f"{_p}.eff_run_as_user", _effective(_kind, "runAsUser"), True, "index", "Effective uid (0 if unset)")
    _add(f"{_p}.eff_run_as_group", _effective(_kind, "runAsGroup"), True, "index", "Effective gid (0 if unset)")
_add("ka.req.container.image", _first(_images("containers")), desc="Deprecated: the first container's image")
_add("ka.req.container.image.repository", _first(_repositories("containers")), desc="Deprecated")
_add("ka.req.container.privileged", _any_privileged, desc="Deprecated: true if any container is privileged")
_add("ka.req.pod.host_ipc", _req("requestObject", "spec", "hostIPC"), desc="The pod's hostIPC flag")
_add("ka.req.pod.host_network", _req("requestObject", "spec", "hostNetwork"), desc="The pod's hostNetwork flag")
_add("ka.req.container.host_network", _req("requestObject", "spec", "hostNetwork"), desc="Deprecated alias")
_add("ka.req.pod.host_pid", _req("requestObject", "spec", "hostPID"), desc="The pod's hostPID flag")
_add("ka.req.pod.run_as_user", _req("requestObject", "spec", "securityContext", "runAsUser"), desc="Pod runAsUser")
_add("ka.req.pod.run_as_group", _req("requestObject", "spec", "securityContext", "runAsGroup"), desc="runAsGroup")
_add("ka.req.pod.fs_group", _req("requestObject", "spec", "securityContext", "fsGroup"), desc="The pod's fsGroup")
_add(
    "ka.req.pod.supplemental_groups",
    _req_list("requestObject", "spec", "securityContext", "supplementalGroups"),
    is_list=True,
    desc="The pod's supplementalGroups",
)
_add("ka.req.role.rules", _req_list("requestObject", "rules"), is_list=True, desc="A role's rules, as JSON")
for _key in ("apiGroups", "nonResourceURLs", "verbs", "resources"):
    _add(f"ka.req.role.rules.{_key}", _rules_field(_key), True, "index", f"The {_key} of a role's rules")
_add("ka.req.service.type", _req("requestObject", "spec", "type"), desc="A service's type")
_add(
    "ka.req.service.ports",
    lambda ev, arg: _texts(_each(_doc_path(_spec(ev), ("ports",)), _index(arg), ())),
    True,
    "index",
    "A service's ports, as JSON",
)
_add(
    "ka.req.pod.volumes.hostpath",
    lambda ev, arg: _texts(_each(_doc_path(_spec(ev), ("volumes",)), _index(arg), ("hostPath", "path"))),
    True,
    "index",
    "The hostPath paths of the pod's volumes",
)
_add("ka.req.volume.hostpath", _volume_hostpath, arg="required", desc="Deprecated: a volume uses this host path")
_add(
    "ka.req.pod.volumes.flexvolume_driver",
    lambda ev, arg: _texts(_each(_doc_path(_spec(ev), ("volumes",)), _index(arg), ("flexVolume", "driver"))),
    True,
    "index",
    "The flexVolume drivers of the pod's volumes",
)
_add("ka.req.pod.volumes.volume_type", _volume_types, True, "index", "The types of the pod's volumes")
_add("ka.resp.name", _req("responseObject", "metadata", "name"), desc="The response object's name")
_add("ka.response.code", _top("responseStatus", "code"), desc="The response code")
_add("ka.response.reason", _response_reason, desc="The response reason")
_add("ka.useragent", _top("userAgent"), desc="The client's user agent")
_add("ka.sourceips", _top_list("sourceIPs"), is_list=True, desc="The client's IP addresses")
for _prefix in ("jevt", "json"):
    _add(f"{_prefix}.value", _jevt_value, arg="required", desc="The value at a JSON pointer: jevt.value[/a/b]")
    _add(f"{_prefix}.obj", _jevt_obj, desc="The whole event as indented JSON")
    _add(f"{_prefix}.time", _jevt_time, desc="The event's time, HH:MM:SS.nnnnnnnnn (UTC)")
    _add(f"{_prefix}.time.iso8601", _jevt_iso, desc="The event's time in ISO 8601 (UTC)")
    _add(f"{_prefix}.rawtime", _jevt_rawtime, desc="The event's time in nanoseconds")
del _kind, _p, _field, _keys, _key, _prefix

#: Fields read from the light struct alone (no full parse): the index and cheap rules use them.
LIGHT_FIELDS = frozenset(
    name
    for name in FIELDS
    if name.startswith(("ka.auditid", "ka.stage", "ka.auth.", "ka.user.", "ka.impuser.", "ka.verb", "ka.uri"))
    or name.startswith(("ka.target.", "ka.response.", "ka.useragent", "ka.sourceips", "ka.req.configmap.name"))
)


def field_ref(name: str, arg: str | None) -> FieldRef:
    """The reference for ``name[arg]``; ValueError naming what is wrong."""
    spec = FIELDS.get(name)
    if spec is None:
        raise ValueError(f"unknown field '{name}'")
    if spec.arg == "none" and arg is not None:
        raise ValueError(f"field '{name}' takes no argument")
    if spec.arg == "required" and not arg:
        raise ValueError(f"field '{name}' needs an argument: {name}[...]")
    if spec.arg == "index" and arg is not None and not arg.isdigit():
        raise ValueError(f"field '{name}' takes a container index, not '{arg}'")
    key = name if arg is None else f"{name}[{arg}]"
    light = spec.light
    if spec.extract is _jevt_value and arg:
        parts = tuple(part.replace("~1", "/").replace("~0", "~") for part in arg.lstrip("/").split("/"))
        light = _light_pointer(parts)
    return FieldRef(spec, arg, key, light)


def fast_getter(ref: FieldRef) -> Callable[[Event], Any]:
    """A reader of ``ref``'s value that goes straight to the light struct (no cache, no
    exception handling: a few attribute reads), for the scalars most rules test on every event.
    Events the light decode refused take the general path."""
    path = ref.light
    value_of = Event.value
    if path is None:
        return lambda ev: value_of(ev, ref)
    if len(path) == 1:
        (first,) = path

        def get_one(ev: Event) -> Any:
            light = ev.light
            if light is None:
                return value_of(ev, ref)
            value = getattr(light, first)
            if value is None or value.__class__ is str:
                return value
            return as_text(value)

        return get_one
    first, second = path

    def get_two(ev: Event) -> Any:
        light = ev.light
        if light is None:
            return value_of(ev, ref)
        node = getattr(light, first)
        if node is None:
            return None
        value = node.get(second) if node.__class__ is dict else getattr(node, second, None)
        if value is None or value.__class__ is str:
            return value
        return as_text(value)

    return get_two
