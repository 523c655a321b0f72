"""``decode_field`` / ``decode_field_as``: Fluent Bit's field decoders, run after any parser.

A ``[PARSER]`` may list ``Decode_Field DECODER FIELD [ACTION]`` and ``Decode_Field_As DECODER
FIELD [ACTION]``. The decoders are ``json`` (a string holding a JSON object), ``escaped``
(backslash escapes such as ``\\n`` and ``\\"``) and ``escaped_utf8`` (``\\uXXXX``, ``\\xHH``, octal
and the C escapes as UTF-8). The semantics follow Fluent Bit's ``flb_parser_decoder.c``:

* the rules of one field run in the order written; a rule's ``ACTION`` decides what follows:
  none stops after the rule (whether it worked or not), ``try_next`` goes on only when the rule
  failed, ``do_next`` goes on either way;
* ``decode_field_as`` replaces the field's value and the next rule works on the new value; once
  the value became an object (``json``), no later rule touches it;
* ``decode_field`` leaves the field as it is and adds the keys of the decoded object at the end
  of the record (only ``json`` gives an object; a string result is refused there, as Fluent
  Bit logs ``string type is not allowed``); at most one ``decode_field`` per field succeeds.

One deliberate difference: Fluent Bit writes a ``\\uD83D\\uDE00`` surrogate pair as two invalid
3-byte sequences; here a pair becomes the one character it encodes and a lone surrogate
becomes U+FFFD, since the record must stay valid UTF-8 for every output.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

BACKENDS = ("json", "escaped", "escaped_utf8")
ACTIONS = ("try_next", "do_next")


@dataclass(frozen=True)
class DecodeRule:
    backend: str  # json, escaped, escaped_utf8
    as_value: bool  # decode_field_as (replace the value) or decode_field (add the keys)
    action: str | None  # None, try_next or do_next


@dataclass
class FieldDecoders:
    """The rules for every decoded field, in the order the fields were first named."""

    rules: dict[str, list[DecodeRule]] = field(default_factory=dict)

    def add(self, text: str, as_value: bool) -> None:
        """One ``decode_field[_as]`` value; ``ValueError`` says what is wrong with it."""
        parts = text.split()
        if len(parts) < 2:
            raise ValueError(f"expected 'DECODER FIELD [ACTION]', got {text!r}")
        backend = parts[0].lower()
        if backend not in BACKENDS:
            raise ValueError(f"unknown decoder {parts[0]!r}; allowed: {', '.join(BACKENDS)}")
        action = parts[2].lower() if len(parts) > 2 else None
        if action is not None and action not in ACTIONS:
            # Fluent Bit silently treats any other word as no action; a typo here would change
            # what gets decoded, so it is refused instead.
            raise ValueError(f"unknown action {parts[2]!r}; allowed: {', '.join(ACTIONS)}")
        self.rules.setdefault(parts[1], []).append(DecodeRule(backend, as_value, action))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def apply(self, body: dict[str, Any]) -> None:
        """Decode the fields of ``body`` in place."""
        extra: dict[str, Any] = {}
        for key, rules in self.rules.items():
            value = body.get(key)
            if not isinstance(value, str):
                continue  # Fluent Bit decodes string values only
            replaced, added = _run(rules, value)
            if replaced is not None:
                body[key] = replaced
            if added is not None:
                extra.update(added)
        if extra:
            # Appended after the record's own keys: a key of both ends with the decoded value,
            # as the later of two equal keys wins in every Fluent Bit output.
            body.update(extra)


def _run(rules: list[DecodeRule], original: str) -> tuple[Any, dict[str, Any] | None]:
    """(new value or None, keys to add or None) for one field."""
    data: Any = original
    replaced: Any = None
    added: dict[str, Any] | None = None
    for rule in rules:
        if not rule.as_value and rule.action == "do_next" and added is not None:
            continue
        if replaced is not None and not isinstance(replaced, str):
            continue  # already an object: nothing left to decode
        result = _decode(rule.backend, data)
        if result is None:
            if rule.action in ACTIONS:
                continue
            break
        if rule.as_value:
            replaced = data = result
        elif isinstance(result, dict):
            added = result
        if rule.action == "do_next":
            continue
        break
    return replaced, added


def _decode(backend: str, text: str) -> Any:
    if backend == "escaped":
        return unescape(text)
    if backend == "escaped_utf8":
        return unescape_utf8(text)
    unescaped = unescape(text)
    if not unescaped.startswith("{"):  # Fluent Bit: "it must be a map"
        return None
    try:
        value = orjson.loads(unescaped)
    except orjson.JSONDecodeError:
        # The unescaping turned "\n" inside the JSON's strings into real line breaks; Fluent
        # Bit's JSON reader takes those, so a lenient parse is the second try.
        try:
            value = json.loads(unescaped, strict=False)
        except (ValueError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


_SIMPLE = {"n": "\n", "a": "\a", "b": "\b", "t": "\t", "v": "\v", "f": "\f", "r": "\r"}
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)


def unescape(text: str) -> str:
    """Fluent Bit's ``escaped`` decoder: the C escapes ``\\n \\t \\r \\a \\b \\f \\v`` become their
    characters and a backslash before any other character is dropped (``\\"`` -> ``"``)."""
    if "\\" not in text:
        return text
    return _ESCAPED.sub(lambda m: _SIMPLE.get(m.group(1), m.group(1)), text)


_UTF8_ESCAPE = re.compile(
    r"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|u([0-9A-Fa-f]{1,4})|U([0-9A-Fa-f]{1,8})|(.))", re.DOTALL
)
_JSON_ESCAPES = "\"'\\/"


def unescape_utf8(text: str, quotes: bool = False) -> str:
    """Fluent Bit's ``escaped_utf8`` decoder: ``\\uXXXX``, ``\\UXXXXXXXX``, ``\\xHH``, octal and the
    C escapes become characters. A backslash before ``" ' \\ /`` stays as it is (the ``escaped``
    decoder, usually run next with ``do_next``, removes those), unless ``quotes`` (logfmt's
    quoted values): then ``\\"`` is ``"`` and ``\\\\`` is one backslash."""
    if "\\" not in text:
        return text
    out: list[str] = []
    position = 0
    while True:
        start = text.find("\\", position)
        if start < 0:
            out.append(text[position:])
            break
        out.append(text[position:start])
        if start + 1 < len(text) and text[start + 1] in _JSON_ESCAPES:
            if quotes:
                out.append(text[start + 1])
                position = start + 2
                continue
            out.append("\\")  # kept; the character after it is read as an ordinary one
            position = start + 1
            continue
        match = _UTF8_ESCAPE.match(text, start)
        if match is None:  # a backslash at the very end
            out.append("\\")
            break
        octal, hex2, hex4, hex8, other = match.groups()
        if octal is not None:
            out.append(_char(int(octal, 8)))
        elif hex2 is not None:
            out.append(_char(int(hex2, 16)))
        elif hex4 is not None:
            out.append(_char(int(hex4, 16)))
        elif hex8 is not None:
            out.append(_char(int(hex8, 16)))
        else:
            out.append(_SIMPLE.get(other, other))  # \\q -> q, and \\x without digits -> x
        position = match.end()
    return _join_surrogates("".join(out))


def _char(code: int) -> str:
    return chr(code) if code < 0x110000 else "\ufffd"


_SURROGATES = re.compile("[\ud800-\udbff][\udc00-\udfff]|[\ud800-\udfff]")


def _join_surrogates(text: str) -> str:
    def joined(match: re.Match[str]) -> str:
        pair = match.group(0)
        if len(pair) == 2:
            return chr(0x10000 + ((ord(pair[0]) - 0xD800) << 10) + (ord(pair[1]) - 0xDC00))
        return "\ufffd"

    return _SURROGATES.sub(joined, text)
