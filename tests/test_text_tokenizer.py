"""TextTokenizer against transformers' AutoTokenizer on the same directory (special tokens, BOS/EOS added or
not, the chat template's source), and TokenizerConfig's flags and PAGODA_* variables."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, processors

from pagoda_tokenizer.chat_template import ChatTemplate
from pagoda_tokenizer.config import TokenizerConfig
from pagoda_tokenizer.tokenizer import TextTokenizer
from tests.tokenizer_helpers import (
    CHATML_TEMPLATE,
    HARD_TEXTS,
    byte_level_tokenizer_json,
    sentencepiece_tokenizer_json,
    write_tokenizer_dir,
)

transformers = pytest.importorskip("transformers")


def assert_encodes_like_transformers(model_dir, texts=HARD_TEXTS):
    ours = TextTokenizer.from_dir(model_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    for text in texts:
        for add in (True, False):
            assert ours.encode(text, add) == theirs.encode(text, add_special_tokens=add), (text, add)
        ids = ours.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip)
    return ours


def with_post_processor(tokenizer_json: str, single: str) -> str:
    tokenizer = Tokenizer.from_str(tokenizer_json)
    specials = [(token, tokenizer.token_to_id(token)) for token in ("<s>", "</s>")]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=f"{single} $B:1",
                                                             special_tokens=specials)
    return tokenizer.to_str()


@pytest.mark.parametrize("single", ["<s> $A", "$A", "<s> $A </s>"])
def test_post_processor_decides_bos_and_eos(tmp_path, single):
    """As in transformers v5, tokenizer.json's post-processor adds BOS/EOS; tokenizer_config's add_bos_token
    is ignored when there is a tokenizer.json."""
    tokenizer_json = with_post_processor(sentencepiece_tokenizer_json(), single)
    model_dir = write_tokenizer_dir(tmp_path, tokenizer_json, None, bos_token="<s>", eos_token="</s>",
                                    unk_token="<unk>", pad_token=None, add_bos_token="<s>" not in single)
    ours = assert_encodes_like_transformers(model_dir)
    ids = ours.encode("Hello")
    assert (ids[0] == ours.backend.token_to_id("<s>")) is ("<s>" in single)
    assert (ids[-1] == ours.backend.token_to_id("</s>")) is ("</s>" in single)
    specials = {ours.backend.token_to_id("<s>"), ours.backend.token_to_id("</s>")}
    assert ours.encode("Hello", add_special_tokens=False) == [i for i in ids if i not in specials]
    assert ours.bos_token == "<s>" and ours.chat_template is None


def test_byte_level_without_bos(tmp_path):
    model_dir = write_tokenizer_dir(tmp_path, byte_level_tokenizer_json())
    ours = assert_encodes_like_transformers(model_dir, HARD_TEXTS + ["<|im_start|>user\nhi<|im_end|>"])
    assert ours.encode("<|im_start|>")[0] == ours.backend.token_to_id("<|im_start|>")
    ids = ours.encode("Hello world")
    assert ours.tokens(ids) == transformers.AutoTokenizer.from_pretrained(str(model_dir)).convert_ids_to_tokens(ids)
    assert "Ġ" in "".join(ours.tokens(ids))
    assert ours.bos_token is None and ours.special_tokens["eos_token"] == "<|im_end|>"


def test_chat_template_sources(tmp_path):
    """chat_template.jinja wins over tokenizer_config's entry, which may be a list of named templates."""
    listed = write_tokenizer_dir(tmp_path / "listed", byte_level_tokenizer_json(),
                                 [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "D"}])
    assert TextTokenizer.from_dir(listed).chat_template == "D"
    (listed / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    assert TextTokenizer.from_dir(listed).chat_template == CHATML_TEMPLATE


def test_special_tokens_as_added_token_dicts(tmp_path):
    model_dir = write_tokenizer_dir(tmp_path, byte_level_tokenizer_json(),
                                    eos_token={"content": "<|im_end|>", "special": True, "__type": "AddedToken"})
    assert TextTokenizer.from_dir(model_dir).special_tokens["eos_token"] == "<|im_end|>"


def test_smollm2_like_transformers(smollm2_dir):
    ours = assert_encodes_like_transformers(smollm2_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
                {"role": "user", "content": "你好 👋"}]
    rendered = ChatTemplate(ours.chat_template, ours.special_tokens).render(messages, True)
    assert rendered == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.encode(rendered, False) == theirs.apply_chat_template(messages, add_generation_prompt=True,
                                                                     return_dict=False)


def test_config_from_flags_then_environment_then_defaults():
    env = {"PAGODA_ENGINES": "a:1, b:2", "PAGODA_PORT": "7000", "PAGODA_MODEL": "/env/model"}
    config = TokenizerConfig.from_args(["--port", "7001", "--affinity-max-extra-load", "3"], env)
    assert config.model == "/env/model" and config.engines == ["a:1", "b:2"]
    assert (config.port, config.affinity_max_extra_load, config.max_stop_strings) == (7001, 3, 16)
    with pytest.raises(SystemExit):
        TokenizerConfig.from_args([], {})  # --model is required
    with pytest.raises(SystemExit):  # out of range: a usage error, as on the engine, not a traceback
        TokenizerConfig.from_args(["--model", "m", "--load-poll-interval-s", "0"], {})

