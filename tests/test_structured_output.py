"""Structured output (regex, JSON schema, choice, JSON object) through the token masks, the sampler, the
engine and both services.

The regex compiler and the JSON-schema translation have tests of their own (test_structured_regex.py,
test_structured_json_schema.py); here: the token bytes read from tokenizer.json, the masks against a
token-by-token walk, the sampler's bit mask against a dense one, and SmolLM2-135M-Instruct's outputs, which
must match what was asked for, with greedy, seeded, n > 1, preempted and served requests.
"""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest
import torch

from pagoda_engine import LLM, SamplingParams
from pagoda_engine.layers.sampler import apply_token_bitmask
from pagoda_engine.sampling_params import InvalidRequestError, StructuredOutput
from pagoda_engine.sequence import FinishReason
from pagoda_engine.structured_output.compiler import GrammarCompiler, compile_dfa
from pagoda_engine.structured_output.grammar import TokenGrammar
from pagoda_engine.structured_output.vocabulary import TokenVocabulary, read_token_bytes
from tests.tokenizer_helpers import HARD_TEXTS, byte_level_tokenizer_json, sentencepiece_tokenizer_json

pytestmark = pytest.mark.timeout(300)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "city": {"enum": ["Paris", "London", "Tokyo"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
        "email": {"type": "string", "format": "email"},
    },
    "required": ["name", "age", "city"],
}


def check_person(value: dict) -> None:
    assert set(value) <= set(PERSON["properties"]) and {"name", "age", "city"} <= set(value), value
    assert isinstance(value["name"], str) and len(value["name"]) <= 24
    assert isinstance(value["age"], int) and value["city"] in ("Paris", "London", "Tokyo")
    hobbies = value.get("hobbies", [])
    assert len(hobbies) <= 3 and all(isinstance(h, str) and len(h) <= 16 for h in hobbies)


def chat_prompt(llm: LLM, question: str) -> list[int]:
    return llm.tokenizer.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n").ids


@pytest.fixture(scope="module")
def llm(smollm2_dir) -> LLM:
    return LLM(str(smollm2_dir), device="cpu", dtype="float32", cpu_kv_cache_gib=0.2)


# ---- token bytes ----


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_token_bytes_spell_what_the_tokenizer_encodes(kind, tmp_path):
    from tokenizers import Tokenizer

    text_json = byte_level_tokenizer_json() if kind == "byte_level" else sentencepiece_tokenizer_json()
    (tmp_path / "tokenizer.json").write_text(text_json, encoding="utf-8")
    tokenizer = Tokenizer.from_str(text_json)
    token_bytes = read_token_bytes(tmp_path / "tokenizer.json", tokenizer.get_vocab_size())
    for text in HARD_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        # SentencePiece gives a text that does not start with a space one ("▁"), which decoding strips.
        prefix = "" if kind == "byte_level" or text.startswith(" ") else " "
        expected = (prefix + text).encode()
        assert b"".join(token_bytes[i] for i in ids) == expected
    specials = [tokenizer.token_to_id(t) for t in ("<|im_end|>", "</s>") if tokenizer.token_to_id(t) is not None]
    assert specials and all(token_bytes[i] is None for i in specials)


def test_smollm2_token_bytes(smollm2_dir, llm):
    token_bytes = read_token_bytes(smollm2_dir / "tokenizer.json", 49152)
    for text in [*HARD_TEXTS, '{"name": "Ada", "age": 36}']:
        ids = llm.tokenizer.encode(text, add_special_tokens=False).ids
        assert b"".join(token_bytes[i] for i in ids) == text.encode()
    assert token_bytes[2] is None and token_bytes[0] is None  # <|im_end|>, <|endoftext|>
    single_bytes = {b for b in token_bytes if b is not None and len(b) == 1}
    assert {bytes([byte]) for byte in range(0x20, 0x7F)} <= single_bytes  # any ASCII text can be spelled


def test_a_model_without_tokenizer_json_refuses_structured_output(tiny_model_dirs):
    llm = LLM(str(tiny_model_dirs["llama"]), device="cpu", dtype="float32", cpu_kv_cache_gib=0.05)
    with pytest.raises(InvalidRequestError, match="tokenizer.json"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, structured_output=StructuredOutput(regex="a+")))
    assert not llm.engine.requests and llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_a_broken_tokenizer_json_is_an_invalid_request(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"vocab": {"a": "zero"}}, "decoder": {"type": "ByteLevel"}}')
    with pytest.raises(InvalidRequestError, match="cannot read the token bytes"):
        read_token_bytes(tmp_path / "tokenizer.json", 10)


def test_a_tokenizer_without_byte_spellings_refuses_structured_output_only(tiny_model_dirs, tmp_path, caplog):
    """A WordPiece tokenizer (BERT's) does not say which bytes its tokens add: the engine still serves."""
    from tokenizers import Tokenizer, decoders, models

    for file in tiny_model_dirs["llama"].iterdir():
        (tmp_path / file.name).symlink_to(file)
    wordpiece = Tokenizer(models.WordPiece({f"w{i}": i for i in range(256)}, unk_token="w0"))
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.save(str(tmp_path / "tokenizer.json"))
    GrammarCompiler(tmp_path, 256, frozenset({2})).preload()  # what the served engine does before serving
    assert "structured output is unavailable" in caplog.text
    llm = LLM(str(tmp_path), device="cpu", dtype="float32", cpu_kv_cache_gib=0.05)
    with pytest.raises(InvalidRequestError, match="not byte-level or SentencePiece"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, structured_output=StructuredOutput(regex="a+")))
    assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4))[0].outputs[0].token_ids) > 0


# ---- masks ----


def test_masks_agree_with_walking_each_token(smollm2_dir):
    vocabulary = TokenVocabulary.from_model_dir(smollm2_dir, 49152, frozenset({2}))
    spec = StructuredOutput(json_schema=json.dumps(PERSON))
    grammar = TokenGrammar(compile_dfa(spec), vocabulary)
    dfa = grammar.dfa
    instance = '{"name": "Ada", "age": 36, "city": "Paris", "hobbies": ["chess"]}'
    for cut in (0, 1, 2, 9, 13, len(instance) - 1, len(instance)):
        state = dfa.walk(0, instance[:cut].encode())
        assert state >= 0, instance[:cut]
        bits = np.unpackbits(grammar.allowed_words(state).view(np.uint8), bitorder="little")[:49152].astype(bool)
        expected = np.array([b is not None and dfa.walk(state, b) != -1 for b in vocabulary.token_bytes])
        expected[2] = bool(dfa.accepting[state])
        np.testing.assert_array_equal(bits, expected)
        assert grammar.is_complete(state) == (cut == len(instance))


def test_a_compiled_dfa_travels_to_the_engine_core_compactly():
    """The server ships each request's DFA to the engine core: its byte table, once expanded, stays behind."""
    dfa = compile_dfa(StructuredOutput(json_schema=json.dumps(PERSON)))
    instance = b'{"name": "Ada", "age": 36, "city": "Paris"}'
    end = dfa.walk(0, instance)  # expands the table
    shipped = pickle.dumps(dfa, protocol=pickle.HIGHEST_PROTOCOL)
    assert len(shipped) < dfa.transitions.nbytes / 4
    arrived = pickle.loads(shipped)
    assert "transitions" not in arrived.__dict__ and arrived.walk(0, instance) == end and arrived.accepting[end]


def test_token_bitmask_matches_a_dense_mask():
    torch.manual_seed(0)
    vocab, rows = 1000, torch.tensor([0, 3, 4])
    logits = torch.randn(6, vocab)
    dense = torch.rand(len(rows), vocab) < 0.3
    words = np.stack([np.packbits(np.pad(row.numpy(), (0, 1024 - vocab)), bitorder="little").view(np.int64)
                      for row in dense])
    masked = apply_token_bitmask(logits, rows, torch.from_numpy(words))
    expected = logits.clone()
    expected[rows] = logits[rows].masked_fill(~dense, float("-inf"))
    torch.testing.assert_close(masked, expected, rtol=0, atol=0)


# ---- SmolLM2 outputs ----


def test_regex_greedy_ends_at_the_match_without_eos(llm):
    pattern = r"\(\d{3}\) \d{3}-\d{4}"
    [out] = llm.generate([chat_prompt(llm, "Write a phone number.")], SamplingParams(
        temperature=0.0, max_tokens=40, structured_output=StructuredOutput(regex=pattern)))
    sample = out.outputs[0]
    assert re.fullmatch(pattern, sample.text), sample.text
    assert sample.finish_reason is FinishReason.STOP and 2 not in sample.token_ids


def test_choice_picks_the_answer(llm):
    [out] = llm.generate([chat_prompt(llm, "What is the capital of France? Answer with one word.")], SamplingParams(
        temperature=0.0, max_tokens=10, structured_output=StructuredOutput(choice=("London", "Paris", "Berlin"))))
    assert out.outputs[0].text == "Paris"


def test_json_schema_samples_are_instances(llm):
    params = SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=160,
                            structured_output=StructuredOutput(json_schema=PERSON))
    [out] = llm.generate([chat_prompt(llm, "Describe a person as JSON.")], params)
    for sample in out.outputs:
        assert sample.finish_reason is FinishReason.STOP, sample.text
        check_person(json.loads(sample.text))
    # Seeded: the same request draws the same samples.
    [again] = llm.generate([chat_prompt(llm, "Describe a person as JSON.")], params)
    assert [s.token_ids for s in again.outputs] == [s.token_ids for s in out.outputs]


def test_json_object_and_free_text_share_a_batch(llm):
    prompt = chat_prompt(llm, "Give me a JSON object describing a cat.")
    constrained = SamplingParams(temperature=0.0, max_tokens=120, structured_output=StructuredOutput(json_object=True))
    free = SamplingParams(temperature=0.0, max_tokens=30)
    [alone] = llm.generate([prompt], free)
    together = llm.generate([prompt, prompt], [constrained, free])
    assert isinstance(json.loads(together[0].outputs[0].text), dict), together[0].outputs[0].text
    assert together[1].outputs[0].token_ids == alone.outputs[0].token_ids


def test_preempted_grammars_resume_where_they_were(smollm2_dir, llm):
    """With a KV cache too small for the batch, sequences are preempted and recomputed mid-answer: their
    grammar state must survive, and the greedy answers equal those of a roomy cache."""
    prompts = [chat_prompt(llm, f"Describe person number {i} as JSON.") for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=80, structured_output=StructuredOutput(json_schema=PERSON))
    roomy = [o.outputs[0] for o in llm.generate(prompts, params)]
    tight = LLM(str(smollm2_dir), device="cpu", dtype="float32", num_kv_blocks=20, max_num_batched_tokens=64)
    cramped = [o.outputs[0] for o in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in cramped] == [o.token_ids for o in roomy]
    for sample in roomy:
        if sample.finish_reason is FinishReason.STOP:
            check_person(json.loads(sample.text))


@pytest.mark.parametrize(("spec", "match"), [
    (StructuredOutput(regex="(a"), "regex"),
    (StructuredOutput(regex=r"(a)\1"), "not supported"),
    (StructuredOutput(json_schema="{not json"), "JSON"),
    (StructuredOutput(json_schema='{"type": "frobnicate"}'), "frobnicate"),
    (StructuredOutput(), "exactly one"),
    (StructuredOutput(regex="a", choice=("b",)), "exactly one"),
    (StructuredOutput(choice=()), "choice"),
])
def test_bad_specs_are_refused_without_leaking(llm, spec, match):
    with pytest.raises(InvalidRequestError, match=match):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, structured_output=spec))
    assert not llm.engine.requests and llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_allowed_token_ids_and_structured_output_do_not_mix(llm):
    params = SamplingParams(max_tokens=4, allowed_token_ids=[5], structured_output=StructuredOutput(regex="a"))
    with pytest.raises(InvalidRequestError, match="allowed_token_ids"):
        llm.generate([[1, 2, 3]], params)
