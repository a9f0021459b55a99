"""ModelRunner: turns a ScheduledBatch into flat tensors, runs the model, samples on the device.

Per step it builds the inputs on the host with numpy as one flat int64 array, copies it to the device
once, runs the model (a captured CUDA graph for pure-decode steps), computes logits only for the
sequences that sample this step (and for the prompt positions of those asking for prompt logprobs,
prompt_logprobs.py), samples on the device and starts one asynchronous copy of the new token ids back
(``launch``); ``finish`` waits for that copy. A decode whose input token was drawn by
the previous launch and is not on the host yet reads it from that launch's output on the device.
Under tensor parallelism every rank holds a ModelRunner over its shard; rank 0 alone schedules and
samples, and the other ranks rebuild the same inputs from the flat array and its ``StepShape``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import numpy as np
import torch

from pagoda_engine.config import EngineConfig
from pagoda_engine.cuda_graph import DecodeGraphs
from pagoda_engine.distributed import min_over_ranks
from pagoda_engine.layers.attention import Attention, AttentionMetadata, select_backend
from pagoda_engine.layers.attention.metadata import longest_first
from pagoda_engine.layers.sampler import Sampler, SamplerOutput, SamplerRequest, SamplingMetadata
from pagoda_engine.model_config import ModelConfig
from pagoda_engine.models.loader import load_model
from pagoda_engine.prompt_logprobs import (
    NO_PROMPT_LOGPROBS,
    PromptLogprobsOutput,
    PromptLogprobsPlan,
    compute_prompt_logprobs,
    rows_per_slice,
)
from pagoda_engine.sampling_params import SamplingParams
from pagoda_engine.scheduler import ScheduledBatch
from pagoda_engine.sequence import Sequence, TokenLogprobs

if TYPE_CHECKING:
    from pagoda_engine.tp_workers import TPWorkers

logger = logging.getLogger(__name__)

T = TypeVar("T", SamplerOutput, PromptLogprobsOutput)

# One request of each kind whose logits reach a different variant of the draw kernel (_warm_up_sampling):
# filtered (float32, already divided by the temperature), plain (16-bit, divided as read) and penalised
# only (float32, divided as read). The first, with every filter on, is also the profiling pass's.
_WARM_UP_SAMPLING = (
    SamplingParams(top_k=50, top_p=0.9, repetition_penalty=1.1),
    SamplingParams(),
    SamplingParams(repetition_penalty=1.1),
)


@dataclass
class StepResult:
    """What one step produced for the sequences that sampled, in batch order."""

    seqs: list[Sequence]
    token_ids: list[int]
    # Per sampled sequence, when it asked for logprobs: (chosen logprob, [(token id, logprob), ...]).
    logprobs: list[TokenLogprobs | None]
    # Per sequence that scored prompt positions: (sequence, first position, its entries from there).
    prompt_logprobs: list[tuple[Sequence, int, list[TokenLogprobs]]] = field(default_factory=list)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str, rank: int = 0, world_size: int = 1) -> torch.device:
    """``auto`` is CUDA when present, else the CPU. Under tensor parallelism rank ``r`` takes GPU ``r``
    (CUDA_VISIBLE_DEVICES chooses which GPUs those are)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if world_size == 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"with tensor_parallel_size > 1 the device is 'auto' or 'cuda', not {name!r}: "
                         "choose the GPUs with CUDA_VISIBLE_DEVICES")
    if torch.cuda.device_count() < world_size:
        raise ValueError(f"tensor_parallel_size {world_size} needs {world_size} GPUs; "
                         f"{torch.cuda.device_count()} are visible")
    return torch.device("cuda", rank)


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type (EngineConfig.kv_cache_dtype)."""
    return model_dtype if name == "auto" else torch.float8_e4m3fn


def resolve_dtype(name: str, model_config: ModelConfig) -> torch.dtype:
    if name == "auto":
        return model_config.torch_dtype
    if name not in _DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


class StepShape(NamedTuple):
    """The sizes of one step's flat input array, and the scalars attention needs besides it.

    The array holds, in order: input ids, positions and slot mapping (``num_tokens`` each), query start
    locations (``num_seqs + 1``), sequence lengths (``num_seqs``), logits indices (``num_logits``), the
    block tables (``num_seqs * max_blocks``), then the rows scored for prompt logprobs and the prompt
    token each predicts (``num_prompt_logits`` each). This and the array are all a worker is sent per step.
    """

    num_tokens: int
    num_seqs: int
    num_logits: int
    max_blocks: int
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    num_prompt_logits: int
    prompt_num_top: int  # alternatives per scored row: the largest prompt_logprobs of the step
    # Rows per LM-head slice of them: rank 0's, so that every rank's vocabulary gathers pair up.
    prompt_slice_rows: int

    @property
    def flat_size(self) -> int:
        return (3 * self.num_tokens + 2 * self.num_seqs + 1 + self.num_logits + self.num_seqs * self.max_blocks
                + 2 * self.num_prompt_logits)


@dataclass
class LaunchedStep:
    """A step queued on the device; ``ModelRunner.finish`` waits for it and reads its tokens."""

    batch: ScheduledBatch
    sample_seqs: list[Sequence]
    # The sampler's output in host memory, filled by asynchronous copies (None when nothing samples).
    output: SamplerOutput | None
    prompt_plan: PromptLogprobsPlan
    # Likewise the prompt logprobs of the plan's rows (None when no row is scored).
    prompt_output: PromptLogprobsOutput | None
    copied: torch.cuda.Event | None  # recorded after those copies (None on the CPU, where there are none)

    @property
    def needs_tokens_before_next_step(self) -> bool:
        """A row with penalties or a grammar reads every token drawn so far: its next step waits for these."""
        return any(seq.params.reads_drawn_tokens for seq in self.sample_seqs)


@dataclass
class ModelInputs:
    shape: StepShape
    # The device copy of the flat array; every tensor below is a view of it.
    flat: torch.Tensor
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    # The rows scored for prompt logprobs and the token each predicts; None when none is.
    prompt_rows: torch.Tensor | None
    prompt_token_ids: torch.Tensor | None
    # Rank 0 only: the sequences that sample this step, in batch order, and the prompt logprobs' plan.
    sample_seqs: list[Sequence]
    prompt_plan: PromptLogprobsPlan | None = None


def inputs_from_flat(shape: StepShape, flat: torch.Tensor, query_start_loc_host: list[int] | None = None,
                     seq_lens_host: list[int] | None = None) -> ModelInputs:
    """Views of the flat device array laid out as ``StepShape`` describes."""
    t, b, p = shape.num_tokens, shape.num_seqs, shape.num_prompt_logits
    ends = [t, 2 * t, 3 * t, 3 * t + b + 1, 3 * t + 2 * b + 1, 3 * t + 2 * b + 1 + shape.num_logits]
    ends.append(ends[5] + b * shape.max_blocks)
    meta = AttentionMetadata(
        slot_mapping=flat[ends[1] : ends[2]],
        query_start_loc=flat[ends[2] : ends[3]].int(),
        seq_lens=flat[ends[3] : ends[4]].int(),
        block_tables=flat[ends[5] : ends[6]].view(b, shape.max_blocks).int(),
        num_decodes=shape.num_decodes,
        max_query_len=shape.max_query_len,
        max_seq_len=shape.max_seq_len,
        query_start_loc_host=query_start_loc_host,
        seq_lens_host=seq_lens_host,
    )
    prompt_rows, prompt_token_ids = flat[ends[6] : ends[6] + 2 * p].split(p) if p else (None, None)
    return ModelInputs(shape, flat, flat[: ends[0]], flat[ends[0] : ends[1]], meta, flat[ends[4] : ends[5]],
                       prompt_rows, prompt_token_ids, [])


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, device: torch.device, dtype: torch.dtype,
                 workers: TPWorkers | None = None):
        self.config = config
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype)
        self.block_size = config.block_size
        self.model = load_model(model_config, config.model, config.load_format, dtype, device, config.seed)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        backend = select_backend(config.attention_backend, device, config.batch_invariant)
        for layer in self.attention_layers:
            layer.backend = backend
        self.backend_name = backend.name
        self.sampler = Sampler()
        # Rows of the LM head per slice of prompt logprobs (rank 0's travel in each step's StepShape).
        self.prompt_slice_rows = rows_per_slice(model_config.vocab_size)
        self.num_kv_blocks = 0
        self.kv_cache: torch.Tensor | None = None
        self.graphs: DecodeGraphs | None = None
        # The latest launch's sampled tokens (on the device) and each sampling sequence's row in them:
        # the next step's pending input tokens are read from there.
        self._last_sampled: torch.Tensor | None = None
        self._last_rows: dict[int, int] = {}
        # Rank 0 under tensor parallelism: the other ranks, sent every step's inputs.
        self.workers = workers

    # ---- start-up: KV cache sizing and CUDA graphs ----

    def setup_cache(self) -> int:
        """Size and bind the KV cache, capture the decode graphs; returns the longest sequence the engine
        takes (the configured or model limit, capped so that one sequence always fits in the cache).

        Every tensor-parallel rank runs this in step with the others: it contains collectives.
        """
        max_model_len = self.config.max_model_len  # settled by engine.resolve_limits
        num_blocks = self.allocate_kv_cache(max_model_len)
        if num_blocks * self.block_size < max_model_len:
            logger.warning("max_model_len %d capped at %d tokens: the KV cache holds no more", max_model_len,
                           num_blocks * self.block_size)
            max_model_len = num_blocks * self.block_size
        self.capture_cuda_graphs(max_model_len)
        return max_model_len

    def kv_bytes_per_block(self) -> int:
        layer = self.attention_layers[0]
        per_token = 2 * len(self.attention_layers) * layer.num_kv_heads * layer.head_dim
        return per_token * self.block_size * self.kv_cache_dtype.itemsize

    def allocate_kv_cache(self, max_model_len: int) -> int:
        """Size the cache (explicit count, else memory left after a profiling pass), bind it, warm up."""
        num_blocks = self.config.num_kv_blocks or self._blocks_that_fit(max_model_len)
        # Ranks measure their free memory apart; the scheduler on rank 0 needs one count that fits them all.
        num_blocks = min_over_ranks(num_blocks, self.device)
        if num_blocks < 1:
            raise RuntimeError("no memory left for the KV cache: lower max_num_batched_tokens or the model size")
        layer = self.attention_layers[0]
        shape = (2, len(self.attention_layers), num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
        for i, attn in enumerate(self.attention_layers):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        self.num_kv_blocks = num_blocks
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB of %s)", num_blocks, self.block_size,
                    self.kv_cache.numel() * self.kv_cache.element_size() / 2**30, str(self.kv_cache_dtype)[6:])
        if self.device.type == "cuda":
            self._warm_up_cached_step()
            self._warm_up_sampling()
            torch.cuda.synchronize()  # a kernel that fails to compile or launch fails here, before serving
        return num_blocks

    def capture_cuda_graphs(self, max_model_len: int) -> None:
        if self.device.type != "cuda" or self.config.enforce_eager:
            return
        max_blocks = -(-max_model_len // self.block_size)
        max_batch = min(self.config.max_cuda_graph_batch_size, self.config.max_num_seqs)
        self.graphs = DecodeGraphs(self.model, max_batch, max_blocks, max_model_len, self.device)
        self.graphs.capture()

    def _blocks_that_fit(self, max_model_len: int) -> int:
        if self.device.type != "cuda":
            return int(self.config.cpu_kv_cache_gib * 2**30) // self.kv_bytes_per_block()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._profile_run(max_model_len)
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        # Memory outside torch's allocator (other processes, the CUDA context). What the allocator reserves
        # but no tensor holds is the freed activations' cache, counted by the peak below: not twice.
        used_outside_torch = (total - free) - stats["reserved_bytes.all.current"]
        budget = total * self.config.gpu_memory_utilization - used_outside_torch - stats["allocated_bytes.all.peak"]
        return int(budget) // self.kv_bytes_per_block()

    @torch.inference_mode()
    def _profile_run(self, max_model_len: int) -> None:
        """The largest step we will run, without a cache, so its activation peak is measured."""
        num_tokens = self.config.max_num_batched_tokens
        lens = [min(max_model_len, num_tokens - i) for i in range(0, num_tokens, max_model_len)]
        starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=self.device),
            query_start_loc=torch.from_numpy(starts).to(self.device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=self.device),
            block_tables=torch.zeros((len(lens), 1), dtype=torch.int32, device=self.device),
            num_decodes=0, max_query_len=max(lens), max_seq_len=max(lens),
            query_start_loc_host=starts.tolist(), seq_lens_host=lens,
        )
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
        hidden = self.model(input_ids, positions, meta)
        # A slice of prompt logprobs at the most alternatives, and the sampler's buffers at the largest batch
        # with every filter on, count too.
        rows = torch.arange(min(self.prompt_slice_rows, num_tokens), device=self.device)
        num_top = min(self.config.max_logprobs, self.model_config.vocab_size)
        compute_prompt_logprobs(self.model, hidden, rows, torch.zeros_like(rows), num_top, self.prompt_slice_rows)
        logits = self.model.compute_logits(hidden[: min(self.config.max_num_seqs, num_tokens)])
        self._sample_dummy(logits, _WARM_UP_SAMPLING[0])
        torch.cuda.synchronize()
        del hidden, logits

    def _sample_dummy(self, logits: torch.Tensor, params: SamplingParams) -> None:
        requests = [SamplerRequest(params, 0, [0], 1, []) for _ in range(logits.shape[0])]
        self.sampler(logits, SamplingMetadata.build(requests, logits.shape[-1], self.device))

    @torch.inference_mode()
    def _warm_up_sampling(self) -> None:
        """Compile every LM-head and draw kernel variant serving can meet, however the cache was sized.

        The LM head takes the skinny GEMM for one and a few rows, cuBLAS beyond. The draw kernel
        specialises on the logits' dtype and on whether it divides by the temperature: each entry of
        ``_WARM_UP_SAMPLING`` reaches one variant. One row also slices the vocabulary over many programs,
        which compiles the draw's reduce even when the largest batch needs no slicing.
        """
        largest = self._largest_batch()
        hidden = torch.zeros(largest, self.model_config.hidden_size, dtype=self.dtype, device=self.device)
        for rows in sorted({1, 2, largest}):
            logits = self.model.compute_logits(hidden[:rows])
            for params in _WARM_UP_SAMPLING:
                self._sample_dummy(logits, params)

    @torch.inference_mode()
    def _warm_up_cached_step(self) -> None:
        """Eager steps through the cache: decodes of one and two sequences, a decode beside a prefill after
        a cached prefix, the largest decode batch alone, then the largest prefill chunk.

        The profiling pass has no cache, so without this the first request would wait while the
        paged prefill and eager decode kernels compile. One and two rows are the skinny GEMM's two
        variants, which only graph capture reached otherwise (so ``enforce_eager`` compiled them while
        serving); their contexts are long enough to split under either policy (the batch-invariant one
        splits past 256 tokens). The largest batch may split no context, a variant of its own (it writes
        its output directly) that eager decodes past the graphs' sizes need. The largest chunk reaches the
        MoE grouped GEMM's taller tiles when no profiling pass ran (an explicit cache size). Nothing is
        written (every slot is -1).
        """
        # Within the model's positions, and still past 256 tokens whenever a context can be.
        long = min(300, self.config.max_model_len)
        self._dummy_step([1], [long], num_decodes=1)
        self._dummy_step([1, 1], [long, 33], num_decodes=2)
        self._dummy_step([1, 24], [33, 48], num_decodes=1)
        largest = self._largest_batch()
        self._dummy_step([1] * largest, [33] * largest, num_decodes=largest)
        chunk = min(self.config.max_num_batched_tokens, self.config.max_model_len)
        self._dummy_step([chunk], [chunk], num_decodes=0)

    def _dummy_step(self, query_lens: list[int], seq_lens: list[int], num_decodes: int) -> None:
        """A forward over block 0's garbage: sequence i's last ``query_lens[i]`` of ``seq_lens[i]`` tokens."""
        starts = [0, *np.cumsum(query_lens).tolist()]
        meta = AttentionMetadata(
            slot_mapping=torch.full((starts[-1],), -1, dtype=torch.int64, device=self.device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=self.device),
            block_tables=torch.zeros((len(seq_lens), -(-max(seq_lens) // self.block_size)), dtype=torch.int32,
                                     device=self.device),
            num_decodes=num_decodes, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_start_loc_host=starts, seq_lens_host=seq_lens,
        )
        positions = [p for q, n in zip(query_lens, seq_lens, strict=True) for p in range(n - q, n)]
        self.model(torch.zeros(starts[-1], dtype=torch.int64, device=self.device),
                   torch.tensor(positions, device=self.device), meta)

    def _largest_batch(self) -> int:
        return min(self.config.max_num_seqs, self.config.max_num_batched_tokens)

    # ---- the per-step path ----

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> LaunchedStep:
        """Queue the step on the device and return at once; the sampled tokens stay on the device.

        A decode whose input token is still pending (drawn by the previous launch) reads it there.
        """
        inputs = self.prepare_inputs(batch)
        if self.workers is None:
            logits, prompt = self.forward(inputs)
        else:
            logits, prompt = self.workers.lockstep(inputs.shape, inputs.flat, lambda: self.forward(inputs))
        seqs = inputs.sample_seqs
        # The previous launch's tokens stay readable until this one can no longer raise: if it does, the
        # scheduler undoes it and the next step may still read them (Scheduler.unschedule).
        out, last_sampled, last_rows = None, None, {}
        if logits is not None:
            # The scheduler already counts this step's token as pending: the draw is one position before.
            requests = [
                SamplerRequest(seq.params, seq.seed, seq.token_array, seq.num_prompt_tokens, seq.stop_ids,
                               seq.num_pending_tokens - 1,
                               None if seq.grammar is None else seq.grammar.allowed_words())
                for seq in seqs
            ]
            out = self.sampler(logits, SamplingMetadata.build(requests, logits.shape[-1], self.device))
            last_sampled = out.sampled_token_ids
            last_rows = {seq.seq_id: row for row, seq in enumerate(seqs)}
        copied = None
        if self.device.type == "cuda" and (out is not None or prompt is not None):
            # Logprobs too: a synchronous copy in finish() would wait for the step launched after this one.
            out, prompt = _host_copy(out), _host_copy(prompt)
            copied = torch.cuda.Event()
            copied.record()
        self._last_sampled, self._last_rows = last_sampled, last_rows
        return LaunchedStep(batch, seqs, out, inputs.prompt_plan, prompt, copied)

    def finish(self, step: LaunchedStep) -> StepResult:
        """Wait for a launched step's tokens (and logprobs, prompt logprobs) on the host."""
        if step.copied is not None:
            step.copied.synchronize()
        prompt = [] if step.prompt_output is None else step.prompt_plan.entries(step.prompt_output)
        if step.output is None:
            return StepResult([], [], [], prompt)
        token_ids = step.output.sampled_token_ids.tolist()
        return StepResult(step.sample_seqs, token_ids, self._logprobs(step.output, step.sample_seqs), prompt)

    @torch.inference_mode()
    def forward(self, inputs: ModelInputs) -> tuple[torch.Tensor | None, PromptLogprobsOutput | None]:
        """The model on one step's inputs: the logits of the rows that sample (None when none does), and the
        prompt logprobs of the rows scored (None when none is)."""
        shape = inputs.shape
        if self.graphs is not None and shape.num_decodes == shape.num_seqs and self.graphs.fits(shape.num_seqs):
            hidden = self.graphs.replay(inputs.input_ids, inputs.positions, inputs.meta)  # sorts in the graph
        else:
            meta = inputs.meta
            if shape.num_decodes:
                meta = replace(meta, decode_order=longest_first(meta.seq_lens[: shape.num_decodes]))
            hidden = self.model(inputs.input_ids, inputs.positions, meta)
        prompt = None
        if shape.num_prompt_logits:
            prompt = compute_prompt_logprobs(self.model, hidden, inputs.prompt_rows, inputs.prompt_token_ids,
                                             shape.prompt_num_top, shape.prompt_slice_rows)
        logits = self.model.compute_logits(hidden[inputs.logits_indices]) if shape.num_logits else None
        return logits, prompt

    def prepare_inputs(self, batch: ScheduledBatch) -> ModelInputs:
        block_size = self.block_size
        counts = np.array(batch.num_tokens, dtype=np.int64)
        # The scheduler has already counted this step's tokens as computed.
        ends = np.array([seq.num_computed_tokens for seq in batch.seqs], dtype=np.int64)
        starts = ends - counts
        query_start_loc = np.zeros(len(batch) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start_loc[1:])
        # Positions of every token: for sequence i, starts[i] .. ends[i] - 1.
        seq_of_token = np.repeat(np.arange(len(batch)), counts)
        positions = np.arange(query_start_loc[-1]) - np.repeat(query_start_loc[:-1], counts) + starts[seq_of_token]
        # A pending input token (always a decode's only one) is a 0 here, filled from the device below.
        pending = [i for i, (seq, end) in enumerate(zip(batch.seqs, ends, strict=True)) if end > len(seq.token_ids)]
        input_ids = np.fromiter(
            (t for seq, s, e in zip(batch.seqs, starts, ends, strict=True) for t in seq.token_ids[s:e]),
            dtype=np.int64, count=int(query_start_loc[-1]) - len(pending),
        )
        if pending:
            input_ids = np.insert(input_ids, query_start_loc[1:][pending] - np.arange(1, len(pending) + 1), 0)
        max_blocks = max(len(seq.block_table) for seq in batch.seqs)
        block_tables = np.zeros((len(batch), max_blocks), dtype=np.int64)
        for i, seq in enumerate(batch.seqs):
            block_tables[i, : len(seq.block_table)] = seq.block_table
        slot_mapping = block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size
        logits_indices = query_start_loc[1:][batch.samples] - 1
        pending_slots = query_start_loc[1:][pending] - 1
        pending_rows = [self._last_rows[batch.seqs[i].seq_id] for i in pending]
        prompt = (PromptLogprobsPlan.build(batch.seqs, starts, ends, query_start_loc) if batch.may_score_prompts
                  else NO_PROMPT_LOGPROBS)

        # One host-to-device copy of everything, then views.
        flat = np.concatenate([input_ids, positions, slot_mapping, query_start_loc, ends, logits_indices,
                               block_tables.ravel(), prompt.rows, prompt.token_ids, pending_slots,
                               np.array(pending_rows, dtype=np.int64)])
        shape = StepShape(len(input_ids), len(batch), len(logits_indices), max_blocks, batch.num_decodes,
                          int(counts.max()), int(ends.max()), prompt.num_rows, prompt.num_top, self.prompt_slice_rows)
        dev = torch.from_numpy(flat).to(self.device, non_blocking=True)
        inputs = inputs_from_flat(shape, dev[: shape.flat_size], query_start_loc.tolist(), ends.tolist())
        if pending:  # the tail past the StepShape's array: where each pending token goes, and its row
            slots, rows = dev[shape.flat_size :].split(len(pending))
            inputs.input_ids.index_copy_(0, slots, self._last_sampled.index_select(0, rows))
        inputs.sample_seqs = [seq for seq, s in zip(batch.seqs, batch.samples, strict=True) if s]
        inputs.prompt_plan = prompt
        return inputs

    @staticmethod
    def _logprobs(out, seqs: list[Sequence]) -> list[TokenLogprobs | None]:
        if out.logprobs is None:
            return [None] * len(seqs)
        chosen = out.logprobs.tolist()
        top_ids = out.top_ids.tolist()
        top_logprobs = out.top_logprobs.tolist()
        result = []
        for i, seq in enumerate(seqs):
            n = seq.params.logprobs
            if n is None:
                result.append(None)
            else:
                result.append((chosen[i], list(zip(top_ids[i][:n], top_logprobs[i][:n], strict=True))))
        return result


def _host_copy(out: T | None) -> T | None:
    """``out``'s tensors (a dataclass of them) copied into pinned host memory, asynchronously: read them
    after an event."""
    if out is None:
        return None

    def pinned(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    return replace(out, **{f.name: pinned(getattr(out, f.name)) for f in fields(out)})
