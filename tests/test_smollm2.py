"""Real weights: the converted SmolLM2-135M-Instruct, greedy, against transformers token for token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pagoda_engine import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
]


@pytest.fixture(scope="module")
def chat_prompts(smollm2_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        for q in QUESTIONS
    ]


def test_greedy_chat_matches_transformers_and_reads_as_english(smollm2_dir, chat_prompts):
    from transformers import AutoModelForCausalLM

    params = SamplingParams(temperature=0.0, max_tokens=32)
    llm = LLM(smollm2_dir, device="cpu", dtype="float32", num_kv_blocks=512)
    outputs = llm.generate(chat_prompts, params)

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    eos = json.loads((smollm2_dir / "config.json").read_text())["eos_token_id"]
    for prompt, out in zip(chat_prompts, outputs, strict=True):
        ids = torch.tensor([prompt])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref

    answer = outputs[0].outputs[0].text
    assert "Paris" in answer
    words = " ".join(o.outputs[0].text for o in outputs).lower().split()
    assert sum(w in {"the", "a", "is", "of", "and", "sea", "sky"} for w in words) >= 5


def test_readme_offline_example_runs(smollm2_dir, capsys):
    """The README's offline-API example, pointed at the converted model, runs and prints both samples."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## The engine in-process (offline API)", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"~/.cache/pagoda/models/SmolLM2-135M-Instruct"', repr(str(smollm2_dir)))
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("Paris" in line for line in lines) and sum("FinishReason.LENGTH" in line for line in lines) == 2
