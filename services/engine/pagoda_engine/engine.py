"""LLMEngine: the step-wise interface (add request, step, abort) the offline API and the service drive.

Not thread-safe: one thread owns an engine and calls it between steps.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

from pagoda_engine.block_manager import BlockManager
from pagoda_engine.config import EngineConfig
from pagoda_engine.distributed import tp_size
from pagoda_engine.model_config import ModelConfig
from pagoda_engine.model_runner import LaunchedStep, ModelRunner, resolve_device, resolve_dtype
from pagoda_engine.sampling_params import InvalidRequestError, SamplingParams
from pagoda_engine.scheduler import Scheduler
from pagoda_engine.sequence import FinishReason, Sequence, TokenLogprobs
from pagoda_engine.structured_output.compiler import GrammarCompiler
from pagoda_engine.structured_output.dfa import Dfa
from pagoda_engine.structured_output.grammar import GrammarMatcher
from pagoda_engine.tp_workers import TPWorkers

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class SequenceOutput:
    """What one step added to one sample of a request."""

    request_id: str
    index: int
    token_ids: list[int]
    # Per new token, when asked: (logprob of the chosen token, [(token id, logprob) of the top N]).
    logprobs: list[TokenLogprobs] | None
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    # time.monotonic() stamps of the sequence: arrival, first output token, finish (None until then).
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    # With the request's first token, when it asked for prompt_logprobs: one entry per prompt token from the
    # second on (the first has nothing before it), as ``logprobs``. None on every other output. That is sample
    # 0's first token, or, if sample 0 was aborted before it, the first token of a sample left (the first by
    # index, which took over the scoring).
    prompt_logprobs: list[TokenLogprobs] | None = None
    # With finish reason stop: the EOS or stop token id that ended the sample (None when its grammar ended it).
    stop_token_id: int | None = None


@dataclass(frozen=True)
class RequestLimits:
    """What a request must fit, known once the engine is built; checked wherever a request is admitted."""

    vocab_size: int
    max_model_len: int
    max_logprobs: int
    max_n: int
    eos_token_ids: frozenset[int]

    def stop_ids(self, params: SamplingParams) -> frozenset[int]:
        """The token ids that end a sample of ``params`` (and that ``min_tokens`` bans until then)."""
        ids = set(params.stop_token_ids) if params.ignore_eos else {*params.stop_token_ids, *self.eos_token_ids}
        return frozenset(t for t in ids if t < self.vocab_size)  # the others never come

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError with a message a user can act on."""
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty")
        self._check_in_vocabulary("prompt token id", prompt_token_ids)
        params.validate(self.max_logprobs, self.max_n)
        # Past the logits' width a flat index would land in the next row.
        self._check_in_vocabulary("logit_bias token id", params.logit_bias)
        self._check_in_vocabulary("allowed_token_ids id", params.allowed_token_ids)
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"max model length {self.max_model_len}"
            )
        if params.min_tokens and len(self.stop_ids(params)) == self.vocab_size:
            raise InvalidRequestError(f"min_tokens {params.min_tokens} would ban every token: the stop token ids "
                                      f"and EOS cover the whole vocabulary of {self.vocab_size}")
        allowed = params.allowed_token_ids
        if allowed and params.structured_output is not None:
            raise InvalidRequestError("allowed_token_ids and structured_output cannot be combined: the grammar "
                                      "says which tokens may come next")
        if params.min_tokens and allowed and self.stop_ids(params).issuperset(allowed):
            raise InvalidRequestError(f"min_tokens {params.min_tokens} would ban every token: each of the "
                                      "allowed_token_ids is EOS or a stop token id")

    def _check_in_vocabulary(self, what: str, token_ids: Iterable[int]) -> None:
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"{what} {bad} is outside the vocabulary [0, {self.vocab_size})")


def resolve_limits(config: EngineConfig, model_config: ModelConfig) -> EngineConfig:
    """``config`` with ``max_model_len`` and the step's token budget settled from the model.

    Settled before any rank builds its model runner: the memory-profiling pass runs a step of the full
    budget, in step on every rank. Without chunked prefill a whole prompt must fit one step, so the
    budget grows to ``max_model_len``. The KV cache may cap ``max_model_len`` further (ModelRunner).
    """
    limit = model_config.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > limit:
        # Positions past the rotary tables would read past their end (the Triton kernel has no mask).
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's {limit} positions "
                         "(max_position_embeddings)")
    max_model_len = config.max_model_len or limit
    budget = config.max_num_batched_tokens
    if not config.enable_chunked_prefill:
        budget = max(budget, max_model_len)
    return replace(config, max_model_len=max_model_len, max_num_batched_tokens=budget)


@dataclass
class EngineLoad:
    running: int
    waiting: int
    waiting_tokens: int
    kv_blocks_total: int
    kv_blocks_free: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    preemptions: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig):
        if tp_size() > 1:
            # The layers split over the process's default process group, whoever made it.
            raise RuntimeError(f"this process already belongs to a process group of {tp_size()} ranks (another "
                               "tensor-parallel engine still open?): close it before building an engine")
        self.model_config = ModelConfig.from_dir(config.model)
        self.config = config = resolve_limits(config, self.model_config)
        self.device = resolve_device(config.device, 0, config.tensor_parallel_size)
        self.dtype = resolve_dtype(config.dtype, self.model_config)
        torch.manual_seed(config.seed)
        # Ranks 1..N-1 start first: the model below is built for the process group they join.
        self.workers = TPWorkers(config, self.device) if config.tensor_parallel_size > 1 else None
        try:
            self.runner = ModelRunner(config, self.model_config, self.device, self.dtype, self.workers)
            if self.workers is not None:
                self.workers.wait_loaded()
            self.max_model_len = self._guarded(self.runner.setup_cache)  # collectives: a dead worker shows
        except BaseException:
            self.close()
            raise
        num_blocks = self.runner.num_kv_blocks
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                          self.model_config.uniform_sliding_window)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, config.enable_chunked_prefill)
        # No more logprobs than the vocabulary has (a topk past it fails), whatever --max-logprobs allows.
        max_logprobs = min(config.max_logprobs, self.model_config.vocab_size)
        self.limits = RequestLimits(self.model_config.vocab_size, self.max_model_len, max_logprobs, config.max_n,
                                    frozenset(self.model_config.eos_token_ids))
        self.requests: dict[str, list[Sequence]] = {}
        self.grammars = GrammarCompiler(config.model, self.model_config.vocab_size, self.limits.eos_token_ids)
        self._seeds = random.Random(config.seed)
        self._in_flight: LaunchedStep | None = None

    # ---- requests ----

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float | None = None,
        dfa: Dfa | None = None,
    ) -> None:
        """Queue a request; raises InvalidRequestError with a message a user can act on.

        ``dfa``: the request's structured output already compiled (by the gRPC service), or None to compile it.
        """
        self.validate(request_id, prompt_token_ids, params, dfa)
        spec = params.structured_output
        grammar = None if spec is None else self.grammars.grammar(spec, dfa)
        stop_ids = self.limits.stop_ids(params)
        base_seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        seqs = []
        for index in range(params.n):
            seed = base_seed if index == 0 else hash((base_seed, index)) & (2**63 - 1)
            seq = Sequence(request_id, prompt_token_ids, params, seed, stop_ids, index, arrival_time)
            seq.grammar = None if grammar is None else GrammarMatcher(grammar)
            # Later samples wait for sample 0 to compute the prompt: to find its blocks in the cache, and, when it
            # scores the prompt, so that one of them can take that over if sample 0 is aborted first.
            if index > 0 and (self.config.enable_prefix_caching or params.prompt_logprobs is not None):
                seq.wait_for = seqs[0]
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = seqs

    def validate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 dfa: Dfa | None = None) -> None:
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self.limits.check(prompt_token_ids, params)
        if params.structured_output is not None:  # compiled now, and cached for add_request
            self.grammars.grammar(params.structured_output, dfa)

    def abort_request(self, request_id: str, indices: Collection[int] = ()) -> list[SequenceOutput]:
        """Stop a request's samples (those of ``indices``; none given: all) at once and free their blocks;
        returns their final outputs (empty if unknown or already finished)."""
        seqs = self.requests.get(request_id)
        if seqs is None:
            return []
        live = [seq for seq in seqs if not seq.is_finished and (not indices or seq.index in indices)]
        self.scheduler.abort(live)
        self._hand_on_prompt_logprobs(seqs, live)
        self._forget_if_done(request_id)
        return [self._output(seq, [], None) for seq in live]

    def _hand_on_prompt_logprobs(self, seqs: list[Sequence], aborted: list[Sequence]) -> None:
        """A sample aborted before its first token, which would have carried the request's prompt logprobs,
        hands the entries on the host to the first sample left. That one scores the rest (those of the aborted
        sample's step in flight too, which are dropped) and sends them all with its own first token; the
        others now wait for it as they waited for sample 0. It can: until sample 0's first token is out, the
        others wait (add_request), so none has computed a prompt position without scoring it."""
        scorer = next((seq for seq in aborted if seq.prompt_logprobs is not None and not seq.num_output_tokens),
                      None)
        heir = next((seq for seq in seqs if not seq.is_finished), None)
        if scorer is None or heir is None:
            return
        self.scheduler.add_scoring(heir, scorer.prompt_logprobs)
        heir.wait_for = None
        for seq in seqs:
            if seq is not heir and not seq.is_finished:
                seq.wait_for = heir

    def has_unfinished_requests(self) -> bool:
        # A launched step's unfinished sequences are still running (or waiting, if preempted since).
        return self.scheduler.has_unfinished()

    # ---- the step ----

    def step(self) -> list[SequenceOutput]:
        """Launch the next step, then finish the previous one: returns the previous step's outputs.

        The host's bookkeeping for step N (its tokens, stop checks, outputs) runs while the device
        computes step N+1, whose decodes read their input tokens from step N's output on the device.
        Only a row with penalties or structured output makes the engine finish step N before it schedules
        step N+1.
        """
        if self.workers is not None:
            self.workers.check()
        outputs = []
        if self._in_flight is not None and self._in_flight.needs_tokens_before_next_step:
            outputs = self._finish(self._in_flight)
        batch = self.scheduler.schedule()
        try:
            launched = self._guarded(lambda: self.runner.launch(batch)) if batch.seqs else None
        except BaseException:
            # The scheduler counted the step as done; left so, a later prompt would reuse KV never written.
            self.scheduler.unschedule(batch)
            raise
        if self._in_flight is not None:
            outputs += self._finish(self._in_flight)
        self._in_flight = launched
        return outputs

    def _finish(self, step: LaunchedStep) -> list[SequenceOutput]:
        self._in_flight = None
        result = self._guarded(lambda: self.runner.finish(step))
        for seq, first, entries in result.prompt_logprobs:
            if not seq.is_finished:
                seq.add_prompt_logprobs(first, entries)
        # Requests aborted since the launch already had their final output from abort_request.
        live = [i for i, seq in enumerate(result.seqs) if not seq.is_finished]
        self.scheduler.update(step.batch, dict(zip((s.seq_id for s in result.seqs), result.token_ids, strict=True)))
        outputs = []
        for i in live:
            seq, logprobs = result.seqs[i], result.logprobs[i]
            output = self._output(seq, [result.token_ids[i]], None if logprobs is None else [logprobs])
            if seq.num_output_tokens == 1:  # the step sampling the first token ends the prompt's last chunk
                output.prompt_logprobs = seq.prompt_logprobs
            outputs.append(output)
            if seq.is_finished:
                self._forget_if_done(seq.request_id)
        return outputs

    def _guarded(self, run: Callable[[], T]) -> T:
        """``run()``; under tensor parallelism, a dead worker's error becomes WorkerDiedError."""
        return run() if self.workers is None else self.workers.run(run)

    def call_on_failure(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` called, from another thread, when the engine breaks between steps (a
        tensor-parallel worker exits); the next step() then raises WorkerDiedError."""
        if self.workers is not None:
            self.workers.on_exit = callback

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any, and leave their process group. Idempotent."""
        if self.workers is not None:
            self.workers.close()

    def get_load(self) -> EngineLoad:
        bm = self.block_manager
        return EngineLoad(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            waiting_tokens=self.scheduler.waiting_tokens,
            kv_blocks_total=bm.num_blocks,
            kv_blocks_free=bm.num_free_blocks,
            prefix_query_tokens=self.scheduler.prefix_query_tokens,
            prefix_hit_tokens=self.scheduler.prefix_hit_tokens,
            preemptions=self.scheduler.num_preemptions,
        )

    def _output(self, seq: Sequence, token_ids: list[int], logprobs) -> SequenceOutput:
        return SequenceOutput(
            request_id=seq.request_id,
            index=seq.index,
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            arrival_time=seq.arrival_time,
            first_token_time=seq.first_token_time,
            finish_time=seq.finish_time,
            stop_token_id=seq.stop_token_id,
        )

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self.requests.get(request_id)
        if seqs is not None and all(seq.is_finished for seq in seqs):
            del self.requests[request_id]
