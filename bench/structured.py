"""Structured output's cost: the same batch as free text and held to a regex, a JSON schema and any JSON object.

The model is SmolLM2-135M's shape with dummy weights (``--model``: its config.json, which bench/configs ships;
``--tokenizer``: a directory with its tokenizer.json, which the grammars read). Random weights sampled at
temperature 1 walk each grammar through many states, which stresses the masks more than a trained model does.
Each structured run goes twice: cold (each DFA state's mask is built the first time a sample reaches it, about
a millisecond of host time over 49K tokens) and warm (the masks cached by the first run). ms/step is the wall
time over the longest sample's length: grammar rows end early, so tokens/s alone mixes their cost with a batch
that thins out.

    python bench/structured.py --dtype bfloat16 --out bench/results/structured.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from random import Random

import torch

from pagoda_engine import LLM, SamplingParams
from pagoda_engine.sampling_params import StructuredOutput

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "London", "Tokyo"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["name", "age", "city"],
}
SPECS = {
    "free text": None,
    "regex": StructuredOutput(regex=r"[A-Z][a-z]{1,12}( [a-z]{1,12}){3,8}[.!?]"),
    "json_schema": StructuredOutput(json_schema=PERSON),
    "json_object": StructuredOutput(json_object=True),
}


def model_dir(model: Path, tokenizer_dir: Path) -> Path:
    """A directory of links to the model's files and the tokenizer's (the engine reads tokenizer.json there)."""
    path = Path(tempfile.mkdtemp(prefix="pagoda-structured-"))
    for source in (model, tokenizer_dir):
        for file in source.iterdir():
            (path / file.name).unlink(missing_ok=True)
            (path / file.name).symlink_to(file.resolve())
    return path


def run(llm: LLM, spec: StructuredOutput | None, args) -> dict:
    rng = Random(0)
    vocab = llm.engine.model_config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(args.num_seqs)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.max_tokens, structured_output=spec)
              for i in range(args.num_seqs)]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    tokens = sum(lengths)
    return {"output_tokens": tokens, "seconds": round(elapsed, 3), "output_tokens_per_s": round(tokens / elapsed, 1),
            "longest_output": max(lengths), "ms_per_step": round(1000 * elapsed / max(lengths), 3),
            "finished_by_grammar": sum(o.outputs[0].finish_reason.value == "stop" for o in outputs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path(__file__).parent / "configs" / "smollm2-135m"))
    parser.add_argument("--tokenizer", default=str(Path(__file__).parent.parent / ".carry" / "smollm2-tokenizer"))
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "structured.json"))
    args = parser.parse_args()

    llm = LLM(str(model_dir(Path(args.model), Path(args.tokenizer))), load_format=args.load_format,
              device=args.device, dtype=args.dtype, max_model_len=args.max_model_len)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8))  # warm-up
    runs = {}
    for name, spec in SPECS.items():
        runs[name] = run(llm, spec, args)
        if spec is not None:
            runs[f"{name} (warm)"] = run(llm, spec, args)
    llm.close()
    print(f"| {'output':<20} | {'seqs':>5} | {'out tokens':>10} | {'time s':>7} | {'tok/s':>9} | {'ms/step':>8} "
          f"| {'grammar end':>11} |")
    print(f"|{'-' * 22}|{'-' * 7}|{'-' * 12}|{'-' * 9}|{'-' * 11}|{'-' * 10}|{'-' * 13}|")
    for name, r in runs.items():
        print(f"| {name:<20} | {args.num_seqs:>5} | {r['output_tokens']:>10} | {r['seconds']:>7.2f} "
              f"| {r['output_tokens_per_s']:>9.0f} | {r['ms_per_step']:>8.2f} | {r['finished_by_grammar']:>11} |")
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "model": args.model, "num_seqs": args.num_seqs, "max_tokens": args.max_tokens, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
