"""Declared plugin options and their validation.

Each plugin lists its options once (name, type, default, help). The same list validates a
config section (unknown key or bad value -> :class:`ConfigError` with file, line, key and what is
allowed), fills in defaults, and prints ``kubetrail plugins``. Keys are case-insensitive and may
contain dots (``tls.verify``, ``storage.type``) as in Fluent Bit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kubetrail.core import secrets
from kubetrail.core.errors import ConfigError, Location
from kubetrail.core.values import parse_bool, parse_duration, parse_size, split_list

OptionKind = Literal["str", "int", "float", "bool", "size", "duration", "list", "choice", "regex"]


@dataclass(frozen=True)
class Option:
    name: str
    kind: OptionKind = "str"
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] = ()
    multiple: bool = False  # the key may repeat; the value is a list of parsed items
    required: bool = False
    # A family of keys, Fluent Bit's ``rdkafka.<property>``: the name ends with ``.*`` and every
    # key starting with what comes before the ``*`` belongs to it; the value is a dict of
    # ``suffix -> text`` (passed through to a library, which validates them itself).
    prefix: bool = False
    # A credential: the value may name files, ``${file:/path}``, read again when they rotate
    # (kubetrail.core.secrets); the plugin then reads it with ``secrets.reveal``.
    secret: bool = False

    def describe_allowed(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        return {
            "str": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "on/off, true/false or yes/no",
            "size": "a size such as 32k, 5M or 1G",
            "duration": "a duration such as 30, 10s, 10m or 1h",
            "list": "a comma-separated list",
            "regex": "a regular expression",
        }[self.kind]

    def parse(self, text: str) -> Any:
        kind = self.kind
        if kind == "str":
            return text
        if kind == "int":
            return int(text.strip())
        if kind == "float":
            return float(text.strip())
        if kind == "bool":
            return parse_bool(text)
        if kind == "size":
            return parse_size(text)
        if kind == "duration":
            return parse_duration(text)
        if kind == "list":
            return split_list(text)
        if kind == "choice":
            word = text.strip().lower()
            if word not in self.choices:
                raise ValueError(f"got {text!r}")
            return word
        if kind == "regex":
            return re.compile(ruby_to_python_regex(text))
        raise AssertionError(kind)


_SECRET_SUFFIXES = ("passwd", "password", "shared_key", "token", "api_key", "secret", "secret_key", "users")
_SECRET_HEADERS = re.compile(r"^\s*(authorization|proxy-authorization|x-api-key|api-key|[\w-]*token)\b", re.I)
REDACTED = "<redacted>"


def shown_value(name: str, value: Any) -> Any:
    """An option's value as ``kubetrail check`` and logs may show it: credentials written inline
    in a config (``http_passwd``, ``shared_key``, ``splunk_token``, ``security.users``, an
    ``Authorization`` header) are redacted; files holding them (``*_file``, ``${file:...}``) are shown."""
    if isinstance(value, secrets.Secret):
        return value.text
    if isinstance(value, list) and secrets.secrets_in(value):  # some items from files, some inline
        inline = shown_value(name, [v for v in value if not isinstance(v, secrets.Secret)])
        rest = iter(inline) if isinstance(inline, list) else iter([inline] * len(value))
        return [item.text if isinstance(item, secrets.Secret) else next(rest) for item in value]
    if (name.endswith(_SECRET_SUFFIXES) or "password" in name) and isinstance(value, str | list) and value:
        return REDACTED
    if isinstance(value, dict) and name.endswith(".*"):  # a prefix family (rdkafka.sasl.password)
        return {key: shown_value(key, item) for key, item in value.items()}
    if name == "header" and isinstance(value, list):
        return [REDACTED if isinstance(v, str) and _SECRET_HEADERS.match(v) else v for v in value]
    return value


@dataclass(frozen=True)
class Property:
    """One ``key value`` line of a config section."""

    name: str  # lower-cased
    value: str
    location: Location


@dataclass
class Section:
    """A config section: ``[INPUT]`` or an item of ``pipeline.inputs`` in YAML."""

    kind: str  # service, input, filter, output, parser, multiline_parser
    location: Location
    properties: list[Property] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        for prop in self.properties:
            if prop.name == name:
                return prop.value
        return None

    def get_all(self, name: str) -> list[Property]:
        return [prop for prop in self.properties if prop.name == name]

    @property
    def plugin_name(self) -> str:
        return (self.get("name") or "").strip().lower()

    def location_of(self, name: str) -> Location:
        for prop in self.properties:
            if prop.name == name:
                return prop.location
        return self.location


def resolve_options(
    section: Section,
    options: Iterable[Option],
    label: str,
    ignore: Iterable[str] = ("name",),
) -> dict[str, Any]:
    """Validate a section against declared options; return option name -> parsed value."""
    declared = {opt.name: opt for opt in options}
    skip = set(ignore)
    values: dict[str, Any] = {}
    for prop in section.properties:
        if prop.name in skip:
            continue
        opt = declared.get(prop.name)
        if opt is None:
            family = next((o for o in declared.values() if o.prefix and prop.name.startswith(o.name[:-1])), None)
            if family is not None and len(prop.name) > len(family.name) - 1:
                text = _credential(prop, family, declared.values(), label)
                values.setdefault(family.name, {})[prop.name[len(family.name) - 1 :]] = text
                continue
            allowed = ", ".join(sorted(declared))
            raise ConfigError(f"unknown property for {label}; allowed: {allowed}", prop.location, prop.name)
        try:
            if secrets.has_reference(prop.value):
                parsed = _credential(prop, opt, declared.values(), label)
            else:
                parsed = opt.parse(prop.value)
        except (ValueError, re.error) as exc:
            raise ConfigError(
                f"bad value {prop.value!r} ({exc}); expected {opt.describe_allowed()}", prop.location, prop.name
            ) from None
        if opt.multiple:
            values.setdefault(opt.name, []).append(parsed)
        elif opt.name in values:
            raise ConfigError(f"set twice in {label}", prop.location, prop.name)
        else:
            values[opt.name] = parsed
    for opt in declared.values():
        if opt.name in values:
            continue
        if opt.required:
            raise ConfigError(f"required property missing in {label}", section.location, opt.name)
        values[opt.name] = [] if opt.multiple else {} if opt.prefix else opt.default
    return values


def _credential(prop: Property, opt: Option, options: Iterable[Option], label: str) -> secrets.Text:
    """A string option's value; ``${file:...}`` read once here (a bad file stops the start, naming
    the option and the path) and only in credential options."""
    if not secrets.has_reference(prop.value):
        return prop.value
    if not opt.secret:
        allowed = ", ".join(sorted(o.name for o in options if o.secret)) or "none"
        raise ConfigError(
            f"${{file:...}} (a credential file) is allowed only in credential options; those of {label}: {allowed}",
            prop.location,
            prop.name,
        )
    try:
        return secrets.parse_secret(prop.value, prop.name)
    except secrets.SecretFileError as exc:
        raise ConfigError(f"credential file: {exc}", prop.location, prop.name) from None


_NAMED_GROUP = re.compile(r"\(\?<([A-Za-z_][A-Za-z0-9_]*)>")


def ruby_to_python_regex(pattern: str) -> str:
    """Fluent Bit (Onigmo) named groups ``(?<name>...)`` -> Python ``(?P<name>...)``.

    Fluent Bit also accepts a pattern wrapped in slashes (``/^foo$/``); the slashes go.
    """
    text = pattern.strip()
    if len(text) >= 2 and text.startswith("/") and text.endswith("/"):
        text = text[1:-1]
    return _NAMED_GROUP.sub(r"(?P<\1>", text)


def validate_with(
    values: Mapping[str, Any], name: str, check: Callable[[Any], bool], message: str, section: Section
) -> None:
    """Cross-field checks a single option cannot express (e.g. a value that must be positive)."""
    if not check(values.get(name)):
        raise ConfigError(message, section.location_of(name), name)
