"""JSON Schema to regex (structured_output/json_schema.py): instances match, non-instances do not, and every
string a random walk of the compiled DFA accepts parses as JSON and satisfies the schema."""

from __future__ import annotations

import json
import math
import random
import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from pagoda_engine.sampling_params import InvalidRequestError
from pagoda_engine.structured_output.dfa import Dfa
from pagoda_engine.structured_output.json_schema import (
    MAX_DIGITS,
    MAX_RECURSION,
    choice_regex,
    integer_range,
    json_object_regex,
    schema_to_regex,
)
from pagoda_engine.structured_output.regex import compile_regex


def compile_schema(schema: Any) -> Dfa:
    return compile_regex(schema_to_regex(json.dumps(schema)))


def matches(dfa: Dfa, text: str) -> bool:
    state = dfa.walk(0, text.encode())
    return state >= 0 and bool(dfa.accepting[state])


def random_match(dfa: Dfa, rng: random.Random, stop_chance: float = 0.3, max_bytes: int = 2000) -> str:
    """A random string the DFA accepts: each step stops where it may, or takes a random live byte. The DFA is
    trimmed, so every live state can still reach acceptance; past ``max_bytes`` the walk heads for the
    nearest accepting state."""
    data = bytearray()
    state = 0
    while True:
        if dfa.accepting[state] and (rng.random() < stop_chance or len(data) > max_bytes):
            return data.decode()
        live = [byte for byte in range(256) if dfa.transitions[state, byte] >= 0]
        if not live:
            return data.decode()
        byte = rng.choice(live) if len(data) <= max_bytes else _toward_acceptance(dfa, state)
        data.append(byte)
        state = int(dfa.transitions[state, byte])


def _toward_acceptance(dfa: Dfa, state: int) -> int:
    """The first byte of a shortest path from ``state`` to an accepting state (breadth first)."""
    frontier = [(state, None)]
    seen = {state}
    while frontier:
        next_frontier = []
        for current, first in frontier:
            for byte in range(256):
                target = int(dfa.transitions[current, byte])
                if target < 0 or target in seen:
                    continue
                if dfa.accepting[target]:
                    return byte if first is None else first
                seen.add(target)
                next_frontier.append((target, byte if first is None else first))
        frontier = next_frontier
    raise AssertionError("a trimmed DFA state must reach acceptance")


def check_walks(schema: Any, valid: Callable[[Any], bool], walks: int = 60) -> None:
    dfa = compile_schema(schema)
    rng = random.Random(0)
    for _ in range(walks):
        text = random_match(dfa, rng)
        value = json.loads(text)
        assert valid(value), text


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"enum": ["a", "b", 3, None]}, "maxItems": 2},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age"],
}


def is_person(value: Any) -> bool:
    return (isinstance(value, dict) and list(value) == [k for k in PERSON["properties"] if k in value]
            and {"name", "age"} <= set(value) and isinstance(value["name"], str) and 1 <= len(value["name"]) <= 8
            and type(value["age"]) is int and 0 <= value["age"] <= 130
            and (("tags" not in value) or (len(value["tags"]) <= 2 and all(t in ("a", "b", 3, None)
                                                                           for t in value["tags"])))
            and (("active" not in value) or isinstance(value["active"], bool)))


def test_object_instances_match_and_others_do_not():
    dfa = compile_schema(PERSON)
    for text in ('{"name":"Al","age":3}', '{"name": "Al", "age": 130, "active": true}',
                 '{ "name":"Zoë","age":0,"tags":["a",3],"active":false }', '{"name":"\\u00e9\\n","age":7}'):
        assert matches(dfa, text), text
    for text in ('{"age":3}', '{"name":"","age":3}', '{"name":"Al","age":131}', '{"name":"Al","age":-1}',
                 '{"age":3,"name":"Al"}', '{"name":"Al","age":3,}', '{"name":"Al","age":3,"x":1}',
                 '{"name":"Al","age":03}', '{"name":"Al","age":3,"tags":["a","b","a"]}',
                 '{"name":"Al",  "age":3}', '{"name" :"Al","age":3}', '{"name":"Al" ,"age":3}',
                 '{"name":"123456789","age":3}', '{"name":"a"b","age":3}'):
        assert not matches(dfa, text), text


def test_random_walks_are_instances():
    check_walks(PERSON, is_person)


def test_optional_members_take_commas_in_every_combination():
    schema = {"type": "object", "properties": {name: {"type": "integer"} for name in "abcd"}}
    dfa = compile_schema(schema)
    for mask in range(16):
        members = [f'"{name}":1' for i, name in enumerate("abcd") if mask >> i & 1]
        assert matches(dfa, "{" + ",".join(members) + "}"), members
    assert not matches(dfa, '{,"a":1}') and not matches(dfa, '{"a":1,,"b":1}')
    required = {**schema, "required": ["c"]}
    dfa = compile_schema(required)
    assert matches(dfa, '{"a":1,"c":1}') and matches(dfa, '{"c":1,"d":1}') and not matches(dfa, '{"a":1,"b":1}')
    check_walks(required, lambda v: "c" in v and set(v) <= set("abcd"))


@pytest.mark.parametrize(("low", "high"), [(0, 250), (-30, 17), (5, 15), (None, 10), (-5, None), (None, -3),
                                           (100, None), (0, None), (7, 7), (-1000, -999), (1, 999)])
def test_integer_ranges_are_exact(low, high):
    dfa = compile_regex(integer_range(low, high))
    for n in range(-1200, 1201):
        assert matches(dfa, str(n)) == ((low is None or n >= low) and (high is None or n <= high)), n
    assert not matches(dfa, "-0") and not matches(dfa, "01")


def test_integer_bound_keywords():
    assert matches(compile_schema({"type": "integer", "exclusiveMinimum": 0}), "1")
    assert not matches(compile_schema({"type": "integer", "exclusiveMinimum": 0}), "0")
    assert not matches(compile_schema({"type": "integer", "maximum": 9, "exclusiveMaximum": True}), "9")
    dfa = compile_schema({"type": "integer", "minimum": 1.5, "maximum": 3.5})
    assert [n for n in range(-5, 6) if matches(dfa, str(n))] == [2, 3]


NUMBER_TEXTS = [f"{sign}{whole}{fraction}" for sign in ("", "-") for whole in range(0, 13)
                for fraction in ("", ".0", ".00", ".5", ".05", ".999")] + ["1e2", "-0e1", "01", "1.", "+1"]


@pytest.mark.parametrize("bounds", [
    {"minimum": 0, "maximum": 1}, {"exclusiveMinimum": 0}, {"maximum": 10, "exclusiveMaximum": True},
    {"minimum": -5, "exclusiveMaximum": 3}, {"exclusiveMinimum": -2, "maximum": -1}, {"maximum": 0},
    {"exclusiveMaximum": 0}, {"minimum": 2, "maximum": 2}, {"minimum": -12, "exclusiveMinimum": -7},
])
def test_number_bounds_are_exact_at_integers(bounds):
    dfa = compile_schema({"type": "number", **bounds})
    low = max([bounds[k] for k in ("minimum", "exclusiveMinimum") if k in bounds], default=-math.inf)
    high = min([bounds[k] for k in ("maximum", "exclusiveMaximum") if type(bounds.get(k)) is int], default=math.inf)
    low_open = "exclusiveMinimum" in bounds and bounds["exclusiveMinimum"] == low
    high_open = bounds.get("exclusiveMaximum") is True or ("exclusiveMaximum" in bounds and
                                                          bounds["exclusiveMaximum"] == high)
    for text in NUMBER_TEXTS:
        plain = re.fullmatch(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?", text) is not None  # bounded: no exponent
        value = float(text) if plain else math.nan
        inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        assert matches(dfa, text) == (plain and inside and not (text.startswith("-") and value == 0)), text


def test_number_bounds_between_integers_move_inward():
    dfa = compile_schema({"type": "number", "minimum": 0.5, "maximum": 2.5})
    assert matches(dfa, "1") and matches(dfa, "2.0") and not matches(dfa, "0.75") and not matches(dfa, "2.25")
    with pytest.raises(InvalidRequestError, match="no number"):
        compile_schema({"type": "number", "minimum": 0.2, "maximum": 0.8})


def test_numbers_and_scalars():
    number = compile_schema({"type": "number"})
    for text in ("0", "-1.5", "3e10", "2.50E-3", "-0.0"):
        assert matches(number, text), text
    for text in ("01", "1.", ".5", "+1", "1e", "NaN"):
        assert not matches(number, text), text
    assert not matches(compile_schema({"type": "number", "minimum": 0}), "-1")
    assert matches(compile_schema({"type": "number", "minimum": 0}), "0.25")
    # Unbounded numbers stop at MAX_DIGITS digits: a small model cannot repeat one until max_tokens.
    assert matches(number, "9" * MAX_DIGITS) and not matches(number, "9" * (MAX_DIGITS + 1))
    assert not matches(compile_schema({"type": "integer", "minimum": 5}), "9" * (MAX_DIGITS + 1))
    kinds = compile_schema({"type": ["boolean", "null", "string"]})
    assert all(matches(kinds, text) for text in ("true", "false", "null", '"x"')) and not matches(kinds, "1")


def test_string_formats():
    cases = {
        "date": (["2024-02-29", "1999-12-31"], ["2024-13-01", "2024-1-01", "2024-01-32"]),
        "time": (["23:59:59", "08:00:00.5Z", "12:30:00+05:30"], ["24:00:00", "12:60:00"]),
        "date-time": (["2024-02-29T23:59:59Z"], ["2024-02-29 23:59:59"]),
        "uuid": ([str(uuid.UUID(int=12345))], ["1234"]),
        "email": (["ada@example.com", "a.b+c@mail.co.uk"], ["ada@", "@x.com", "ada@example"]),
    }
    for name, (good, bad) in cases.items():
        dfa = compile_schema({"type": "string", "format": name})
        assert all(matches(dfa, json.dumps(text)) for text in good), name
        assert not any(matches(dfa, json.dumps(text)) for text in bad), name
    assert matches(compile_schema({"type": "string", "format": "hostname"}), '"anything"')  # an annotation


def test_pattern_is_whole_and_keeps_json_valid():
    dfa = compile_schema({"type": "string", "pattern": "^[A-Z]{2}[0-9]+$"})
    assert matches(dfa, '"AB12"') and not matches(dfa, '"xAB12"') and not matches(dfa, '"AB"')
    check_walks({"type": "string", "pattern": ".{1,6}"}, lambda v: isinstance(v, str) and 1 <= len(v) <= 6)
    with pytest.raises(InvalidRequestError, match="no string"):
        compile_schema({"type": "string", "pattern": '"'})


def test_refs_anyof_const_and_tuples():
    schema = {
        "$defs": {"point": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "integer"}],
                            "items": False}},
        "type": "object",
        "properties": {
            "at": {"$ref": "#/$defs/point"},
            "kind": {"const": "pin"},
            "label": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]},
        },
        "required": ["at", "kind", "label"],
    }
    dfa = compile_schema(schema)
    assert matches(dfa, '{"at":[1,-2],"kind":"pin","label":null}')
    assert matches(dfa, '{"at":[1],"kind":"pin","label":"ab"}')
    assert not matches(dfa, '{"at":[1,2,3],"kind":"pin","label":null}')
    assert not matches(dfa, '{"at":[1,2],"kind":"pit","label":null}')
    check_walks(schema, lambda v: len(v["at"]) <= 2 and v["kind"] == "pin"
                and (v["label"] is None or len(v["label"]) <= 4))
    legacy = compile_schema({"type": "array", "items": [{"type": "string"}], "additionalItems": {"type": "null"},
                             "minItems": 2})
    assert matches(legacy, '["a",null,null]') and not matches(legacy, '["a"]') and not matches(legacy, '[null]')


def test_recursive_refs_unroll_until_only_their_ways_out_remain():
    linked = {"$defs": {"node": {"type": "object", "properties": {"value": {"type": "integer"},
                                                                   "next": {"$ref": "#/$defs/node"}},
                                 "required": ["value"]}},
              "$ref": "#/$defs/node"}
    dfa = compile_schema(linked)
    chain = '{"value":1}'
    for depth in range(2, MAX_RECURSION + 2):
        chain = f'{{"value":{depth},"next":{chain}}}'
        assert matches(dfa, chain) == (depth <= MAX_RECURSION), depth
    tree = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 3},
                                             "children": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}}}
    check_walks(tree, lambda v: isinstance(v, dict) and depth_of(v) <= MAX_RECURSION + 1, walks=30)


def depth_of(node: dict) -> int:
    return 1 + max((depth_of(child) for child in node.get("children", [])), default=0)


def test_arrays_honour_item_counts():
    dfa = compile_schema({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3})
    assert [n for n in range(5) if matches(dfa, json.dumps(list(range(n))))] == [2, 3]
    assert matches(compile_schema({"type": "array", "maxItems": 0}), "[]")


def test_open_values_nest_two_levels():
    dfa = compile_regex(json_object_regex())
    assert matches(dfa, '{"a": {"b": [1, {"c": 2}]}}') is False  # three levels below the object
    assert matches(dfa, '{"a": {"b": [1, 2]}, "d": "e"}') and matches(dfa, "{}")
    assert not matches(dfa, "[1]") and not matches(dfa, '{"a": 1')
    check_walks({"type": "object"}, lambda v: isinstance(v, dict), walks=30)
    check_walks(True, lambda v: True, walks=30)
    assert matches(compile_schema({"type": "object", "additionalProperties": {"type": "integer"}}), '{"x":1,"y":2}')
    assert matches(compile_schema({"type": "object", "additionalProperties": False}), "{}")


def test_choice_escapes_its_strings():
    dfa = compile_regex(choice_regex(["a.b", "(x)|y", "naïve"]))
    assert matches(dfa, "a.b") and matches(dfa, "(x)|y") and matches(dfa, "naïve")
    assert not matches(dfa, "axb") and not matches(dfa, "y")


@pytest.mark.parametrize(("schema", "match"), [
    ("{not json", "not valid JSON"),
    ({"type": "frobnicate"}, "unknown type"),
    ({"$ref": "#/$defs/missing"}, "names nothing"),
    ({"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]}, "matches no string"),
    ({"$ref": "https://example.com/schema.json"}, "only references"),
    ({"type": "string", "maxLength": 5000}, "more than 1000"),
    ({"type": "string", "minLength": 4, "maxLength": 2}, "less than minLength"),
    ({"type": "array", "minItems": -1}, "non-negative"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "not listed"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "exactly one"),
    ({"enum": []}, "non-empty"),
    (False, "allows no value"),
    ({"properties": {"a": 3}}, "/properties/a"),
])
def test_bad_schemas_are_refused_with_the_place(schema, match):
    text = schema if isinstance(schema, str) else json.dumps(schema)
    with pytest.raises(InvalidRequestError, match=match):
        compile_regex(schema_to_regex(text))
