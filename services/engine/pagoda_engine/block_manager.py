"""BlockManager: the paged KV cache's bookkeeping and the prefix cache.

Invariants (checked by ``check_invariants`` in tests):
- every block is either referenced (``ref_count > 0``, in some sequence's block table) or in the
  free queue, never both;
- the free queue is ordered by eviction: allocation takes from the front. Blocks with nothing to reuse
  (no hash) go to the front when freed, cached ones to the back, so the cached content used most
  recently survives longest (LRU eviction);
- ``cached_blocks`` maps a block hash to a block whose content is exactly that chain of tokens; a free
  block keeps its hash (and stays findable) until it is handed out again;
- a sequence references the blocks of its table from ``num_released_blocks`` on. With a sliding window
  in every layer (``window``), the blocks wholly before the window of the sequence's next query are
  released as the sequence advances, as vLLM does: a long sequence holds about window / block_size
  blocks. Their table entries stay where they are, so positions still index the table; the kernels read
  them at most in tiles straddling the window's start, masked (any block holds finite K/V).

A block's hash chains over every token before it: SHA-256 of the parent's digest and this block's
token ids, so equal hashes mean equal prefixes. A cryptographic hash because the cache is shared
between callers: with Python's 64-bit tuple hash, a caller could craft a prompt whose block collides
with another's (a known system prompt, say) and poison its outputs, the attack of vLLM's
CVE-2025-25183. It costs about 1 us per full block.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from pagoda_engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: int | None = None):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.window = window  # every layer's sliding window, or None (some layer sees the whole context)
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_blocks: dict[bytes, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of ``seq``, leaving at least one token to compute.

        The last token is always recomputed: its logits are needed to sample the next token.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, max_blocks)
        found = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block_id = self.cached_blocks.get(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_prefix: list[int] | None = None) -> bool:
        """Give ``seq`` blocks for ``num_new_tokens`` more tokens (after adopting ``cached_prefix``).

        ``seq.num_computed_tokens`` does not yet count the cached prefix: the scheduler advances it
        once the allocation succeeded. Returns False, changing nothing, when free blocks do not suffice.
        """
        cached_prefix = cached_prefix or []
        total = seq.num_computed_tokens + len(cached_prefix) * self.block_size + num_new_tokens
        num_new_blocks = self.blocks_needed(total) - len(seq.block_table) - len(cached_prefix)
        # Adopting a free cached block takes it out of the free queue too.
        num_free_adopted = sum(1 for b in cached_prefix if self.blocks[b].ref_count == 0)
        if num_new_blocks + num_free_adopted > self.num_free_blocks:
            return False
        for block_id in cached_prefix:
            self._take(block_id)
        seq.block_table.extend(cached_prefix)
        seq.block_table.extend(self._take_fresh() for _ in range(max(num_new_blocks, 0)))
        return True

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks: uncached ones to the front of the queue, to be handed out first; cached
        ones to the back, tail first, so that a prefix's head, which more prompts share, is evicted last."""
        for block_id in reversed(seq.block_table[seq.num_released_blocks:]):
            self._release(block_id)
        seq.block_table = []
        seq.num_published_blocks = 0
        seq.num_released_blocks = 0

    def release_outside_window(self, seq: Sequence, first_query: int) -> None:
        """Release ``seq``'s blocks wholly before the window of the query at ``first_query`` (its next step's
        first): that step and every later one attend to later positions only. The step in flight may still
        read them, which is safe: a block handed out now is written only by later steps."""
        if self.window is None:
            return
        num_outside = max(0, first_query - self.window + 1) // self.block_size
        for block_id in seq.block_table[seq.num_released_blocks:num_outside]:
            self._release(block_id)
        seq.num_released_blocks = max(seq.num_released_blocks, num_outside)

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Publish ``seq``'s newly completed full blocks in the prefix cache.

        A block counts once the step computing it is scheduled (later steps run after it on the device)
        and its tokens are known (a pending token is not, until its step finishes).
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        self._extend_hashes(seq, num_full)
        for i in range(seq.num_published_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            block_hash = seq.block_hashes[i]
            # Two sequences may compute the same block in the same step: the first one stays the
            # cached copy, the other block remains private and returns to the pool uncached.
            if block.hash is None and block_hash not in self.cached_blocks:
                block.hash = block_hash
                self.cached_blocks[block_hash] = block.block_id
        seq.num_published_blocks = max(seq.num_published_blocks, num_full)

    def unpublish(self, seq: Sequence, first_block: int) -> None:
        """Take ``seq``'s blocks from ``first_block`` on out of the prefix cache: the step that was to
        compute them never ran, so their KV may be missing or half written."""
        for block_id in seq.block_table[first_block:]:
            block = self.blocks[block_id]
            if block.hash is not None:
                del self.cached_blocks[block.hash]
                block.hash = None
        seq.num_published_blocks = min(seq.num_published_blocks, first_block)

    def check_invariants(self) -> None:
        for block in self.blocks:
            in_queue = block.block_id in self.free_queue
            assert (block.ref_count == 0) == in_queue, f"block {block.block_id} ref/free mismatch"
            assert block.ref_count >= 0
        for block_hash, block_id in self.cached_blocks.items():
            assert self.blocks[block_id].hash == block_hash

    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        size = self.block_size
        num_blocks = min(num_blocks, len(seq.token_ids) // size)  # a pending token has no id yet
        for i in range(len(seq.block_hashes), num_blocks):
            parent = seq.block_hashes[i - 1] if i else b""
            tokens = array("q", seq.token_ids[i * size : (i + 1) * size]).tobytes()
            seq.block_hashes.append(hashlib.sha256(parent + tokens).digest())

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block_id] = None
            if block.hash is None:
                self.free_queue.move_to_end(block_id, last=False)

    def _take_fresh(self) -> int:
        """The least recently freed block, its cached content evicted."""
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            del self.cached_blocks[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def _take(self, block_id: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1
        return block_id
