"""The offline API: ``LLM(model_dir).generate(prompts, sampling_params)``, as in nano-vllm and vLLM."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from pagoda_engine.config import EngineConfig
from pagoda_engine.engine import LLMEngine, SequenceOutput
from pagoda_engine.sampling_params import SamplingParams
from pagoda_engine.sequence import FinishReason, TokenLogprobs

Prompt = str | list[int]


@dataclass
class CompletionOutput:
    """One sample of a request."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    # With SamplingParams.prompt_logprobs: entry i is prompt_token_ids[i + 1]'s (logprob, top alternatives),
    # given the tokens before it; the first prompt token has none (vLLM puts None there; we start after it).
    prompt_logprobs: list[TokenLogprobs] | None = None
    # Seconds from arrival: to the first output token, and to the last.
    time_to_first_token: float | None = None
    latency: float | None = None


class LLM:
    def __init__(self, model: str, **config):
        self.engine = LLMEngine(EngineConfig(model=str(model), **config))
        self.tokenizer = _load_tokenizer(Path(self.engine.config.model))
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (a single-process engine needs no closing)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def generate(
        self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run every prompt to completion; returns one RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        # Every prompt is checked before any is queued, so a bad one leaves nothing behind in the engine.
        requests = []
        for prompt, p in zip(prompts, params_list, strict=True):
            request_id, token_ids = f"offline-{next(self._ids)}", self._encode(prompt)
            self.engine.validate(request_id, token_ids, p)
            requests.append((request_id, token_ids, p))
        results = {rid: RequestOutput(rid, ids, [CompletionOutput(i) for i in range(p.n)]) for rid, ids, p in requests}
        try:
            for request_id, token_ids, p in requests:
                self.engine.add_request(request_id, token_ids, p)
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    self._collect(results[out.request_id], out)
        finally:  # an error or Ctrl-C part-way: the next call must not receive this call's requests
            for request_id in results:
                self.engine.abort_request(request_id)
        self._finalise(results.values())
        return list(results.values())

    def _encode(self, prompt: Prompt) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer.json in the model directory; pass token ids")
        return self.tokenizer.encode(prompt).ids

    def _collect(self, result: RequestOutput, out: SequenceOutput) -> None:
        completion = result.outputs[out.index]
        completion.token_ids.extend(out.token_ids)
        if out.logprobs is not None:
            completion.logprobs = completion.logprobs or []
            completion.logprobs.extend(out.logprobs)
        completion.finish_reason = out.finish_reason
        if out.prompt_logprobs is not None:
            result.prompt_logprobs = out.prompt_logprobs
        result.num_cached_tokens = max(result.num_cached_tokens, out.num_cached_tokens)
        if result.time_to_first_token is None and out.first_token_time is not None:
            result.time_to_first_token = out.first_token_time - out.arrival_time
        if out.finish_time is not None:
            result.latency = max(result.latency or 0.0, out.finish_time - out.arrival_time)

    def _finalise(self, results) -> None:
        if self.tokenizer is None:
            return
        for result in results:
            for completion in result.outputs:
                completion.text = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def _load_tokenizer(model_dir: Path):
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))
