"""Stop strings: matched across pieces and tokens, at the very start, with overlapping prefixes, several at
once; held back until they can no longer match; cut or kept; the completing token ends the output."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from pagoda.v1 import engine_pb2
from pagoda_tokenizer.sample_stream import SampleStream, TextOptions
from pagoda_tokenizer.stop_strings import StopStringMatcher
from pagoda_tokenizer.tokenizer import TextTokenizer
from tests.tokenizer_helpers import byte_level_tokenizer_json, byte_token_ids


def run(pieces, stops, include=False):
    """Push the pieces; return the emitted pieces and the stop string that matched."""
    matcher = StopStringMatcher(stops, include)
    emitted = []
    for piece in pieces:
        text, stop = matcher.push(piece)
        emitted.append(text)
        if stop is not None:
            return emitted, stop
    emitted.append(matcher.flush())
    return emitted, None


def test_split_across_pieces():
    emitted, stop = run(["Hel", "lo wo", "rld"], ["lo w"])
    assert "".join(emitted) == "Hel" and stop == "lo w"


def test_held_back_until_it_cannot_match():
    emitted, stop = run(["Obs", "erva", "tory"], ["Observation:"])
    assert emitted == ["", "", "Observatory", ""] and stop is None


def test_at_the_very_start():
    emitted, stop = run(["Hello", " there"], ["Hello"])
    assert emitted == [""] and stop == "Hello"


def test_overlapping_prefixes():
    emitted, stop = run(list("abcabcabd"), ["abcabd"])
    assert "".join(emitted) == "abc" and stop == "abcabd"


def test_several_at_once_the_first_completed_wins():
    assert run(["hello world"], ["world", "lo"]) == (["hel"], "lo")
    # Both complete at the same character: the one starting earlier (cutting more) wins.
    assert run(["xab"], ["b", "ab"]) == (["x"], "ab")
    assert run(["x", "a", "b"], ["b", "ab"]) == (["x", "", ""], "ab")


def test_no_match_may_end_in_a_piece_that_cannot_stop():
    matcher = StopStringMatcher(["ab", "xaby"])
    assert matcher.push("ab", can_stop=False) == ("", None)  # held: the start of a match, maybe
    assert matcher.push("c") == ("abc", None)  # its "ab" ended in a piece that could not stop
    assert matcher.push("xab", can_stop=False) == ("", None)
    assert matcher.push("c") == ("xabc", None)
    assert matcher.push("xa", can_stop=False) == ("", None)
    assert matcher.push("b") == ("x", "ab")  # a match may start in a piece that could not stop


def test_include_stop_string_in_output():
    emitted, stop = run(["The answer: 4", "2.\n\nQ", "uestion"], ["\n\nQuestion"], include=True)
    assert "".join(emitted) == "The answer: 42.\n\nQuestion" and stop == "\n\nQuestion"


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


def first_stop(text, stops):
    """Reference: the stop string complete first in `text`, and where it starts."""
    found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    return min(found)[1:] if found else None


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab c👍", max_size=30), stops=st.lists(st.text(alphabet="ab c👍", min_size=1,
       max_size=4), max_size=4), cuts=st.lists(st.integers(0, 30)), include=st.booleans())
def test_any_split_gives_the_one_shot_result(text, stops, cuts, include):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    emitted, stop = run(pieces, stops, include)
    match = first_stop(text, stops)
    if match is None:
        assert stop is None and "".join(emitted) == text
    else:
        start, expected_stop = match
        assert stop == expected_stop
        assert "".join(emitted) == text[: start + len(stop) if include else start]


# SampleStream: stop strings over real tokens, as the service runs them.

TOKENIZER = TextTokenizer(Tokenizer.from_str(byte_level_tokenizer_json()), {"eos_token": "<|im_end|>"})
IM_END = TOKENIZER.backend.token_to_id("<|im_end|>")


def engine_message(token_ids, finish=engine_pb2.FINISH_REASON_UNSPECIFIED, stop_token_id=None):
    message = engine_pb2.GenerateResponse(request_id="r", index=0, token_ids=token_ids, finish_reason=finish)
    if stop_token_id is not None:
        message.stop_token_id = stop_token_id
    if finish:
        message.usage.prompt_tokens, message.usage.cached_prompt_tokens = 3, 2
        message.usage.completion_tokens = 99
    return message


def feed(sample, messages):
    return [out for m in messages if (out := sample.on_engine_message(m)) is not None]


def sample_stream(min_tokens: int = 0, **options):
    return SampleStream(TOKENIZER, "r", 0, [], TextOptions(**options), min_tokens)


def test_stop_string_inside_a_multibyte_character_run():
    """"好世" is split byte by byte across tokens; the token holding its last byte ends the output."""
    token_ids = byte_token_ids(TOKENIZER.backend, "你好世界")
    sample = sample_stream(stop=("好世",))
    outs = feed(sample, [engine_message([t]) for t in token_ids])
    assert "".join(o.text for o in outs) == "你"
    assert [t for o in outs for t in o.token_ids] == token_ids[:9]  # 你 好 世: three bytes each
    assert sample.output_done and not sample.finished
    # Tokens the engine sends before the abort lands are dropped; its final message closes the sample.
    assert feed(sample, [engine_message(token_ids[9:])]) == []
    [last] = feed(sample, [engine_message([], finish=engine_pb2.FINISH_REASON_ABORT)])
    assert last.finish_reason == engine_pb2.FINISH_REASON_STOP and last.stop_string == "好世"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.cached_prompt_tokens) == (3, 9, 2)
    assert sample.finished


@pytest.mark.parametrize("one_per_message", [False, True])
def test_no_stop_string_ends_within_min_tokens(one_per_message):
    """As in vLLM: the first min_tokens tokens cannot complete a stop string, the next ones can."""
    token_ids = byte_token_ids(TOKENIZER.backend, "ab ab ab")  # one token per byte
    sample = sample_stream(min_tokens=4, stop=("ab",))
    messages = [engine_message([t]) for t in token_ids] if one_per_message else [engine_message(token_ids)]
    outs = feed(sample, messages)
    assert "".join(o.text for o in outs) == "ab " and sample.stop_string == "ab"
    assert sum(len(o.token_ids) for o in outs) == 5  # the fifth token completes the second "ab"


def test_stop_string_in_a_message_of_several_tokens_cuts_the_tokens():
    token_ids = TOKENIZER.encode("one two three four")
    sample = sample_stream(stop=("three",), include_stop_str_in_output=True)
    [out] = feed(sample, [engine_message(token_ids)])
    assert out.text == "one two three"
    assert TOKENIZER.decode(list(out.token_ids)).endswith("three") and len(out.token_ids) < len(token_ids)


def test_held_text_is_released_on_the_last_message():
    sample = sample_stream(stop=("STOP",))
    outs = feed(sample, [engine_message(TOKENIZER.encode("go ST")),
                         engine_message([IM_END], engine_pb2.FINISH_REASON_STOP, stop_token_id=IM_END)])
    assert [o.text for o in outs] == ["go ", "ST"]
    assert outs[-1].stop_token_id == IM_END and outs[-1].usage.completion_tokens == len(outs[0].token_ids) + 1


@pytest.mark.parametrize(("include", "expected"), [(False, "done"), (True, "done<|im_end|>")])
def test_stop_token_text_kept_only_when_asked(include, expected):
    sample = sample_stream(skip_special_tokens=False, include_stop_str_in_output=include)
    outs = feed(sample, [engine_message(TOKENIZER.encode("done") + [IM_END], engine_pb2.FINISH_REASON_STOP,
                                        stop_token_id=IM_END)])
    assert "".join(o.text for o in outs) == expected
    assert outs[-1].token_ids[-1] == IM_END
