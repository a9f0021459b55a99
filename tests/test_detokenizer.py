"""IncrementalDetokenizer against a one-shot decode of the whole sequence: multi-byte characters split every
way, emoji (ZWJ sequences, skin tones, flags), CJK, combining marks and whitespace runs, fed in every chunking,
for a byte-level BPE and a SentencePiece-style (byte-fallback) tokenizer."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda_tokenizer.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from tests.tokenizer_helpers import (
    HARD_TEXTS,
    byte_level_tokenizer,
    byte_token_ids,
    sentencepiece_byte_ids,
    sentencepiece_tokenizer,
)

BYTE_LEVEL = byte_level_tokenizer()
SENTENCEPIECE = sentencepiece_tokenizer()

pieces = st.sampled_from(HARD_TEXTS + [" ", "\n", "  ", "é", "👍", "你"])
hard_text = st.lists(pieces, min_size=1, max_size=6).map("".join)
any_text = st.one_of(hard_text, st.text(min_size=1, max_size=40))


def stream(tokenizer, token_ids, chunk_sizes, skip_special_tokens=True, context_ids=()):
    """Feed `token_ids` in chunks of the given sizes (cycled); return the deltas, the flush last."""
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens, context_ids)
    deltas, position, sizes = [], 0, list(chunk_sizes) or [1]
    while position < len(token_ids):
        size = sizes[len(deltas) % len(sizes)]
        deltas.append(detokenizer.add(token_ids[position : position + size]))
        position += size
    deltas.append(detokenizer.flush())
    return deltas


def assert_streams_like_one_shot(tokenizer, token_ids, chunk_sizes, skip_special_tokens=True):
    expected = tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
    deltas = stream(tokenizer, token_ids, chunk_sizes, skip_special_tokens)
    assert "".join(deltas) == expected
    if REPLACEMENT_CHAR not in expected:
        # Never half a character, and never text that is later taken back.
        assert not any(REPLACEMENT_CHAR in d for d in deltas)
        emitted = ""
        for delta in deltas:
            emitted += delta
            assert expected.startswith(emitted)


chunkings = st.lists(st.integers(1, 4), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(text=any_text, chunk_sizes=chunkings)
def test_byte_level_encodings(text, chunk_sizes):
    assert_streams_like_one_shot(BYTE_LEVEL, BYTE_LEVEL.encode(text).ids, chunk_sizes)


@settings(max_examples=150, deadline=None)
@given(text=any_text, chunk_sizes=chunkings)
def test_byte_level_one_token_per_byte(text, chunk_sizes):
    """Every multi-byte character split at every byte boundary."""
    assert_streams_like_one_shot(BYTE_LEVEL, byte_token_ids(BYTE_LEVEL, text), chunk_sizes)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), chunk_sizes=chunkings, skip=st.booleans())
def test_byte_level_random_tokens_including_invalid_utf8_and_specials(seed, chunk_sizes, skip):
    rng = random.Random(seed)
    token_ids = [rng.randrange(BYTE_LEVEL.get_vocab_size()) for _ in range(rng.randint(1, 30))]
    assert_streams_like_one_shot(BYTE_LEVEL, token_ids, chunk_sizes, skip_special_tokens=skip)


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_every_split_point_of_each_hard_text(text):
    """All ways to cut the byte tokens in two, fed as two chunks."""
    token_ids = byte_token_ids(BYTE_LEVEL, text)
    for cut in range(1, len(token_ids)):
        assert "".join(stream(BYTE_LEVEL, token_ids, [cut, len(token_ids)])) == text


@settings(max_examples=150, deadline=None)
@given(text=any_text, chunk_sizes=chunkings)
def test_sentencepiece_encodings(text, chunk_sizes):
    """Leading spaces ("▁") and byte-fallback tokens for characters outside the vocabulary."""
    assert_streams_like_one_shot(SENTENCEPIECE, SENTENCEPIECE.encode(text).ids, chunk_sizes)


@settings(max_examples=150, deadline=None)
@given(words=st.lists(st.tuples(any_text, st.booleans()), min_size=1, max_size=6), chunk_sizes=chunkings)
def test_sentencepiece_pieces_mixed_with_byte_fallback(words, chunk_sizes):
    """Vocabulary pieces and characters spelled byte by byte, in any mix."""
    token_ids = []
    for text, as_bytes in words:
        token_ids += sentencepiece_byte_ids(SENTENCEPIECE, text) if as_bytes else SENTENCEPIECE.encode(text).ids
    assert_streams_like_one_shot(SENTENCEPIECE, token_ids, chunk_sizes)


def test_special_tokens_skipped_or_kept():
    im_end = BYTE_LEVEL.token_to_id("<|im_end|>")
    token_ids = BYTE_LEVEL.encode("Hi 👋").ids + [im_end]
    assert "".join(stream(BYTE_LEVEL, token_ids, [1])) == "Hi 👋"
    assert "".join(stream(BYTE_LEVEL, token_ids, [1], skip_special_tokens=False)) == "Hi 👋<|im_end|>"


def test_held_back_until_the_character_completes():
    detokenizer = IncrementalDetokenizer(BYTE_LEVEL)
    pieces = [detokenizer.add([token_id]) for token_id in byte_token_ids(BYTE_LEVEL, "a👍")]
    assert pieces == ["a", "", "", "", "👍"]


def test_prompt_context_keeps_the_first_leading_space():
    """A SentencePiece decoder strips the leading space of a text; with the prompt's last tokens as context,
    the first generated word keeps its space, as the text continues the prompt."""
    prompt_ids = SENTENCEPIECE.encode("Hello").ids
    output_ids = SENTENCEPIECE.encode("Hello world 你好").ids[len(prompt_ids) :]
    assert SENTENCEPIECE.decode(output_ids).startswith("world")
    deltas = stream(SENTENCEPIECE, output_ids, [1], context_ids=prompt_ids)
    assert "".join(deltas) == " world 你好"


def test_context_does_not_change_byte_level_output():
    prompt_ids = BYTE_LEVEL.encode("你好").ids
    output_ids = BYTE_LEVEL.encode(" 世界 👨‍👩‍👧").ids
    assert "".join(stream(BYTE_LEVEL, output_ids, [1], context_ids=prompt_ids)) == BYTE_LEVEL.decode(output_ids)
