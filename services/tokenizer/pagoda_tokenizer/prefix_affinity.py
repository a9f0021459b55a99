"""PrefixAffinity: remembers which engine served which prompt prefix, so that a request sharing a prefix with
an earlier one can go where that prefix is probably still in the prefix cache.

An engine caches prompts in whole KV blocks, chained: a block is reused only if every block before it is.
So prompts are keyed the same way: one hash per leading full block, each covering all tokens before it.
The longest remembered key wins.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixAffinity:
    def __init__(self, max_blocks: int, capacity: int):
        self._max_blocks = max_blocks
        self._capacity = capacity
        self._engine_of: OrderedDict[int, str] = OrderedDict()  # prefix key -> engine address, LRU order

    def keys(self, token_ids: Sequence[int], block_size: int) -> list[int]:
        """One key per full block of the prompt's first `max_blocks` blocks, shortest prefix first."""
        keys: list[int] = []
        key = 0
        for start in range(0, min(len(token_ids) // block_size, self._max_blocks) * block_size, block_size):
            key = hash((key, tuple(token_ids[start : start + block_size])))
            keys.append(key)
        return keys

    def lookup(self, keys: Sequence[int]) -> str | None:
        """The engine that served the longest of these prefixes, if any is remembered."""
        for key in reversed(keys):
            if key in self._engine_of:
                self._engine_of.move_to_end(key)
                return self._engine_of[key]
        return None

    def record(self, keys: Sequence[int], address: str) -> None:
        for key in keys:
            self._engine_of[key] = address
            self._engine_of.move_to_end(key)
        while len(self._engine_of) > self._capacity:
            self._engine_of.popitem(last=False)

    def forget(self, address: str) -> None:
        """The engine restarted: its prefix cache is empty."""
        for key in [k for k, a in self._engine_of.items() if a == address]:
            del self._engine_of[key]
