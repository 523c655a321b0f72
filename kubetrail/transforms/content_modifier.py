"""The ``content_modifier`` processor (also usable as a filter): one action on one key.

Fluent Bit's processor, with its options: ``action`` (``insert``, ``upsert``, ``delete``,
``rename``, ``hash``, ``extract``, ``convert``), ``key``, ``value``, ``pattern``,
``converted_type`` and ``context``. Semantics as in Fluent Bit's ``cm_logs.c``:

* ``insert`` adds ``key: value`` only when the key is absent; ``upsert`` sets it either way;
* ``delete`` removes the key; ``rename`` renames it to ``value`` (a key already there under the
  new name is replaced, the value keeps its place);
* ``hash`` replaces the value by the hex SHA-256 of its text (numbers and booleans as their
  JSON text), so equal values still compare equal after anonymisation;
* ``extract`` searches ``pattern`` (named groups, Onigmo ``(?<name>)`` syntax too) in the value
  and adds one key per group that matched;
* ``convert`` to ``string``, ``boolean``, ``int`` or ``double``; a value that does not convert
  stays as it is (as in Fluent Bit, not an error per record).

Contexts: ``body`` (the record, default) and ``attributes`` (the record's metadata, which is
what Fluent Bit's log attributes map to here). Fluent Bit's OpenTelemetry contexts
(``otel_resource_attributes``, ``otel_scope_*``) and the trace contexts have nothing to act on in
kubetrail's records and are refused with that reason, not silently ignored. ``key`` may be a
record accessor (``$kubernetes['labels']['app']``) for nested keys.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any

from kubetrail.core.accessor import RecordAccessor, value_as_text
from kubetrail.core.component import ComponentContext, Transform
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option, ruby_to_python_regex
from kubetrail.core.record import Record

ACTIONS = ("insert", "upsert", "delete", "rename", "hash", "extract", "convert")
CONTEXTS = ("body", "attributes")
NOT_HERE = (
    "otel_resource_attributes",
    "otel_scope_name",
    "otel_scope_version",
    "otel_scope_attributes",
    "span_name",
    "span_kind",
    "span_status",
    "span_attributes",
)
TYPES = ("string", "boolean", "int", "double")
Body = dict[str, Any]


def _convert(value: Any, target: str) -> Any:
    """Fluent Bit's conversions; ``_KEEP`` when the value does not convert."""
    if target == "string":
        return value_as_text(value) if value is not None else value
    if target == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            return value != 0
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        return _KEEP
    if target == "int":
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, (int, float)):
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    return int(float(value.strip()))
                except ValueError:
                    return _KEEP
        return _KEEP
    # double
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return _KEEP
    return _KEEP


_KEEP = object()


class ContentModifierTransform(Transform):
    plugin_name = "content_modifier"
    description = "One action (insert, upsert, delete, rename, hash, extract, convert) on one key"
    options = (
        Option("action", "choice", None, choices=ACTIONS, required=True, help="What to do with the key"),
        Option("key", help="The key (a name, or a record accessor such as $a['b'])"),
        Option("value", help="insert/upsert: the value; rename: the new name"),
        Option("pattern", help="extract: regular expression with named groups"),
        Option("converted_type", "choice", None, choices=TYPES, help="convert: the type to convert to"),
        Option("context", "str", "body", help="body (the record) or attributes (its metadata)"),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        action: str = config["action"]
        context = str(config["context"]).strip().lower()
        if context in NOT_HERE:
            raise ConfigError(
                f"context {context!r} has nothing to act on: kubetrail's log records have no OpenTelemetry "
                "resource, scope or spans; use body or attributes",
                key="context",
            )
        if context not in CONTEXTS:
            raise ConfigError(f"bad context {context!r}; allowed: {', '.join(CONTEXTS)}", key="context")
        self.attributes = context == "attributes"
        key = config["key"]
        if not key:
            raise ConfigError(f"action {action} needs a 'key'", key="key")
        try:
            self.accessor = RecordAccessor(key)
        except ValueError as exc:
            raise ConfigError(str(exc), key="key") from None
        value = config["value"]
        if action in ("insert", "upsert", "rename") and value is None:
            raise ConfigError(f"action {action} needs a 'value'", key="value")
        self.value: str | None = value
        self.pattern: re.Pattern[str] | None = None
        if action == "extract":
            if not config["pattern"]:
                raise ConfigError("action extract needs a 'pattern' with named groups", key="pattern")
            try:
                self.pattern = re.compile(ruby_to_python_regex(config["pattern"]))
            except re.error as exc:
                raise ConfigError(f"bad pattern: {exc}", key="pattern") from None
            if not self.pattern.groupindex:
                raise ConfigError("the extract pattern has no named group (?<name>...)", key="pattern")
        self.converted_type: str | None = config["converted_type"]
        if action == "convert" and not self.converted_type:
            raise ConfigError(f"action convert needs 'converted_type' ({', '.join(TYPES)})", key="converted_type")
        self.apply: Callable[[Body], bool] = getattr(self, f"_{action}")

    # Each action returns True when it changed the mapping.

    def _parent(self, body: Body, create: bool) -> tuple[Body | None, str]:
        """The mapping that holds the key (nested for a record accessor) and the last key."""
        path = self.accessor.path
        node: Any = body
        for part in path[:-1]:
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                if not create or not isinstance(node, dict):
                    return None, ""
                child = node[part] = {}
            node = child
        last = path[-1]
        if not isinstance(node, dict) or not isinstance(last, str):
            return None, ""
        return node, last

    def _insert(self, body: Body) -> bool:
        parent, key = self._parent(body, create=True)
        if parent is None or key in parent:
            return False
        parent[key] = self.value
        return True

    def _upsert(self, body: Body) -> bool:
        parent, key = self._parent(body, create=True)
        if parent is None:
            return False
        parent[key] = self.value
        return True

    def _delete(self, body: Body) -> bool:
        parent, key = self._parent(body, create=False)
        if parent is None or key not in parent:
            return False
        del parent[key]
        return True

    def _rename(self, body: Body) -> bool:
        parent, key = self._parent(body, create=False)
        new = self.value
        if parent is None or key not in parent or new is None or new == key:
            return False
        # Rebuilt so the value keeps its place among the keys (a dict cannot rename in place).
        items = [(new if k == key else k, v) for k, v in parent.items() if k != new]
        parent.clear()
        parent.update(items)
        return True

    def _hash(self, body: Body) -> bool:
        parent, key = self._parent(body, create=False)
        if parent is None or key not in parent or parent[key] is None:
            return False
        text = value_as_text(parent[key]) or ""
        parent[key] = hashlib.sha256(text.encode()).hexdigest()
        return True

    def _extract(self, body: Body) -> bool:
        parent, key = self._parent(body, create=False)
        assert self.pattern is not None
        if parent is None or not isinstance(parent.get(key), str):
            return False
        match = self.pattern.search(parent[key])
        if match is None:
            return False
        found = {name: text for name, text in match.groupdict().items() if text is not None}
        body.update(found)  # Fluent Bit adds the groups at the top of the context
        return bool(found)

    def _convert(self, body: Body) -> bool:
        parent, key = self._parent(body, create=False)
        if parent is None or key not in parent:
            return False
        assert self.converted_type is not None
        converted = _convert(parent[key], self.converted_type)
        if converted is _KEEP:
            return False
        parent[key] = converted
        return True

    def process(self, records: list[Record]) -> list[Record]:
        apply = self.apply
        if self.attributes:
            for record in records:
                if record.meta is None:
                    record.meta = {}
                apply(record.meta)
            return records
        for record in records:
            if record.raw is None:
                apply(record.body)
                continue
            # A record still backed by its original bytes: act on a copy and adopt it only when
            # something changed, so unchanged records keep bytes that sinks write as they are.
            changed = _copy_for(self.accessor, record.body)
            if apply(changed):
                record.replace_body(changed)
        return records


def _copy_for(accessor: RecordAccessor, body: Body) -> Body:
    """A copy of ``body`` deep enough along ``accessor``'s path for an action to run on it."""
    top = dict(body)
    node = top
    for part in accessor.path[:-1]:
        child = node.get(part) if isinstance(part, str) else None
        if not isinstance(child, dict):
            break
        node[part] = node = dict(child)  # type: ignore[index]
    return top
