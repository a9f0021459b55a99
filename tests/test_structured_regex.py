"""The regex compiler of structured output: its byte-level DFA against ``re.fullmatch`` (with ``re.ASCII``) on a
table of patterns and on random ones, UTF-8 exactness (every scalar value, no invalid byte string), the trimmed
DFA's invariant, the errors for unsupported features, bad syntax and limits, and the size of a JSON-string DFA.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda_engine.sampling_params import InvalidRequestError
from pagoda_engine.structured_output.dfa import Dfa
from pagoda_engine.structured_output.regex import compile_regex

JSON_STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'


def matches(dfa: Dfa, text: str) -> bool:
    state = dfa.walk(0, text.encode())
    return state >= 0 and bool(dfa.accepting[state])


def python_matches(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern, text, re.ASCII) is not None


def walk_all(dfa: Dfa, data: np.ndarray) -> np.ndarray:
    """The states after each row of ``data`` (uint8 [n, length]), walked from the start: -1 once dead."""
    states = np.zeros(len(data), dtype=np.int64)
    for column in data.T:
        states = np.where(states >= 0, dfa.transitions[np.maximum(states, 0), column], -1)
    return states


def accepts_all(dfa: Dfa, data: np.ndarray) -> np.ndarray:
    states = walk_all(dfa, data)
    return (states >= 0) & dfa.accepting[np.maximum(states, 0)]


def _grow(states: np.ndarray, step) -> np.ndarray:
    """Apply ``step`` (bool [states] to a superset of it) to ``states`` until nothing changes."""
    while not np.array_equal(grown := step(states), states):
        states = grown
    return states


def assert_trimmed(dfa: Dfa) -> None:
    """Every state is reachable from the start and can reach an accepting state."""
    moves = dfa.transitions
    numbers = np.arange(dfa.num_states)
    assert _grow(numbers == 0, lambda reached: reached | np.isin(numbers, moves[reached])).all()
    assert _grow(dfa.accepting, lambda live: live | ((moves >= 0) & live[moves]).any(axis=1)).all()


# --- A table of patterns --------------------------------------------------------------------------------------

# (pattern, texts it matches, texts it does not match)
TABLE = [
    ("abc", ["abc"], ["", "ab", "abcd", "abd"]),
    ("[abc]", ["a", "c"], ["", "d", "ab"]),
    ("[^abc]", ["d", "\n", "é", "€", "😀"], ["", "a", "dd"]),
    ("[a-f0-9]+", ["deadbeef", "0"], ["", "g", "DEAD"]),
    (r"\d{3}-\d{4}", ["555-1234"], ["55-1234", "٥٥٥-1234"]),
    (r"\w+", ["foo_Bar9"], ["", "é", "foo bar"]),
    (r"\s*", ["", " \t\n\r\f\v"], ["\x1c", "\u00a0", "a"]),
    (r"\D\W\S", ["a-b", "é é"], ["1-b", "a_b", "a- "]),
    (r"[\d\s]+", ["1 2\n"], ["a", "١"]),
    (r"\x41\u00e9\U0001F600", ["Aé😀"], ["Ae😀", "A"]),
    (r"\N{GREEK SMALL LETTER ALPHA}[\N{SNOWMAN}\N{COMET}]", ["α☃", "α☄"], ["a☃", "α"]),
    (r"\101\0\07[\12]", ["A\x00\x07\n"], ["A\x00\x00\n", "A"]),
    (r"\n\t\r\f\v\a[\b]", ["\n\t\r\f\v\a\b"], ["ntrfvab"]),
    (r"\.\*\+\?\(\)\[\]\{\}\|\\\^\$", [".*+?()[]{}|\\^$"], ["", "."]),
    ("a.c", ["abc", "a😀c", "a\tc"], ["a\nc", "ac"]),
    ("cat|dog|", ["cat", "dog", ""], ["catdog", "ca"]),
    ("(ab)+(cd|ef)?", ["ab", "ababef"], ["", "abcdcd", "aba"]),
    ("((a|b)c)*", ["", "acbc"], ["ab", "acb"]),
    ("(a|b)*abb", ["abb", "babaabb"], ["ab", "abba"]),
    ("(?P<year>[0-9]{4})-(?:0[1-9]|1[0-2])", ["2024-01", "1999-12"], ["2024-13", "24-01", "2024-00"]),
    ("a*b+c?", ["b", "aaabbc"], ["", "ac", "abcc"]),
    ("a*?b+?c??", ["b", "aabbc"], ["a", "cb"]),
    ("a{3}", ["aaa"], ["aa", "aaaa"]),
    ("a{2,}", ["aa", "aaaaa"], ["", "a"]),
    ("a{,2}", ["", "a", "aa"], ["aaa"]),
    ("a{2,3}?", ["aa", "aaa"], ["a", "aaaa"]),
    ("(?:ab){0,2}c", ["c", "abc", "ababc"], ["abababc", "abac"]),
    ("a{", ["a{"], ["a", "a{}"]),
    ("x{a}", ["x{a}"], ["x", "xa"]),
    ("x{}|y{1,2|z{,}", ["x{}", "y{1,2", "", "zzz"], ["x", "y", "z{,}"]),
    ("^[a-z]+$", ["abc"], ["", "ab1", "^abc$"]),
    ("", [""], ["a", "\n"]),
    ("[α-ω]+", ["αβγ", "ω"], ["", "a", "Α", "αa"]),
    ("[^a]{2}", ["éé", "😀\n", "bc"], ["é", "aé", "ééé"]),
    ("😀+|[🌀-🌿]", ["😀😀", "🌍"], ["", "🙂", "😀🌍"]),
    ("[\u00e9\u20ac-\u20af]*", ["é€₯", ""], ["e", "₰"]),
    ("[-a][a-][]a][^]a]", ["-a]b", "a-aé"], ["b-]b", "-a]]", "-aa"]),
    (r"[\ud7ff-\ue000]", ["\ud7ff", "\ue000"], ["\ud7fe", "\ue001"]),
    (JSON_STRING, ['""', '"a\\"b\\u00e9 é"'], ['"', '"\\x"', '"\x01"', '"\\u12"']),
]


@pytest.mark.parametrize(("pattern", "matching", "non_matching"), TABLE)
def test_table_agrees_with_re(pattern, matching, non_matching):
    dfa = compile_regex(pattern)
    for text in matching:
        assert python_matches(pattern, text), text
        assert matches(dfa, text), text
    for text in non_matching:
        assert not python_matches(pattern, text), text
        assert not matches(dfa, text), text


# --- Random patterns ------------------------------------------------------------------------------------------

ATOMS = st.sampled_from(["a", "b", "c", "é", ".", "[ab]", "[^a]", "[a-c]", "[^\n]", "[é-ê]", r"\s", r"\W", "\n"])
QUANTIFIERS = st.sampled_from(["*", "+", "?", "*?", "+?", "??", "{2}", "{0,2}", "{1,}", "{,2}", "{1,3}?"])


@st.composite
def patterns(draw, depth: int = 3) -> str:
    """A random pattern of at most ``depth`` nested operators over ``ATOMS``."""
    if depth == 0 or draw(st.integers(0, 4)) == 0:
        return draw(ATOMS)
    kind = draw(st.sampled_from(["concat", "alternation", "group", "repeat", "repeated atom"]))
    if kind == "repeated atom":
        return draw(ATOMS) + draw(QUANTIFIERS)
    if kind == "repeat":
        return f"(?:{draw(patterns(depth - 1))}){draw(QUANTIFIERS)}"
    if kind == "group":
        return f"({draw(patterns(depth - 1))})"
    parts = draw(st.lists(patterns(depth - 1), min_size=2, max_size=3))
    return ("" if kind == "concat" else "|").join(parts)


@settings(max_examples=200, deadline=None)
@given(pattern=patterns(), texts=st.lists(st.text(alphabet="abcé\n", max_size=8), max_size=10), data=st.data())
def test_random_patterns_agree_with_re(pattern, texts, data):
    """On random texts over the patterns' alphabet, and on texts that ``re`` matches."""
    dfa = compile_regex(pattern)
    assert_trimmed(dfa)
    texts += data.draw(st.lists(st.from_regex(re.compile(pattern, re.ASCII), fullmatch=True), min_size=1, max_size=4))
    for text in texts:
        assert matches(dfa, text) == python_matches(pattern, text), text


def _code_points_around(*points: int) -> list[int]:
    near = {p + d for p in points for d in (-1, 0, 1)}
    return sorted(p for p in near if 0 <= p <= 0x10FFFF and not 0xD800 <= p <= 0xDFFF)


UTF8_BOUNDARIES = [0x7F, 0x80, 0x7FF, 0x800, 0xD7FF, 0xE000, 0xFFFF, 0x10000, 0x10FFFF]
SCALARS = st.integers(0, 0x10FFFF).filter(lambda p: not 0xD800 <= p <= 0xDFFF)


@settings(max_examples=100, deadline=None)
@given(bounds=st.tuples(SCALARS, SCALARS).map(sorted), negate=st.booleans(),
       samples=st.lists(SCALARS, max_size=20))
def test_random_code_point_ranges_are_exact(bounds, negate, samples):
    lo, hi = bounds
    pattern = f"[{'^' if negate else ''}\\U{lo:08x}-\\U{hi:08x}]"
    if negate and (lo, hi) == (0, 0x10FFFF):  # the complement of every scalar value is empty
        with pytest.raises(InvalidRequestError, match="matches no string"):
            compile_regex(pattern)
        return
    dfa = compile_regex(pattern)
    for point in _code_points_around(lo, hi, *UTF8_BOUNDARIES) + samples:
        assert matches(dfa, chr(point)) == ((lo <= point <= hi) != negate), hex(point)


# --- UTF-8 ----------------------------------------------------------------------------------------------------

NON_ASCII = r"[\u0080-\U0010FFFF]"


def _encodings(first: int, last: int) -> np.ndarray:
    """uint8 [n, length]: the UTF-8 encodings of the scalar values first..last, all of one length."""
    text = "".join(map(chr, range(first, last + 1)))
    return np.frombuffer(text.encode(), dtype=np.uint8).reshape(last - first + 1, -1)


# Each of these patterns matches one character: which code points it takes.
ONE_CHARACTER = {".": lambda points: points != 0x0A, NON_ASCII: lambda points: points >= 0x80}


@pytest.mark.parametrize("pattern", list(ONE_CHARACTER))
def test_every_scalar_value_is_one_character(pattern):
    dfa = compile_regex(pattern)
    for first, last in [(0x00, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]:
        expected = ONE_CHARACTER[pattern](np.arange(first, last + 1))
        np.testing.assert_array_equal(accepts_all(dfa, _encodings(first, last)), expected, f"U+{first:04X}..")


@pytest.mark.parametrize("pattern", list(ONE_CHARACTER))
@pytest.mark.parametrize("point", UTF8_BOUNDARIES)
def test_utf8_boundaries(pattern, point):
    assert matches(compile_regex(pattern), chr(point)) == ONE_CHARACTER[pattern](point)


# Byte strings of 1 to 4 bytes over every lead byte and the boundaries of continuation bytes.
_EDGE_BYTES = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xFF]


def _byte_strings(length: int) -> np.ndarray:
    """uint8 [n, length]: every lead byte, followed by every combination of ``_EDGE_BYTES``."""
    grid = np.meshgrid(np.arange(256), *[_EDGE_BYTES] * (length - 1), indexing="ij")
    return np.stack(grid, axis=-1).reshape(-1, length).astype(np.uint8)


def _is_one_character(data: bytes, pattern: str) -> bool:
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return False
    return len(text) == 1 and python_matches(pattern, text)


@pytest.mark.parametrize("pattern", list(ONE_CHARACTER))
@pytest.mark.parametrize("length", [1, 2, 3, 4])
def test_only_valid_utf8_is_accepted(pattern, length):
    dfa = compile_regex(pattern)
    data = _byte_strings(length)
    raw = data.tobytes()
    expected = np.array([_is_one_character(raw[i:i + length], pattern) for i in range(0, len(raw), length)])
    np.testing.assert_array_equal(accepts_all(dfa, data), expected)


@pytest.mark.parametrize("pattern", list(ONE_CHARACTER))
@pytest.mark.parametrize("data", [
    b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xe0\x9f\xbf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
    b"\xf0\x80\x80\x80", b"\xf0\x8f\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xff", b"\x80",
    b"\xc2\xc2", b"\xe2\x28\xa1",
])
def test_invalid_utf8_is_dead(pattern, data):
    assert compile_regex(pattern).walk(0, data) == -1


@pytest.mark.parametrize("pattern", list(ONE_CHARACTER))
@pytest.mark.parametrize("data", [b"\xc2", b"\xe2", b"\xe2\x82", b"\xed\x9f", b"\xf0\x90", b"\xf4\x8f\xbf"])
def test_truncated_utf8_is_live_but_not_accepted(pattern, data):
    dfa = compile_regex(pattern)
    state = dfa.walk(0, data)
    assert state >= 0
    assert not dfa.accepting[state]


# --- The trimmed DFA ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", [
    "", "a|b*c", "(ab|ac)*d{2,3}", "[^a]*a", "x[\\u0080-\\U0010FFFF]y", r"a|[\ud800-\udfff]b", JSON_STRING,
])
def test_dfa_is_trimmed(pattern):
    dfa = compile_regex(pattern)
    assert dfa.transitions.shape == (dfa.num_states, 256)
    assert dfa.transitions.dtype == np.int32
    assert dfa.accepting.shape == (dfa.num_states,)
    assert_trimmed(dfa)


# --- Errors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("pattern", "word"), [
    (r"(a)\1", "backreference"),
    ("(?P<x>a)(?P=x)", "backreference"),
    ("(?=a)a", "lookahead"),
    ("(?!a)b", "lookahead"),
    ("(?<=a)b", "lookbehind"),
    ("(?<!a)b", "lookbehind"),
    ("(?i)a", "inline flag"),
    ("(?i:a)", "inline flag"),
    (r"\bab", "word boundary"),
    (r"a\B", "word boundary"),
    (r"\Aa", "start of string"),
    (r"a\Z", "end of string"),
    ("a^b", "first character"),
    ("(^a)", "first character"),
    ("a$b", "last character"),
    ("a*+", "possessive"),
    ("a{2}+", "possessive"),
    ("(?>a)", "atomic"),
    ("(a)(?(1)b|c)", "conditional"),
    ("(?#note)a", "comment"),
])
def test_unsupported_features(pattern, word):
    with pytest.raises(InvalidRequestError, match="not supported") as error:
        compile_regex(pattern)
    assert word in str(error.value)


@pytest.mark.parametrize(("pattern", "word"), [
    ("(a", r"missing \)"),
    ("a)", "unbalanced parenthesis"),
    ("[a", "unterminated character set"),
    ("[^]", "unterminated character set"),
    ("*a", "nothing to repeat"),
    ("^*", "nothing to repeat"),
    ("a|+", "nothing to repeat"),
    ("a**", "multiple repeat"),
    ("a*??", "multiple repeat"),
    ("[z-a]", "bad character range"),
    (r"[\w-z]", "bad character range"),
    ("a{3,2}", "min repeat greater than max repeat"),
    ("\\", "bad escape"),
    (r"\q", "bad escape"),
    (r"[\8]", "bad escape"),
    (r"\x4", "incomplete escape"),
    (r"\u12g4", "incomplete escape"),
    (r"\U00110000", "bad escape"),
    (r"\N{NOT A CHARACTER NAME}", "undefined character name"),
    (r"\400", "octal escape"),
    ("(?", "unexpected end of pattern"),
    ("(?Q)", "unknown extension"),
    ("(?P<1>a)", "group name"),
    ("(?P<n>a)(?P<n>b)", "redefinition of group name"),
])
def test_syntax_errors(pattern, word):
    with pytest.raises(re.error):
        re.compile(pattern)
    with pytest.raises(InvalidRequestError, match="invalid regex") as error:
        compile_regex(pattern)
    assert re.search(word, str(error.value))


@pytest.mark.parametrize(("pattern", "max_states", "word"), [
    ("a{1001}", 20_000, "repeat count 1001"),
    ("a{2,1001}", 20_000, "repeat count 1001"),
    ("a{1001,}", 20_000, "repeat count 1001"),
    (r"[^\x00-\U0010FFFF]", 20_000, "matches no string"),
    (r"[\ud800-\udfff]", 20_000, "matches no string"),
    (r"\ud800", 20_000, "surrogate U\\+D800"),
    (r"[a\udfff]", 20_000, "surrogate U\\+DFFF"),
    ("\ud800", 20_000, "surrogate"),
    ("(" * 101 + ")" * 101, 20_000, "nest"),
    ("[ab]*a[ab]{12}", 100, "more than 100 DFA states"),
    ("(?:a{1000}){300}", 20_000, "NFA"),
])
def test_limits(pattern, max_states, word):
    with pytest.raises(InvalidRequestError, match=word):
        compile_regex(pattern, max_states=max_states)


def test_just_inside_the_limits():
    assert compile_regex("[ab]*a[ab]{5}", max_states=100).num_states <= 100
    assert compile_regex("(" * 100 + ")" * 100).num_states == 1
    assert compile_regex("a{1000}").num_states == 1001


# --- Size ------------------------------------------------------------------------------------------------------

def test_json_string_dfa_is_small():
    assert compile_regex(JSON_STRING).num_states < 50
