"""JSON Schemas, choices and "any JSON object" as regexes that ``regex.compile_regex`` reads.

A schema becomes the regex of the JSON texts that are instances of it, written the way outlines and
xgrammar write them: properties in the schema's order (required ones always, the others optional, no
extra keys), compact separators with at most one space after ``:``, ``,`` and an opening bracket and before a
closing one (more whitespace only lets a model ramble), numbers of at most ``MAX_DIGITS`` digits where no bound
says otherwise, and values nested no deeper than ``ANY_VALUE_DEPTH`` where a schema leaves them open, since
a regular language cannot balance brackets without a bound. Keywords honoured:

- ``type`` (one or a list), ``enum``, ``const``, ``anyOf``/``oneOf`` (as alternatives), ``allOf`` of one
  schema, ``$ref`` to a JSON pointer into the root (``#/$defs/...``), a recursive one unrolled
  ``MAX_RECURSION`` levels deep.
- objects: ``properties``, ``required``; ``additionalProperties`` as the value schema of an object that
  lists no properties.
- arrays: ``items``, ``prefixItems`` (or ``items`` as a list, with ``additionalItems``), ``minItems``,
  ``maxItems``.
- strings: ``minLength``, ``maxLength``, ``pattern`` (matched whole, as if anchored, and limited to the
  characters JSON holds unescaped), ``format`` date, time, date-time, uuid, email (other formats are
  annotations, as JSON Schema allows).
- integers and numbers: ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum`` (also draft
  4's flags); a bounded number is written without an exponent, and a bound between two integers moves
  inward to one (``minimum: 0.5`` writes numbers from 1), so that every number written satisfies it.

Anything a schema asks for that cannot be honoured raises InvalidRequestError naming where it is.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from pagoda_engine.sampling_params import InvalidRequestError
from pagoda_engine.structured_output.regex import MAX_REPEAT, restrict_pattern

# Nesting below a value whose schema leaves it open (``{}``, an object without properties, ...).
ANY_VALUE_DEPTH = 2
# How many times a recursive $ref (a tree, a list of lists) may open inside itself. Past that it matches
# nothing, which leaves only the ways out that the schema has there: an optional property, a null
# alternative, an empty array. A schema with none matches nothing and is refused.
MAX_RECURSION = 3
# The empty set of characters: the complement of them all.
NOTHING = r"[^\x00-\U0010FFFF]"
WHITESPACE = "[ ]?"
# Where whitespace may go: after an opening bracket, a colon or a comma, and before a closing bracket.
COLON = f":{WHITESPACE}"
COMMA = f",{WHITESPACE}"
# Digits written where a schema sets no bound: JavaScript's safe integers have 16, and without a cap a small
# model can repeat a digit until max_tokens.
MAX_DIGITS = 16

# A JSON string's characters: unescaped ones (neither a quote, a backslash nor a control character) or
# escapes. No surrogate pair is checked for, as JSON parsers accept lone ones.
_UNESCAPED = ((0x20, 0x21), (0x23, 0x5B), (0x5D, 0xD7FF), (0xE000, 0x10FFFF))
_STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
STRING = f'"{_STRING_CHAR}*"'
_NATURAL = f"(?:0|[1-9][0-9]{{0,{MAX_DIGITS - 1}}})"
INTEGER = f"-?{_NATURAL}"
_FRACTION = f"(?:\\.[0-9]{{1,{MAX_DIGITS}}})"
_ZERO_FRACTION = f"(?:\\.0{{1,{MAX_DIGITS}}})"
_NONZERO_FRACTION = f"(?:\\.0{{0,{MAX_DIGITS - 1}}}[1-9][0-9]{{0,{MAX_DIGITS - 1}}})"
_FRACTION_EXPONENT = f"{_FRACTION}?(?:[eE][+-]?[0-9]{{1,3}})?"
NUMBER = INTEGER + _FRACTION_EXPONENT
BOOLEAN = "(?:true|false)"
NULL = "null"

_DATE = r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])?"
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": f"{_DATE}T{_TIME}",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "email": r"[a-zA-Z0-9._%+-]+@[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*\.[a-zA-Z]{2,}",
}
_TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")


def schema_to_regex(schema_text: str) -> str:
    """The regex of the JSON instances of the schema in ``schema_text``."""
    try:
        schema = json.loads(schema_text)
    except json.JSONDecodeError as error:
        raise InvalidRequestError(f"json_schema is not valid JSON: {error}") from None
    return _SchemaTranslator(schema).value(schema, "#")


def json_object_regex() -> str:
    """Any JSON object, its values nested at most ``ANY_VALUE_DEPTH`` levels below it."""
    return _object_of(STRING, any_value(ANY_VALUE_DEPTH))


def choice_regex(choices: list[str]) -> str:
    """Exactly one of ``choices``."""
    return "|".join(re.escape(choice) for choice in choices)


def any_value(depth: int) -> str:
    """Any JSON value with objects and arrays nested at most ``depth`` levels deep."""
    scalar = f"(?:{STRING}|{NUMBER}|{BOOLEAN}|{NULL})"
    if depth == 0:
        return scalar
    inner = any_value(depth - 1)
    return f"(?:{scalar}|{_object_of(STRING, inner)}|{_array_of(inner, 0, None)})"


def _object_of(key: str, value: str) -> str:
    member = f"{key}{COLON}{value}"
    return rf"\{{{WHITESPACE}(?:{member}(?:{COMMA}{member})*)?{WHITESPACE}\}}"


def _array_of(item: str, min_items: int, max_items: int | None) -> str:
    more = f"(?:{COMMA}{item})"
    if max_items == 0:
        items = ""
    elif min_items == 0:
        items = f"(?:{item}{more}{_bounds(0, None if max_items is None else max_items - 1)})?"
    else:
        items = f"{item}{more}{_bounds(min_items - 1, None if max_items is None else max_items - 1)}"
    return rf"\[{WHITESPACE}{items}{WHITESPACE}\]"


def _bounds(low: int, high: int | None) -> str:
    return f"{{{low},}}" if high is None else f"{{{low},{high}}}"


def _literal(value: Any) -> str:
    return re.escape(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


class _SchemaTranslator:
    """One schema's translation: ``value(schema, path)`` is the regex of a subschema found at ``path``."""

    def __init__(self, root: Any):
        self.root = root
        self.resolving: list[str] = []  # the $refs being translated, innermost last: a repeat is recursion

    def error(self, path: str, problem: str) -> InvalidRequestError:
        return InvalidRequestError(f"json_schema at {path}: {problem}")

    def value(self, schema: Any, path: str) -> str:
        if schema is True or schema == {}:
            return any_value(ANY_VALUE_DEPTH)
        if schema is False:
            raise self.error(path, "the schema false allows no value")
        if not isinstance(schema, dict):
            raise self.error(path, f"a schema is an object or a boolean, got {json.dumps(schema)[:80]}")
        if "$ref" in schema:
            return self.reference(schema["$ref"], path)
        if "const" in schema:
            return _literal(schema["const"])
        if "enum" in schema:
            return self.enum(schema["enum"], path)
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                return self.alternatives(schema[keyword], f"{path}/{keyword}")
        if "allOf" in schema:
            return self.all_of(schema["allOf"], f"{path}/allOf")
        kind = schema.get("type", self.implied_type(schema))
        if isinstance(kind, list):
            if not kind:
                raise self.error(f"{path}/type", "an empty list of types allows no value")
            return "(?:" + "|".join(self.typed(schema, one, path) for one in kind) + ")"
        return self.typed(schema, kind, path)

    def implied_type(self, schema: dict) -> str | None:
        if "properties" in schema or "additionalProperties" in schema or "required" in schema:
            return "object"
        if "items" in schema or "prefixItems" in schema:
            return "array"
        return None

    def typed(self, schema: dict, kind: Any, path: str) -> str:
        if kind is None:
            return any_value(ANY_VALUE_DEPTH)
        if kind not in _TYPES:
            raise self.error(f"{path}/type", f"unknown type {json.dumps(kind)}; the types are {', '.join(_TYPES)}")
        if kind == "string":
            return self.string(schema, path)
        if kind == "integer":
            return self.integer(schema, path)
        if kind == "number":
            return self.number(schema, path)
        if kind == "object":
            return self.object(schema, path)
        if kind == "array":
            return self.array(schema, path)
        return BOOLEAN if kind == "boolean" else NULL

    def reference(self, ref: Any, path: str) -> str:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise self.error(f"{path}/$ref", f"only references into this schema (#/...) are supported, got {ref!r}")
        if self.resolving.count(ref) >= MAX_RECURSION:
            return NOTHING
        target = self.root
        for token in ref[1:].split("/")[1:]:
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and token in target:
                target = target[token]
            elif isinstance(target, list) and token.isdigit() and int(token) < len(target):
                target = target[int(token)]
            else:
                raise self.error(f"{path}/$ref", f"{ref} names nothing in the schema")
        self.resolving.append(ref)
        try:
            return self.value(target, ref)
        finally:
            self.resolving.pop()

    def enum(self, values: Any, path: str) -> str:
        if not isinstance(values, list) or not values:
            raise self.error(f"{path}/enum", "enum needs a non-empty list of values")
        return "(?:" + "|".join(_literal(value) for value in values) + ")"

    def alternatives(self, schemas: Any, path: str) -> str:
        if not isinstance(schemas, list) or not schemas:
            raise self.error(path, "needs a non-empty list of schemas")
        return "(?:" + "|".join(self.value(schema, f"{path}/{i}") for i, schema in enumerate(schemas)) + ")"

    def all_of(self, schemas: Any, path: str) -> str:
        if not isinstance(schemas, list) or len(schemas) != 1:
            raise self.error(path, "allOf is supported with exactly one schema")
        return self.value(schemas[0], f"{path}/0")

    def string(self, schema: dict, path: str) -> str:
        if "format" in schema and schema["format"] in FORMATS:
            return f'"{FORMATS[schema["format"]]}"'
        if "pattern" in schema:
            pattern = schema["pattern"]
            if not isinstance(pattern, str):
                raise self.error(f"{path}/pattern", "pattern must be a string")
            return f'"{restrict_pattern(pattern, _UNESCAPED)}"'
        low = self.count(schema, "minLength", path) or 0
        high = self.count(schema, "maxLength", path)
        if high is not None and high < low:
            raise self.error(path, f"maxLength {high} is less than minLength {low}")
        if low == 0 and high is None:
            return STRING
        return f'"{_STRING_CHAR}{_bounds(low, high)}"'

    def count(self, schema: dict, keyword: str, path: str) -> int | None:
        """A non-negative count keyword (a length or a number of items), None when absent."""
        value = schema.get(keyword)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or value != int(value):
            raise self.error(f"{path}/{keyword}", f"{keyword} must be a non-negative integer, got {value!r}")
        if value > MAX_REPEAT:
            raise self.error(f"{path}/{keyword}", f"{keyword} {int(value)} is more than {MAX_REPEAT}, the most "
                                                  "structured output supports")
        return int(value)

    def integer(self, schema: dict, path: str) -> str:
        low, high = self.integer_bounds(schema, path)
        if low is None and high is None:
            return INTEGER
        if low is not None and high is not None and low > high:
            raise self.error(path, f"no integer lies between the bounds {low} and {high}")
        return integer_range(low, high)

    def integer_bounds(self, schema: dict, path: str) -> tuple[int | None, int | None]:
        """The least and the greatest integer the bounds allow (None: unbounded)."""
        lower, upper = self.bounds(schema, path)
        low = None if lower is None else math.floor(lower[0]) + 1 if lower[1] else math.ceil(lower[0])
        high = None if upper is None else math.ceil(upper[0]) - 1 if upper[1] else math.floor(upper[0])
        return low, high

    def bounds(self, schema: dict, path: str) -> tuple[tuple[float, bool] | None, tuple[float, bool] | None]:
        """The lower and upper bound as (value, exclusive), the tighter where a schema gives two."""
        found = []
        for keyword, exclusive, lower in (("minimum", "exclusiveMinimum", True),
                                          ("maximum", "exclusiveMaximum", False)):
            candidates = []
            bound = self.bound(schema, keyword, path)
            if bound is not None:  # draft 4 writes an exclusive bound as a flag beside the bound itself
                candidates.append((bound, schema.get(exclusive) is True))
            strict = self.bound(schema, exclusive, path)
            if strict is not None:
                candidates.append((strict, True))
            # The tighter: the greater lower bound (the smaller upper one), exclusive on a tie.
            found.append(max(candidates, key=lambda c: (c[0] if lower else -c[0], c[1])) if candidates else None)
        return found[0], found[1]

    def bound(self, schema: dict, keyword: str, path: str) -> float | None:
        value = schema.get(keyword)
        if value is None or isinstance(value, bool):
            return None
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise self.error(f"{path}/{keyword}", f"{keyword} must be a number, got {value!r}")
        return value

    def number(self, schema: dict, path: str) -> str:
        lower, upper = self.bounds(schema, path)
        if lower is None and upper is None:
            return NUMBER
        # A bound between integers moves inward to one, so that every number written satisfies it.
        if lower is not None and lower[0] != math.floor(lower[0]):
            lower = (math.ceil(lower[0]), False)
        if upper is not None and upper[0] != math.floor(upper[0]):
            upper = (math.floor(upper[0]), False)
        low = None if lower is None else (int(lower[0]), lower[1])
        high = None if upper is None else (int(upper[0]), upper[1])
        if low is not None and high is not None and (low[0] > high[0] or (low[0] == high[0] and (low[1] or high[1]))):
            raise self.error(path, "no number lies between the bounds (as rounded to integers)")
        return number_range(low, high)

    def object(self, schema: dict, path: str) -> str:
        properties = schema.get("properties")
        if not properties:
            extra = schema.get("additionalProperties", True)
            if extra is False:
                return rf"\{{{WHITESPACE}\}}"
            return _object_of(STRING, self.value(extra, f"{path}/additionalProperties"))
        if not isinstance(properties, dict):
            raise self.error(f"{path}/properties", "properties must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list) or any(name not in properties for name in required):
            missing = [name for name in required if name not in properties] if isinstance(required, list) else []
            raise self.error(f"{path}/required", f"required names properties that are not listed: {missing}"
                             if missing else "required must be a list of property names")
        members = [(f"{_literal(name)}{COLON}"
                    f"{self.value(subschema, f'{path}/properties/{name}')}", name in required)
                   for name, subschema in properties.items()]
        return rf"\{{{WHITESPACE}{_members(members)}{WHITESPACE}\}}"

    def array(self, schema: dict, path: str) -> str:
        low = self.count(schema, "minItems", path) or 0
        high = self.count(schema, "maxItems", path)
        if high is not None and high < low:
            raise self.error(path, f"maxItems {high} is less than minItems {low}")
        prefix = schema.get("prefixItems")
        items = schema.get("items", True)
        if isinstance(items, list):  # before draft 2020-12, a tuple was spelled with items and additionalItems
            prefix, items = items, schema.get("additionalItems", True)
        if prefix is None:
            return _array_of(self.value(items, f"{path}/items"), low, high)
        if not isinstance(prefix, list) or not prefix:
            raise self.error(f"{path}/prefixItems", "prefixItems needs a non-empty list of schemas")
        if low > len(prefix) and items is False:
            raise self.error(path, f"minItems {low} is more than the {len(prefix)} prefixItems allowed")
        return self.tuple_array(prefix, items, low, high, path)

    def tuple_array(self, prefix: list, items: Any, low: int, high: int | None, path: str) -> str:
        """An array whose first items follow ``prefix``, one schema each, and the rest ``items``; the
        prefix may stop early where minItems allows (JSON Schema's prefixItems)."""
        shown = prefix[:high] if high is not None else prefix
        parts = [self.value(schema, f"{path}/prefixItems/{i}") for i, schema in enumerate(shown)]
        rest = ""
        if items is not False and (high is None or high > len(prefix)):
            item = self.value(items, f"{path}/items")
            extra_low = max(low - len(prefix), 0)
            extra_high = None if high is None else high - len(prefix)
            rest = f"(?:{COMMA}{item}){_bounds(extra_low, extra_high)}"
        # Back to front: item i, then optionally (or, below minItems, always) the items after it.
        body = rest
        for i in range(len(parts) - 1, -1, -1):
            body = (f"(?:{COMMA}" if i else "(?:") + parts[i] + body + (")" if i < low else ")?")
        return rf"\[{WHITESPACE}{body}{WHITESPACE}\]"


def _members(members: list[tuple[str, bool]]) -> str:
    """The regex of an object's members in order, ``(regex, required)`` each: the optional ones may be left
    out, and a comma sits between every two that are written.

    The members before the first required one can each be present or not, and one of them that is present
    is followed by a comma; the ones after it each come with their comma in front. Without any required
    member, the first member written picks which of the rest may follow.
    """
    def following(rest: list[tuple[str, bool]]) -> str:
        return "".join(f"{COMMA}{member}" if required else f"(?:{COMMA}{member})?" for member, required in rest)

    first_required = next((i for i, (_, required) in enumerate(members) if required), None)
    if first_required is not None:
        before = "".join(f"(?:{member}{COMMA})?" for member, _ in members[:first_required])
        return before + members[first_required][0] + following(members[first_required + 1:])
    starts = [member + following(members[i + 1:]) for i, (member, _) in enumerate(members)]
    return "(?:" + "|".join(starts) + ")?"


def number_range(low: tuple[int, bool] | None, high: tuple[int, bool] | None) -> str:
    """The regex of the decimal numbers (no exponent) between integer bounds given as (value, exclusive),
    None: unbounded on that side. Sign and magnitude: a negative number's magnitude lies between
    max(-high, 0) (never 0 itself: no "-0") and -low, a non-negative one's between max(low, 0) and high."""
    branches = []
    if low is None or low[0] < 0:
        floor = (0, True) if high is None or high[0] >= 0 else (-high[0], high[1])
        branches.append("-" + _magnitude_between(floor, None if low is None else (-low[0], low[1])))
    if high is None or high[0] > 0 or (high[0] == 0 and not high[1]):
        floor = (0, False) if low is None or low[0] < 0 else low
        branches.append(_magnitude_between(floor, high))
    return "(?:" + "|".join(branches) + ")"


def _magnitude_between(low: tuple[int, bool], high: tuple[int, bool] | None) -> str:
    """Non-negative decimals m (an integer part, then maybe a fraction) with low <= m <= high, either end
    exclusive where its flag says so; the integer ends themselves need a zero fraction or a nonzero one."""
    (a, a_open), (b, b_open) = low, high if high is not None else (None, True)
    if b == a:  # only a itself, closed at both ends (number_range refuses an empty interval)
        return f"(?:{a}{_ZERO_FRACTION}?)"
    branches = [f"{a}{_NONZERO_FRACTION}" if a_open else f"{a}{_FRACTION}?"]
    if b is None or b - 1 > a:
        branches.append(_magnitudes(a + 1, None if b is None else b - 1) + f"{_FRACTION}?")
    if b is not None and not b_open:
        branches.append(f"{b}{_ZERO_FRACTION}?")
    return "(?:" + "|".join(branches) + ")"


def integer_range(low: int | None, high: int | None) -> str:
    """The regex of the integers in ``low..high`` (None: unbounded on that side), written without leading
    zeros or ``-0``."""
    branches = []
    if low is None or low < 0:
        # Negative n in low..min(high, -1): its magnitude lies in max(-high, 1)..-low.
        top = None if low is None else -low
        bottom = 1 if high is None or high >= 0 else -high
        if top is None or bottom <= top:
            branches.append("-" + _magnitudes(bottom, top))
    if high is None or high >= 0:
        branches.append(_magnitudes(max(low or 0, 0), high))
    return "(?:" + "|".join(branches) + ")"


def _magnitudes(low: int, high: int | None) -> str:
    """The non-negative integers in ``low..high`` (None: unbounded)."""
    if high is None:
        digits = len(str(low))
        most = max(digits, MAX_DIGITS - 1)
        pieces = _digit_ranges(low, 10**digits - 1) + [f"[1-9][0-9]{{{digits},{most}}}"]
    else:
        pieces = _digit_ranges(low, high)
    return "(?:" + "|".join(pieces) + ")"


def _digit_ranges(low: int, high: int) -> list[str]:
    """``low..high`` (0 <= low <= high) as regexes ``prefix[a-b][0-9]{k}``, the classic split: from ``low``,
    the widest block of 10**k numbers that starts at it and fits, grown over as many digits at position k
    as fit below ``high``."""
    pieces = []
    if low == 0:
        pieces.append("0")
        low = 1
    while low <= high:
        width = 0
        while low % 10 ** (width + 1) == 0 and low + 10 ** (width + 1) - 1 <= high:
            width += 1
        step = 10**width
        digit = low // step % 10
        last = min(9, digit + (high - low + 1) // step - 1)
        prefix = str(low // step)[:-1]
        digits = str(digit) if last == digit else f"[{digit}-{last}]"
        pieces.append(prefix + digits + (f"[0-9]{{{width}}}" if width else ""))
        low += (last - digit + 1) * step
    return pieces
