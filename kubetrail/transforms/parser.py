"""The ``parser`` filter: parse one string field of the record with named parsers.

Semantics of Fluent Bit's ``plugins/filter_parser/filter_parser.c``:

* the value of ``key_name`` is parsed when it is a string; the ``parser`` entries are tried in
  the order written and the first that matches wins. A record without the key, with a value
  that is not a string, or that no parser matches, passes unchanged;
* the record becomes what the parser produced. With ``reserve_data on`` the record's other keys
  follow the parsed ones (a key in both keeps the record's own value, the later of the two in
  Fluent Bit's output), and ``preserve_key on`` keeps ``key_name`` among them. Without
  ``reserve_data`` only the parsed keys remain (``preserve_key`` has no effect then, as in
  Fluent Bit's code);
* a time the parser read (its ``time_key``) replaces the record's time; otherwise the record
  keeps its own.

``unescape_key`` is deprecated in Fluent Bit and does nothing there; it is accepted and logged
once. An unknown parser name is a configuration error naming it (Fluent Bit only logs it and
goes on with the parsers it found).
"""

from __future__ import annotations

from typing import Any

from kubetrail.core.component import ComponentContext, Transform
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Record
from kubetrail.parsers.base import Parsed, Parser


class ParserTransform(Transform):
    plugin_name = "parser"
    description = "Parses a field of the record with named parsers (the first that matches)"
    options = (
        Option("key_name", required=True, help="The field to parse"),
        Option("parser", multiple=True, help="Parser name; repeat to try several in order"),
        Option("reserve_data", "bool", False, help="Keep the record's other keys"),
        Option("preserve_key", "bool", False, help="With reserve_data, keep key_name too"),
        Option("unescape_key", "bool", False, help="Deprecated in Fluent Bit; no effect"),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.key: str = config["key_name"]
        if not config["parser"]:
            raise ConfigError("the parser filter needs at least one 'parser'", key="parser")
        self.parsers: list[Parser] = []
        for name in config["parser"]:
            parser = ctx.parsers.get(name.strip())
            if parser is None:
                known = ", ".join(ctx.parsers.names())
                raise ConfigError(f"unknown parser {name.strip()!r}; defined: {known}", key="parser")
            self.parsers.append(parser)
        self.reserve_data: bool = config["reserve_data"]
        self.preserve_key: bool = config["preserve_key"]
        if config["unescape_key"]:
            self.log.info(
                "unescape_key is deprecated in Fluent Bit and has no effect",
                extra={"component": ctx.component_id},
            )

    def _parse(self, value: str) -> Parsed | None:
        for parser in self.parsers:
            parsed = parser.parse_value(value)
            if parsed is not None:
                return parsed
        return None

    def process(self, records: list[Record]) -> list[Record]:
        key = self.key
        reserve, preserve = self.reserve_data, self.preserve_key
        for record in records:
            body = record.body
            value = body.get(key)
            if not isinstance(value, str):
                continue
            parsed = self._parse(value)
            if parsed is None:
                continue
            new, time_ns = parsed
            if reserve:
                for name, original in body.items():
                    if name != key or preserve:
                        new[name] = original
            record.replace_body(new)
            if time_ns:  # Fluent Bit: a parsed time of zero means "none", the record keeps its own
                record.time_ns = time_ns
        return records
