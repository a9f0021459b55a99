"""Byte-level DFAs, and the subset construction that builds them from a Thompson NFA.

The construction runs over byte equivalence classes rather than 256 bytes: the boundaries of every byte range
in the NFA cut 0..255 into intervals no NFA move can tell apart, so each DFA state computes one move per
class (a few dozen for the regexes of JSON schemas) and numpy expands the class table to [states, 256] at
the end. Only the NFA states that read a byte, and the accepting one, are kept in a DFA state's set: the
epsilon-only states in between change nothing about the future, so leaving them out merges more states.
The result is trimmed: a state that cannot reach acceptance is dropped and the moves into it become -1, so
a walk that is not -1 can always still be completed to a match.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pagoda_engine.sampling_params import InvalidRequestError

# The NFA states summed over the sets of all DFA states: bounds the construction's time and memory when a
# DFA of few states still tracks thousands of NFA states in each (e.g. many bounded repeats in a row).
MAX_SUBSET_WORK = 4_000_000


@dataclass(frozen=True, eq=False)
class Dfa:
    """A trimmed DFA over bytes; state 0 is the start.

    ``transitions[s, b]`` is the state after byte ``b`` in state ``s``, or -1 when no continuation of the
    input can match any more. Every state is reachable from 0 and can reach an accepting state.
    It is kept as the class of each byte and a table over classes (what pickles, to the engine core:
    0.26 MB instead of 1.9 MB for the 1,844 states of a small JSON schema), and expanded to bytes on first use.
    (``eq=False``: comparing or hashing the arrays by value is never what a caller wants.)
    """

    byte_classes: np.ndarray  # uint8 [256]
    class_transitions: np.ndarray  # int16, or int32 past 32,767 states [num_states, num_classes]
    accepting: np.ndarray  # bool [num_states]

    @property
    def num_states(self) -> int:
        return int(self.class_transitions.shape[0])

    @functools.cached_property
    def transitions(self) -> np.ndarray:
        """int32 [num_states, 256]."""
        table = self.class_transitions[:, self.byte_classes].astype(np.int32)
        table.setflags(write=False)
        return table

    def __getstate__(self) -> dict:
        return {name: value for name, value in self.__dict__.items() if name != "transitions"}

    def walk(self, state: int, data: bytes) -> int:
        """The state after reading ``data`` from ``state``: -1 once no match can follow."""
        transitions = self.transitions
        for byte in data:
            if state < 0:
                break
            state = int(transitions[state, byte])
        return state


@dataclass
class Nfa:
    """A Thompson NFA over bytes: state ``s`` moves on no input to each of ``epsilon[s]`` and on a byte in
    ``lo..hi`` to ``target`` for each ``(lo, hi, target)`` of ``edges[s]``."""

    epsilon: list[list[int]]
    edges: list[list[tuple[int, int, int]]]
    start: int
    accept: int


def determinize(nfa: Nfa, max_states: int) -> Dfa:
    """The trimmed DFA of ``nfa``'s language; InvalidRequestError when it is empty or too large."""
    class_of = _byte_classes(nfa)
    num_classes = int(class_of[-1]) + 1
    moves = [[(int(class_of[lo]), int(class_of[hi]), target) for lo, hi, target in edges] for edges in nfa.edges]
    closures = _Closures(nfa)
    sets = [closures.of([nfa.start])]
    ids = {sets[0]: 0}
    rows = []
    work = 0
    # `sets` grows as new DFA states turn up; the loop reaches them all.
    for nfa_set in sets:
        work += len(nfa_set)
        if work > MAX_SUBSET_WORK:
            raise InvalidRequestError(f"the regex is too large to compile: its DFA construction tracks more than "
                                      f"{MAX_SUBSET_WORK} NFA states")
        targets: dict[int, list[int]] = {}
        for nfa_state in nfa_set:
            for first, last, target in moves[nfa_state]:
                for byte_class in range(first, last + 1):
                    targets.setdefault(byte_class, []).append(target)
        row = [-1] * num_classes
        for byte_class, class_targets in targets.items():
            next_set = closures.of(class_targets)
            next_state = ids.get(next_set)
            if next_state is None:
                if len(sets) >= max_states:
                    raise InvalidRequestError(f"the regex is too large: it needs more than {max_states} DFA states")
                next_state = ids[next_set] = len(sets)
                sets.append(next_set)
            row[byte_class] = next_state
        rows.append(row)
    table = np.array(rows, dtype=np.int32)
    accepting = np.array([nfa.accept in nfa_set for nfa_set in sets], dtype=bool)
    table, accepting = _trim(table, accepting)
    table = table.astype(np.int16 if len(table) <= np.iinfo(np.int16).max else np.int32)
    classes = class_of.astype(np.uint8)
    # Compiled DFAs may be cached and shared between requests.
    for array in (table, classes, accepting):
        array.setflags(write=False)
    return Dfa(classes, table, accepting)


def _byte_classes(nfa: Nfa) -> np.ndarray:
    """int [256]: each byte's class, numbered from 0 in byte order; a class is an interval of bytes that every
    NFA edge either wholly contains or misses."""
    starts = np.zeros(257, dtype=bool)
    starts[0] = True
    for edges in nfa.edges:
        for lo, hi, _ in edges:
            starts[lo] = starts[hi + 1] = True
    return np.cumsum(starts[:256]) - 1


class _Closures:
    """Epsilon closures, memoized per NFA state and per set of states, as frozensets of the states that
    matter to the DFA: those that read a byte, and the accepting one."""

    def __init__(self, nfa: Nfa):
        self.nfa = nfa
        self.single: dict[int, frozenset[int]] = {}
        self.sets: dict[frozenset[int], frozenset[int]] = {}

    def of(self, states: list[int]) -> frozenset[int]:
        key = frozenset(states)
        closure = self.sets.get(key)
        if closure is None:
            closure = self.sets[key] = frozenset().union(*(self._of_one(state) for state in key))
        return closure

    def _of_one(self, state: int) -> frozenset[int]:
        closure = self.single.get(state)
        if closure is None:
            closure = self.single[state] = frozenset(self._search(state))
        return closure

    def _search(self, state: int) -> list[int]:
        epsilon, edges, accept = self.nfa.epsilon, self.nfa.edges, self.nfa.accept
        seen = {state}
        stack = [state]
        kept = []
        while stack:
            current = stack.pop()
            if edges[current] or current == accept:
                kept.append(current)
            for target in epsilon[current]:
                if target not in seen:
                    seen.add(target)
                    stack.append(target)
        return kept


def _trim(table: np.ndarray, accepting: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the states that cannot reach acceptance, renumbering the rest in order (so 0 stays the start).

    Every state is reachable from the start by construction, and dropping dead states keeps that: a live
    state reached only through a dead one would make that one live.
    """
    live = _coreachable(table, accepting)
    if not live[0]:
        raise InvalidRequestError("the regex matches no string")
    renumbered = (np.cumsum(live) - 1).astype(np.int32)
    # -1 (no move) indexes the last state here, but np.where discards those entries.
    kept = np.where((table >= 0) & live[table], renumbered[table], -1).astype(np.int32)
    return kept[live], accepting[live]


def _coreachable(table: np.ndarray, accepting: np.ndarray) -> np.ndarray:
    """bool [num_states]: which states can reach an accepting state (a search backwards from them)."""
    num_states = table.shape[0]
    sources, byte_classes = np.nonzero(table >= 0)
    pairs = np.unique(table[sources, byte_classes].astype(np.int64) * num_states + sources)
    targets, sources = np.divmod(pairs, num_states)
    bounds = np.searchsorted(targets, np.arange(num_states + 1)).tolist()
    predecessors = sources.tolist()
    live = accepting.tolist()
    stack = np.flatnonzero(accepting).tolist()
    while stack:
        state = stack.pop()
        for predecessor in predecessors[bounds[state]:bounds[state + 1]]:
            if not live[predecessor]:
                live[predecessor] = True
                stack.append(predecessor)
    return np.array(live, dtype=bool)
