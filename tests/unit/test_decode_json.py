"""``kubetrail.core.record.decode_json`` / ``decode_body``: orjson's reading of a JSON document,
except what msgspec (which validates the lines) takes and orjson refuses: a number beyond a
double is kept as its text, so no filter, redaction, rule or sink fails on it."""

from __future__ import annotations

import pytest

from kubetrail.core.record import Record, decode_body, decode_json


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"a":1,"b":[1.5,"x",null,true]}', {"a": 1, "b": [1.5, "x", None, True]}),  # orjson's own
        (b'{"a":1e999,"b":-1E+999,"c":[2e400]}', {"a": "1e999", "b": "-1E+999", "c": ["2e400"]}),
        (b'{"a":1' + b"0" * 30 + b"}", {"a": 1e30}),  # beyond 64 bits, within a double: as orjson
        (b'{"a":1' + b"0" * 400 + b"}", {"a": "1" + "0" * 400}),  # beyond a double: its text
        (b'{"a":18446744073709551615,"b":-9223372036854775808}', {"a": 2**64 - 1, "b": -(2**63)}),
        (b'{"a":1e999,"s":"caf\\u00e9 \\ud83d\\ude00"}', {"a": "1e999", "s": "caf\u00e9 \U0001f600"}),
    ],
)
def test_decode_json(raw: bytes, expected: object) -> None:
    assert decode_json(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":NaN,"b":1e999}',  # Python's json reads NaN; JSON does not
        b'{"a":Infinity}',
        b'{"a":"\\ud800","b":1e999}',  # a lone surrogate: orjson neither reads nor writes it
        b'{"a":"\xff","b":1e999}',
        b'{"a":' + b"[" * 1100 + b"]" * 1100 + b"}",  # deeper than either reads
        b"not json",
    ],
)
def test_what_orjson_refuses_otherwise_is_still_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        decode_json(raw)
    assert decode_body(raw) == {"log": raw.decode("utf-8", "replace")}  # kept as text, not an error


def test_a_body_that_is_not_an_object_is_its_text() -> None:
    assert decode_body(b"[1,2]") == {"log": "[1,2]"}
    assert Record("t", 1, None, b'{"n":1e999}').body == {"n": "1e999"}
