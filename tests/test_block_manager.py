"""BlockManager: allocation accounting, prefix-cache hits, LRU eviction of freed cached blocks, and the release
of blocks behind a sliding window."""

from pagoda_engine.block_manager import BlockManager
from pagoda_engine.sampling_params import SamplingParams
from pagoda_engine.sequence import Sequence


def make_seq(tokens: list[int]) -> Sequence:
    return Sequence("r", tokens, SamplingParams(), seed=0, stop_ids=frozenset())


def compute(bm: BlockManager, seq: Sequence) -> None:
    """Admit ``seq`` as the scheduler would and mark its whole prompt computed."""
    cached = bm.find_cached_prefix(seq)
    assert bm.allocate(seq, seq.num_tokens - len(cached) * bm.block_size, cached)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_computed_blocks(seq)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    seqs = [make_seq(list(range(i, i + 9))) for i in range(3)]
    for seq in seqs:
        compute(bm, seq)
        assert len(seq.block_table) == 3
    assert bm.num_free_blocks == 1
    for seq in seqs:
        bm.free(seq)
    assert bm.num_free_blocks == 10
    bm.check_invariants()


def test_allocate_failure_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(list(range(12)))
    assert not bm.allocate(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2
    bm.check_invariants()


def test_prefix_hit_reuses_full_blocks_and_leaves_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = make_seq(list(range(10)))
    compute(bm, first)
    # Same first 9 tokens: two full blocks (8 tokens) are shared.
    second = make_seq(list(range(9)) + [99])
    assert bm.find_cached_prefix(second) == first.block_table[:2]
    # Exactly 8 tokens: only one block may be reused, the last token must be computed.
    third = make_seq(list(range(8)))
    assert bm.find_cached_prefix(third) == first.block_table[:1]
    # A different first block breaks the chain, even if later blocks match.
    fourth = make_seq([7] + list(range(1, 10)))
    assert bm.find_cached_prefix(fourth) == []


def test_shared_blocks_are_reference_counted():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(list(range(9))), make_seq(list(range(9)))
    compute(bm, a)
    compute(bm, b)
    assert a.block_table[:2] == b.block_table[:2] and a.block_table[2] != b.block_table[2]
    assert bm.num_free_blocks == 8 - 4
    bm.free(a)
    assert bm.num_free_blocks == 8 - 3
    bm.free(b)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_freed_cached_blocks_stay_findable_until_evicted_lru_after_uncached_ones():
    bm = BlockManager(num_blocks=6, block_size=4)
    old, new = make_seq(list(range(100, 109))), make_seq(list(range(200, 209)))
    compute(bm, old)
    compute(bm, new)
    bm.free(old)
    bm.free(new)
    assert len(bm.find_cached_prefix(make_seq(list(range(100, 109))))) == 2
    # Taking three blocks hands out the two partial tail blocks first (nothing in them can be reused), then
    # the cached block freed longest ago: ``old``'s second. Its first block, which more prompts would share,
    # and all of ``new`` stay findable.
    filler = make_seq(list(range(12)))
    assert bm.allocate(filler, 12)
    assert len(bm.find_cached_prefix(make_seq(list(range(100, 109))))) == 1
    assert len(bm.find_cached_prefix(make_seq(list(range(200, 209))))) == 2
    assert bm.allocate(make_seq(list(range(300, 304))), 4)  # the next eviction: old's first block
    assert bm.find_cached_prefix(make_seq(list(range(100, 109)))) == []
    bm.check_invariants()


def test_prefix_caching_off_finds_nothing():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_seq(list(range(9)))
    compute(bm, a)
    assert bm.find_cached_prefix(make_seq(list(range(9)))) == []
    assert bm.cached_blocks == {}


def test_blocks_behind_every_layers_window_are_released_and_stay_findable():
    """Window 8, blocks of 4: a query at position 13 sees 6..13, so block 0 (0..3) is released, block 1 kept."""
    bm = BlockManager(num_blocks=10, block_size=4, window=8)
    seq = make_seq(list(range(18)))
    compute(bm, seq)
    table = list(seq.block_table)
    bm.release_outside_window(seq, first_query=13)
    assert seq.num_released_blocks == 1 and seq.block_table == table  # entries stay, as positions
    assert bm.num_free_blocks == 10 - 5 + 1
    bm.check_invariants()
    bm.release_outside_window(seq, first_query=11)  # an earlier query releases nothing back
    assert seq.num_released_blocks == 1
    # A new prompt with the same head finds the released block, still cached.
    other = make_seq(list(range(18)))
    assert bm.find_cached_prefix(other)[:1] == table[:1]
    bm.free(seq)
    assert bm.num_free_blocks == 10 and seq.num_released_blocks == 0
    bm.check_invariants()


def test_no_window_releases_nothing():
    bm = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(list(range(18)))
    compute(bm, seq)
    bm.release_outside_window(seq, first_query=17)
    assert seq.num_released_blocks == 0 and bm.num_free_blocks == 5
