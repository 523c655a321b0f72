"""The ``nest`` filter: move keys into a map (``nest``) or a map's keys up a level (``lift``).

Semantics of Fluent Bit's ``plugins/filter_nest/nest.c``:

* ``nest``: the top-level keys matching any ``wildcard`` move, in their order, into a new map
  under ``nest_under``, which goes after the keys that stayed. A wildcard ending in ``*``
  matches keys starting with what comes before it (``*`` alone matches every key); any other
  wildcard matches one key exactly (a ``*`` inside it is literal). No matching key: the record
  is not touched (no empty map is added).
* ``lift``: the keys of the map under ``nested_under`` come up to the top level, after the
  keys that stayed, and the map goes. A value there that is not a map is left alone.
* ``add_prefix`` / ``remove_prefix`` (exclusive) apply to the keys that moved: prepended, or
  removed from keys starting with it.

Fluent Bit writes the new record without looking for clashes, so a record can hold one key
twice and the later one is what every output (JSON) shows; here the later one replaces the
earlier one, keeping where the key first was. Fluent Bit reads ``nest_under`` and
``nested_under`` into the same setting, so either works with either operation here too; it
also accepts the old name ``prefix_with`` for ``add_prefix``.

Records parsed lazily (``Record.raw``) are decoded only to look for matching keys; a record
that does not change keeps its original bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubetrail.core.component import ComponentContext, Transform
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Record

Body = dict[str, Any]


def wildcard_matcher(patterns: list[str]) -> Callable[[str], bool]:
    """Fluent Bit's wildcard: a trailing ``*`` makes a prefix match, anything else is exact."""
    exact = {p for p in patterns if not p.endswith("*")}
    prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))

    def matches(key: str) -> bool:
        return key in exact or (bool(prefixes) and key.startswith(prefixes))

    return matches


class NestTransform(Transform):
    plugin_name = "nest"
    description = "Nests keys matching wildcards under a new map, or lifts a map's keys to the top level"
    options = (
        Option("operation", "choice", None, choices=("nest", "lift"), required=True, help="nest or lift"),
        Option("wildcard", multiple=True, help="Keys to nest: exact, or a prefix ending in * (repeatable)"),
        Option("nest_under", help="nest: the map to move the matching keys into"),
        Option("nested_under", help="lift: the map whose keys move to the top level"),
        Option("add_prefix", help="Prepended to the keys that move"),
        Option("prefix_with", help="Old name of add_prefix"),
        Option("remove_prefix", help="Removed from the start of the keys that move"),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.operation: str = config["operation"]
        add = config["add_prefix"] if config["add_prefix"] is not None else config["prefix_with"]
        remove = config["remove_prefix"]
        if add is not None and remove is not None:
            raise ConfigError("add_prefix and remove_prefix are exclusive", key="remove_prefix")
        for name, value in (("add_prefix", add), ("remove_prefix", remove)):
            if value is not None and not value:
                raise ConfigError("needs a prefix", key=name)
        self.add_prefix: str | None = add
        self.remove_prefix: str | None = remove
        if self.operation == "nest":
            key = config["nest_under"] or config["nested_under"]
            if not key:
                raise ConfigError("operation nest needs nest_under (the map to nest into)", key="nest_under")
            if not config["wildcard"]:
                raise ConfigError("operation nest needs at least one wildcard (the keys to nest)", key="wildcard")
        else:
            key = config["nested_under"] or config["nest_under"]
            if not key:
                raise ConfigError("operation lift needs nested_under (the map to lift)", key="nested_under")
            if config["wildcard"]:
                self.log.info("wildcard has no effect with operation lift", extra={"component": ctx.component_id})
        self.key: str = key
        self.matches = wildcard_matcher([w.strip() for w in config["wildcard"]])

    def _rename(self, key: str) -> str:
        if self.add_prefix is not None:
            return self.add_prefix + key
        if self.remove_prefix is not None and key.startswith(self.remove_prefix):
            return key[len(self.remove_prefix) :]
        return key

    def _nest(self, body: Body) -> Body | None:
        matches = self.matches
        if not any(matches(key) for key in body):
            return None
        kept: Body = {}
        nested: Body = {}
        rename = self._rename
        for key, value in body.items():
            if matches(key):
                nested[rename(key)] = value
            else:
                kept[key] = value
        kept.pop(self.key, None)  # the new map comes last; a key of the same name was earlier
        kept[self.key] = nested
        return kept

    def _lift(self, body: Body) -> Body | None:
        inner = body.get(self.key)
        if not isinstance(inner, dict):
            # Missing, or not a map (Fluent Bit logs "Value of key ... is not a map").
            return None
        out = {key: value for key, value in body.items() if key != self.key}
        rename = self._rename
        for key, value in inner.items():
            out[rename(key)] = value
        return out

    def process(self, records: list[Record]) -> list[Record]:
        change = self._nest if self.operation == "nest" else self._lift
        for record in records:
            new = change(record.body)
            if new is not None:
                record.replace_body(new)
        return records
