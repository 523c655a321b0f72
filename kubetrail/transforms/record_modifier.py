"""The ``record_modifier`` filter: append fixed keys, remove keys or keep only some, add a UUID.

Semantics of Fluent Bit's ``plugins/filter_record_modifier/filter_modifier.c``:

* ``remove_key`` drops matching keys; ``allowlist_key`` (old name ``whitelist_key``) keeps only
  matching keys. The two are exclusive. Matching ignores case, and a name ending in ``*``
  matches every key starting with what comes before it.
* ``record KEY VALUE`` (repeatable) then appends ``KEY: VALUE`` (a string) after the remaining
  keys, in the order written, whether the key exists or not. Fluent Bit then holds the key
  twice and every output shows the later value; here the value is replaced in place.
* ``uuid_key KEY`` appends a random UUID (version 4) under ``KEY``.
* A record whose keys were all removed (an allowlist matching none of them, with no
  ``record``) is dropped, as Fluent Bit writes nothing for it; it is counted as filtered.

A record needing no change keeps its original bytes (lazy ``Record.raw``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from kubetrail.core.component import ComponentContext, Transform
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Record


def key_matcher(patterns: list[str]) -> Callable[[str], bool]:
    """Case-insensitive names, ``prefix*`` for every key starting with ``prefix``."""
    exact = {p.lower() for p in patterns if not p.endswith("*")}
    prefixes = tuple(p[:-1].lower() for p in patterns if p.endswith("*"))

    def matches(key: str) -> bool:
        lowered = key.lower()
        return lowered in exact or (bool(prefixes) and lowered.startswith(prefixes))

    return matches


class RecordModifierTransform(Transform):
    plugin_name = "record_modifier"
    description = "Appends fixed keys, removes keys or keeps only listed ones, adds a UUID"
    options = (
        Option("record", multiple=True, help="KEY VALUE: append this key (repeatable)"),
        Option("remove_key", multiple=True, help="Key to remove; prefix* for many (repeatable)"),
        Option("allowlist_key", multiple=True, help="Key to keep, all others go; prefix* for many (repeatable)"),
        Option("whitelist_key", multiple=True, help="Old name of allowlist_key"),
        Option("uuid_key", help="Append a random UUID under this key"),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.records: list[tuple[str, str]] = []
        for text in config["record"]:
            key, _, value = text.strip().partition(" ")
            if not key or not value.strip():
                raise ConfigError(f"expected 'KEY VALUE', got {text!r}", key="record")
            self.records.append((key, value.strip()))
        remove = [k.strip() for k in config["remove_key"] if k.strip()]
        allow = [k.strip() for k in (*config["allowlist_key"], *config["whitelist_key"]) if k.strip()]
        if remove and allow:
            raise ConfigError("remove_key and allowlist_key are exclusive", key="allowlist_key")
        self.remove = key_matcher(remove) if remove else None
        self.allow = key_matcher(allow) if allow else None
        self.uuid_key: str | None = config["uuid_key"]
        if not (self.records or remove or allow or self.uuid_key):
            raise ConfigError("record_modifier needs record, remove_key, allowlist_key or uuid_key", key="record")

    def process(self, records: list[Record]) -> list[Record]:
        remove, allow, added, uuid_key = self.remove, self.allow, self.records, self.uuid_key
        out: list[Record] = []
        append = out.append
        for record in records:
            body = record.body
            if remove is not None and any(remove(key) for key in body):
                body = {key: value for key, value in body.items() if not remove(key)}
            elif allow is not None and not all(allow(key) for key in body):
                body = {key: value for key, value in body.items() if allow(key)}
            if added or uuid_key:
                if body is record.body_:
                    body = dict(body)
                for key, value in added:
                    body[key] = value
                if uuid_key:
                    body[uuid_key] = str(uuid.uuid4())
            if body is not record.body_:
                if not body:
                    continue  # every key removed: Fluent Bit writes nothing for the record
                record.replace_body(body)
            append(record)
        return out
