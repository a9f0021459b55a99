"""Regular expressions to byte-level DFAs, for structured output.

A pattern (a subset of Python's ``re``, with the same meaning; see ``compile_regex``) is parsed into a small
AST whose leaves are sets of Unicode code points. The NFA reads bytes, so each set is spelled in UTF-8: its
code-point ranges are split into sequences of byte ranges, exactly (the algorithm of RE2 and Rust's
regex-automata ``Utf8Sequences``), and no invalid UTF-8 can match. The Thompson NFA is built back to front,
each fragment wired straight to what follows it, and ``dfa.determinize`` turns it into the trimmed DFA the
sampler walks. Matching is whole, as ``re.fullmatch`` on the UTF-8 encoding of the text.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

from pagoda_engine.sampling_params import InvalidRequestError
from pagoda_engine.structured_output.dfa import Dfa, Nfa, determinize

MAX_REPEAT = 1000
MAX_NFA_STATES = 200_000
# Groups nest no deeper: parsing and building recurse once or twice per level.
MAX_NESTING = 100

_MAX_CODE_POINT = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)
_OCTAL_DIGITS = "01234567"
_HEX_DIGITS = "0123456789abcdefABCDEF"
_ASCII_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class CharSet:
    """One character from a set of code points: sorted, disjoint, non-adjacent inclusive ranges that hold
    no surrogate."""

    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Concat:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Alternation:
    branches: tuple[Node, ...]


@dataclass(frozen=True)
class Repeat:
    item: Node
    min: int
    max: int | None  # None: unbounded


Node = CharSet | Concat | Alternation | Repeat


def compile_regex(pattern: str, max_states: int = 20_000) -> Dfa:
    """The DFA of the strings whose UTF-8 encoding ``re.fullmatch(pattern, ...)`` matches.

    Supported, with Python's meaning: literals and escapes (``\\n \\t \\r \\f \\v \\a \\xHH \\uHHHH
    \\UHHHHHHHH \\N{name}``, octal ``\\0``..), ``.`` (any character but newline), classes ``[...]`` and
    ``[^...]``, groups ``(...)``, ``(?:...)`` and ``(?P<name>...)``, alternation, the greedy and lazy
    quantifiers ``* + ? {n} {n,} {,m} {n,m}`` (counts up to 1000; a ``{`` that starts none is a literal),
    ``^`` as the first character and ``$`` as the last (the match is whole anyway). Unlike Python's default,
    ``\\d \\w \\s`` are ASCII only (as with ``re.ASCII``) and ``\\D \\W \\S`` their complements. Anchors
    elsewhere, ``\\A \\Z \\b \\B``, backreferences, lookarounds, inline flags, atomic groups, possessive
    quantifiers and conditionals raise InvalidRequestError, as do syntax errors, surrogates, a pattern
    matching nothing, and automata larger than ``max_states`` DFA states or ``MAX_NFA_STATES`` NFA states.
    """
    ast = _Parser(pattern).parse()
    builder = _NfaBuilder()
    accept = builder.new_state()
    start = builder.build(ast, accept)
    return determinize(Nfa(builder.epsilon, builder.edges, start, accept), max_states)


def restrict_pattern(pattern: str, allowed: tuple[tuple[int, int], ...]) -> str:
    """``pattern`` with every character it can match limited to the code points in ``allowed`` (normalized
    ranges), written back as a regex ``compile_regex`` reads; e.g. a JSON schema's ``pattern`` kept to the
    characters a JSON string holds unescaped."""
    return _to_pattern(_restrict(_Parser(pattern).parse(), allowed))


# --- Code-point sets ----------------------------------------------------------------------------------------

def _normalize(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted, merged ranges with the surrogates cut out (UTF-8 cannot encode them)."""
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    kept = []
    for lo, hi in merged:
        kept.extend((a, b) for a, b in ((lo, min(hi, _SURROGATES[0] - 1)), (max(lo, _SURROGATES[1] + 1), hi))
                    if a <= b)
    return tuple(kept)


def _complement(ranges: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """Every Unicode scalar value not in the normalized ``ranges``."""
    gaps = []
    next_free = 0
    for lo, hi in ranges:
        if lo > next_free:
            gaps.append((next_free, lo - 1))
        next_free = hi + 1
    if next_free <= _MAX_CODE_POINT:
        gaps.append((next_free, _MAX_CODE_POINT))
    return _normalize(gaps)


_DIGIT = ((0x30, 0x39),)
_WORD = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
_SPACE = ((0x09, 0x0D), (0x20, 0x20))  # \t \n \v \f \r and space: re.ASCII's \s
_CATEGORIES = {"d": _DIGIT, "w": _WORD, "s": _SPACE,
               "D": _complement(_DIGIT), "W": _complement(_WORD), "S": _complement(_SPACE)}
_DOT = CharSet(_complement(((0x0A, 0x0A),)))
_CONTROL_ESCAPES = {"a": 0x07, "f": 0x0C, "n": 0x0A, "r": 0x0D, "t": 0x09, "v": 0x0B}
_ANCHORS = {"A": "\\A (start of string)", "Z": "\\Z (end of string)", "b": "\\b (word boundary)",
            "B": "\\B (not a word boundary)"}


# --- Parsing ------------------------------------------------------------------------------------------------

class _Anchor:
    """``^`` at the start or ``$`` at the end: matches the empty string here, and takes no quantifier."""


_ANCHOR = _Anchor()


class _Parser:
    """Recursive descent over the pattern, mirroring the grammar of Python's ``re._parser``."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.pos = 0
        self.depth = 0
        self.group_names: set[str] = set()

    def parse(self) -> Node:
        node = self.alternation()
        if self.pos < len(self.pattern):  # only a ')' stops an alternation early
            raise self.syntax_error("unbalanced parenthesis", self.pos)
        return node

    def syntax_error(self, problem: str, pos: int) -> InvalidRequestError:
        return InvalidRequestError(f"invalid regex: {problem} at position {pos}")

    def unsupported(self, feature: str, pos: int) -> InvalidRequestError:
        return InvalidRequestError(f"regex: {feature} (at position {pos}) is not supported in structured output")

    def peek(self) -> str | None:
        return self.pattern[self.pos] if self.pos < len(self.pattern) else None

    def eat(self, text: str) -> bool:
        if self.pattern.startswith(text, self.pos):
            self.pos += len(text)
            return True
        return False

    def alternation(self) -> Node:
        branches = [self.sequence()]
        while self.eat("|"):
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else Alternation(tuple(branches))

    def sequence(self) -> Node:
        items: list[Node] = []
        last = None  # what items[-1] came from: None (nothing yet), "anchor", "item" or "repeat"
        while self.peek() is not None and self.peek() not in "|)":
            start = self.pos
            bounds = self.quantifier() if self.peek() in "*+?{" else None
            if bounds is None:
                node = self.atom()
                if node is _ANCHOR:
                    last = "anchor"
                else:
                    items.append(node)
                    last = "item"
            elif last in (None, "anchor"):
                raise self.syntax_error("nothing to repeat", start)
            elif last == "repeat":
                raise self.syntax_error("multiple repeat", start)
            else:
                items[-1] = Repeat(items[-1], *bounds)
                last = "repeat"
        return items[0] if len(items) == 1 else Concat(tuple(items))

    def quantifier(self) -> tuple[int, int | None] | None:
        """The bounds of the quantifier at ``pos`` (consumed with a lazy ``?``), or None for a ``{`` that
        starts none and is a literal, as in Python."""
        start = self.pos
        char = self.pattern[start]
        self.pos += 1
        if char == "{":
            bounds = self.braces(start)
            if bounds is None:
                self.pos = start
                return None
        else:
            bounds = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
        if self.peek() == "+":
            raise self.unsupported("a possessive quantifier", start)
        self.eat("?")  # lazy: the same language
        return bounds

    def braces(self, start: int) -> tuple[int, int | None] | None:
        low = self.digits()
        high = self.digits() if self.eat(",") else low
        if not self.eat("}") or self.pattern[start:self.pos] == "{}":
            return None
        minimum = int(low) if low else 0
        maximum = int(high) if high else None
        for count in (minimum, maximum):
            if count is not None and count > MAX_REPEAT:
                raise InvalidRequestError(f"regex: the repeat count {count} at position {start} is more than "
                                          f"{MAX_REPEAT}, the most structured output supports")
        if maximum is not None and maximum < minimum:
            raise self.syntax_error("min repeat greater than max repeat", start)
        return minimum, maximum

    def digits(self) -> str:
        start = self.pos
        while self.peek() is not None and self.peek() in "0123456789":
            self.pos += 1
        return self.pattern[start:self.pos]

    def atom(self) -> Node | _Anchor:
        start = self.pos
        char = self.pattern[start]
        self.pos += 1
        if char == "(":
            return self.group(start)
        if char == "[":
            return self.char_class(start)
        if char == ".":
            return _DOT
        if char == "\\":
            value = self.escape(start, in_class=False)
            return CharSet(value) if isinstance(value, tuple) else self.literal(value, start)
        if (char == "^" and start == 0) or (char == "$" and start == len(self.pattern) - 1):
            return _ANCHOR
        if char in "^$":
            where = "first" if char == "^" else "last"
            raise self.unsupported(f"'{char}' anywhere but as the pattern's {where} character", start)
        return self.literal(ord(char), start)

    def literal(self, code_point: int, start: int) -> CharSet:
        if _SURROGATES[0] <= code_point <= _SURROGATES[1]:
            raise InvalidRequestError(f"regex: the surrogate U+{code_point:04X} at position {start} cannot be "
                                      "encoded in UTF-8")
        return CharSet(((code_point, code_point),))

    def group(self, start: int) -> Node:
        if self.depth >= MAX_NESTING:
            raise InvalidRequestError(f"regex: groups nest deeper than {MAX_NESTING} levels at position {start}")
        if self.eat("?"):
            self.group_extension(start)
        self.depth += 1
        node = self.alternation()
        self.depth -= 1
        if not self.eat(")"):
            raise self.syntax_error("missing ), unterminated subpattern", start)
        return node

    def group_extension(self, start: int) -> None:
        """Consume what follows ``(?`` in a plain group, ``:`` or ``P<name>``; raise for every other kind."""
        if self.eat(":"):
            return
        if self.eat("P<"):
            self.group_name(start)
            return
        unsupported = [("P=", "a named backreference (?P=...)"), ("=", "a lookahead (?=...)"),
                       ("!", "a negative lookahead (?!...)"), ("<=", "a lookbehind (?<=...)"),
                       ("<!", "a negative lookbehind (?<!...)"), ("(", "a conditional group (?(...)...)"),
                       (">", "an atomic group (?>...)"), ("#", "a comment group (?#...)")]
        for prefix, feature in unsupported:
            if self.pattern.startswith(prefix, self.pos):
                raise self.unsupported(feature, start)
        char = self.peek()
        if char is None:
            raise self.syntax_error("unexpected end of pattern", self.pos)
        if char in "aiLmstux-":
            raise self.unsupported("an inline flag group such as (?i)", start)
        raise self.syntax_error(f"unknown extension ?{char}", start)

    def group_name(self, start: int) -> None:
        end = self.pattern.find(">", self.pos)
        if end < 0:
            raise self.syntax_error("missing >, unterminated name", self.pos)
        name = self.pattern[self.pos:end]
        if not name.isidentifier():
            raise self.syntax_error(f"bad character in group name {name!r}", self.pos)
        if name in self.group_names:
            raise self.syntax_error(f"redefinition of group name {name!r}", self.pos)
        self.group_names.add(name)
        self.pos = end + 1

    def char_class(self, start: int) -> CharSet:
        negate = self.eat("^")
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            if self.peek() is None:
                raise self.syntax_error("unterminated character set", start)
            if self.peek() == "]" and not first:
                self.pos += 1
                break
            first = False
            member_start = self.pos
            low = self.class_member()
            if self.pattern.startswith("-", self.pos) and not self.pattern.startswith("-]", self.pos):
                self.pos += 1
                if self.peek() is None:
                    raise self.syntax_error("unterminated character set", start)
                high = self.class_member()
                if isinstance(low, tuple) or isinstance(high, tuple) or high < low:
                    raise self.syntax_error(f"bad character range {self.pattern[member_start:self.pos]}",
                                            member_start)
                ranges.append((low, high))
            elif isinstance(low, tuple):
                ranges.extend(low)
            else:
                ranges.extend(self.literal(low, member_start).ranges)
        normalized = _normalize(ranges)
        return CharSet(_complement(normalized) if negate else normalized)

    def class_member(self) -> int | tuple[tuple[int, int], ...]:
        start = self.pos
        self.pos += 1
        if self.pattern[start] == "\\":
            return self.escape(start, in_class=True)
        return ord(self.pattern[start])

    def escape(self, start: int, in_class: bool) -> int | tuple[tuple[int, int], ...]:
        """The code point or category (ranges) of the escape whose backslash is at ``start``."""
        char = self.peek()
        if char is None:
            raise self.syntax_error("bad escape (end of pattern)", start)
        self.pos += 1
        if char in _CATEGORIES:
            return _CATEGORIES[char]
        if char in _CONTROL_ESCAPES:
            return _CONTROL_ESCAPES[char]
        if char == "b" and in_class:
            return 0x08  # backspace, as in Python
        if char in "xuU":
            return self.hex_escape(start, {"x": 2, "u": 4, "U": 8}[char])
        if char == "N":
            return self.named_escape(start)
        if char == "0" or (in_class and char in _OCTAL_DIGITS):
            return self.octal_escape(start, 2)
        if char in "0123456789":
            # Outside a class, Python reads three octal digits as a character, anything else as a group number.
            following = self.pattern[self.pos:self.pos + 2]
            if not in_class and char in _OCTAL_DIGITS and len(following) == 2 and all(
                    digit in _OCTAL_DIGITS for digit in following):
                return self.octal_escape(start, 2)
            if in_class:
                raise self.syntax_error(f"bad escape \\{char}", start)
            raise self.unsupported("a backreference", start)
        if char in _ANCHORS and not in_class:
            raise self.unsupported(_ANCHORS[char], start)
        if char in _ASCII_LETTERS:
            raise self.syntax_error(f"bad escape \\{char}", start)
        return ord(char)

    def hex_escape(self, start: int, length: int) -> int:
        digits = self.pattern[self.pos:self.pos + length]
        if len(digits) != length or any(c not in _HEX_DIGITS for c in digits):
            raise self.syntax_error(f"incomplete escape {self.pattern[start:self.pos + length]}", start)
        self.pos += length
        code_point = int(digits, 16)
        if code_point > _MAX_CODE_POINT:
            raise self.syntax_error(f"bad escape {self.pattern[start:self.pos]}", start)
        return code_point

    def named_escape(self, start: int) -> int:
        end = self.pattern.find("}", self.pos)
        if not self.eat("{") or end < 0:
            raise self.syntax_error("missing {...} after \\N", start)
        name = self.pattern[self.pos:end]
        self.pos = end + 1
        try:
            return ord(unicodedata.lookup(name))
        except KeyError:
            raise self.syntax_error(f"undefined character name {name!r}", start) from None

    def octal_escape(self, start: int, more_digits: int) -> int:
        """The octal escape whose first digit was just read, taking up to ``more_digits`` more."""
        while more_digits and self.peek() is not None and self.peek() in _OCTAL_DIGITS:
            self.pos += 1
            more_digits -= 1
        code_point = int(self.pattern[start + 1:self.pos], 8)
        if code_point > 0o377:
            raise self.syntax_error(f"octal escape value {self.pattern[start:self.pos]} outside of range 0-0o377",
                                    start)
        return code_point


# --- Back to a pattern ---------------------------------------------------------------------------------------

def _restrict(node: Node, allowed: tuple[tuple[int, int], ...]) -> Node:
    if isinstance(node, CharSet):
        return CharSet(_intersect(node.ranges, allowed))
    if isinstance(node, Concat):
        return Concat(tuple(_restrict(item, allowed) for item in node.items))
    if isinstance(node, Alternation):
        return Alternation(tuple(_restrict(branch, allowed) for branch in node.branches))
    return Repeat(_restrict(node.item, allowed), node.min, node.max)


def _intersect(a: tuple[tuple[int, int], ...], b: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    return _normalize([(max(lo, low), min(hi, high)) for lo, hi in a for low, high in b
                       if max(lo, low) <= min(hi, high)])


def _to_pattern(node: Node) -> str:
    if isinstance(node, CharSet):
        # An empty set is the complement of everything: it matches no character.
        members = "".join(f"\\U{lo:08X}" if lo == hi else f"\\U{lo:08X}-\\U{hi:08X}" for lo, hi in node.ranges)
        return f"[{members}]" if members else "[^\\x00-\\U0010FFFF]"
    if isinstance(node, Concat):
        return "".join(_to_pattern(item) for item in node.items)
    if isinstance(node, Alternation):
        return "(?:" + "|".join(_to_pattern(branch) for branch in node.branches) + ")"
    bounds = f"{{{node.min},}}" if node.max is None else f"{{{node.min},{node.max}}}"
    return f"(?:{_to_pattern(node.item)}){bounds}"


# --- UTF-8 ----------------------------------------------------------------------------------------------------

# The largest code point of each UTF-8 length (1 to 4 bytes).
_LAST_OF_LENGTH = (0x7F, 0x7FF, 0xFFFF, _MAX_CODE_POINT)


@functools.lru_cache(maxsize=4096)
def _byte_sequences(charset: CharSet) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Sequences of byte ranges whose byte strings are exactly the UTF-8 encodings of the set's code points."""
    return tuple(sequence for lo, hi in charset.ranges for sequence in _utf8_sequences(lo, hi))


def _utf8_sequences(lo: int, hi: int) -> Iterator[tuple[tuple[int, int], ...]]:
    """Split ``lo..hi`` (no surrogates) until each piece encodes as a product of byte ranges.

    A piece qualifies when its ends have one UTF-8 length and, for every continuation byte, either share
    all the bits above it or span them wholly (the low bits of ``lo`` all 0, of ``hi`` all 1): then the
    i-th bytes of the encodings of ``lo`` and ``hi`` bound the i-th byte of every code point in between.
    """
    for last in _LAST_OF_LENGTH:
        if lo <= last < hi:
            yield from _utf8_sequences(lo, last)
            yield from _utf8_sequences(last + 1, hi)
            return
    for continuation in (1, 2, 3):
        low_bits = (1 << (6 * continuation)) - 1
        if lo & ~low_bits == hi & ~low_bits:
            continue
        if lo & low_bits:
            yield from _utf8_sequences(lo, lo | low_bits)
            yield from _utf8_sequences((lo | low_bits) + 1, hi)
            return
        if hi & low_bits != low_bits:
            yield from _utf8_sequences(lo, (hi & ~low_bits) - 1)
            yield from _utf8_sequences(hi & ~low_bits, hi)
            return
    yield tuple(zip(chr(lo).encode(), chr(hi).encode(), strict=True))


# --- The NFA --------------------------------------------------------------------------------------------------

class _NfaBuilder:
    """Thompson's construction, back to front: ``build(node, out)`` adds the states that match ``node`` and
    then continue at state ``out``, and returns the state they start at. No state is spent joining pieces,
    and a bounded repeat's skips go straight to its end, which keeps epsilon closures small."""

    def __init__(self):
        self.epsilon: list[list[int]] = []
        self.edges: list[list[tuple[int, int, int]]] = []

    def new_state(self) -> int:
        if len(self.edges) >= MAX_NFA_STATES:
            raise InvalidRequestError(f"the regex is too large: its NFA needs more than {MAX_NFA_STATES} states")
        self.epsilon.append([])
        self.edges.append([])
        return len(self.edges) - 1

    def build(self, node: Node, out: int) -> int:
        if isinstance(node, CharSet):
            return self.char_set(node, out)
        if isinstance(node, Concat):
            for item in reversed(node.items):
                out = self.build(item, out)
            return out
        if isinstance(node, Alternation):
            start = self.new_state()
            self.epsilon[start] = [self.build(branch, out) for branch in node.branches]
            return start
        return self.repeat(node, out)

    def char_set(self, charset: CharSet, out: int) -> int:
        start = self.new_state()
        for sequence in _byte_sequences(charset):
            state = start
            for lo, hi in sequence[:-1]:
                following = self.new_state()
                self.edges[state].append((lo, hi, following))
                state = following
            self.edges[state].append((*sequence[-1], out))
        return start

    def repeat(self, node: Repeat, out: int) -> int:
        mandatory = node.min
        if node.max is None:
            # After each pass of the item: another pass, or on. Entering at `loop` is item*, at `entry` item+.
            loop = self.new_state()
            entry = self.build(node.item, loop)
            self.epsilon[loop] = [entry, out]
            if mandatory == 0:
                out = loop
            else:
                out = entry
                mandatory -= 1
        else:
            end = out
            for _ in range(node.max - node.min):
                split = self.new_state()
                self.epsilon[split] = [self.build(node.item, out), end]
                out = split
        for _ in range(mandatory):
            out = self.build(node.item, out)
        return out
