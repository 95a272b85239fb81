"""The duplicate-key check: a key counted twice in one object is found, whichever way the JSON is written.

`duplicate_key` answers most bodies from two counts (the text's `":`, and those of orjson writing back what it
kept) and falls back to the standard parser's pairs hook to name the path; here it must agree with that exact
walk on JSON written every which way: escaped keys that unescape to the same name, quotes and colons inside
strings (plain or as `\\u` escapes), backslashes before a closing quote, spaces before colons, duplicates at
any depth.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingress.checks import duplicate_key, first_duplicate_key
from tests.fixtures.tddui import make_bundle

# Few distinct names, so objects often repeat one; text with the characters that could fool a text scan.
NAMES = st.sampled_from(["a", "b", "id", ":", '":', "\\", 'x"', "é"])
TEXT = st.text(alphabet=st.sampled_from(['a', '"', ':', '\\', ' ', ',', '{', '}', 'é', '\n']), max_size=8)
SPACE = st.sampled_from(["", " ", "\n  ", "\t"])


def _string(draw: st.DrawFn, text: str) -> str:
    """`text` as a JSON string, each character written plainly or as `\\uXXXX` (either case) at random:
    `\\u0061` is `a`, `\\u0022` a quote, `\\u003A` a colon."""
    out = []
    for ch in text:
        how = draw(st.sampled_from(["plain", "lower", "upper"]))
        out.append(json.dumps(ch)[1:-1] if how == "plain" else f"\\u{ord(ch):04x}" if how == "lower"
                   else f"\\u{ord(ch):04X}")
    return '"' + "".join(out) + '"'


@st.composite
def json_text(draw: st.DrawFn, depth: int = 0) -> str:
    kind = draw(st.sampled_from(["object", "array", "string", "number"] if depth < 4 else ["string", "number"]))
    if kind == "string":
        return _string(draw, draw(TEXT))
    if kind == "number":
        return str(draw(st.integers(-5, 5)))
    if kind == "array":
        items = draw(st.lists(json_text(depth + 1), max_size=3))
        return "[" + ",".join(draw(SPACE) + i for i in items) + "]"
    pairs = draw(st.lists(st.tuples(NAMES, json_text(depth + 1)), max_size=4))
    return "{" + ",".join(f"{draw(SPACE)}{_string(draw, k)}{draw(SPACE)}:{draw(SPACE)}{v}" for k, v in pairs) + "}"


@settings(max_examples=600, deadline=None)
@given(json_text())
def test_the_counted_check_agrees_with_the_exact_walk(text: str) -> None:
    body = text.encode()
    tree = orjson.loads(body)
    assert duplicate_key(body, tree) == first_duplicate_key(body)


def test_a_duplicate_deep_in_a_real_bundle_is_named_with_its_path() -> None:
    bundle = make_bundle(30, seed=3)
    body = orjson.dumps(bundle)
    assert duplicate_key(body, bundle) is None
    patient: dict[str, Any] = bundle["entry"][0]["resource"]
    first = next(iter(patient))
    forged = body.replace(orjson.dumps(patient)[1:-1],
                          orjson.dumps(patient)[1:-1] + b"," + orjson.dumps({first: patient[first]})[1:-1], 1)
    assert duplicate_key(forged, orjson.loads(forged)) == f"Bundle.entry[0].resource.{first}"


def test_an_escaped_key_equal_to_another_is_a_duplicate() -> None:
    body = b'{"resourceType":"Bundle","\\u0074ype":"transaction","type":"batch"}'
    assert duplicate_key(body, orjson.loads(body)) == "Bundle.type"


@pytest.mark.parametrize("text", ['"\\u0022:"', '"\\"\\u003a"', '"\\"\\u003A"', '" \\u0022:"'])
def test_a_quote_or_colon_written_as_an_escape_cannot_hide_a_repeat(text: str) -> None:
    # Parsed and written back, the string holds one more quote-colon than the text shows: as many as the key
    # dropped, so the counts alone would match.
    body = b'{"resourceType":"Bundle","type":"transaction","type":"batch","note":' + text.encode() + b"}"
    assert duplicate_key(body, orjson.loads(body)) == "Bundle.type"
