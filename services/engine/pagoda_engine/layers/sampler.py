"""The sampler: from a batch of next-token logits to token ids, on the logits' device.

Per row, in this order (vLLM v1's, but for the bias; see below):

1. min_tokens: the row's stop ids (EOS + stop_token_ids) get -inf while the output is shorter than min_tokens.
2. Repetition penalty (Hugging Face semantics) over tokens seen in the prompt or the output.
3. Presence and frequency penalties (OpenAI semantics) over output tokens only.
4. logit_bias (OpenAI semantics): each listed token's bias is added to its logit.
5. allowed_token_ids (vLLM semantics): on rows that list some, every other token gets -inf; so does every
   token a row's grammar does not allow next (structured output: a packed bit mask per row).
6. Greedy rows (temperature 0, or below 1e-5) take the argmax here.
7. Temperature, then min_p, top_k and top_p filters, then a seeded draw (see ``random_noise``).

Steps 1 and 5 only set -inf, which every later step keeps (-inf plus a finite bias is -inf): a bias
never brings back a suppressed token. vLLM v1 adds the bias before the penalties (and masks first); the
orders differ only under a repetition penalty, which there scales the bias too. Here the bias is added
after every penalty, as given, which is the request's last word on a token before temperature.

Logprobs describe the model's raw distribution: log_softmax of the logits as they come in, before
penalties, bias, allowlist, temperature and filters (what vLLM v1 returns by default). Prompt logprobs
(prompt_logprobs.py) are computed the same way, by ``token_logprobs``.

Everything Python-side (reading SamplingParams, flattening token lists) happens once per step in
``SamplingMetadata.build``, which moves its small host arrays to the device in one copy and sets flags
so that the forward skips what no row asked for: no full-vocabulary sort unless a row uses top_p, no
penalty, bias or allowlist tensors (nor their kernels) when no row has any. The forward has no per-row
Python loop and no host sync.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from pagoda_engine.sampling_params import SamplingParams

_MASK32 = 0xFFFFFFFF
# Thomas Mueller's 32-bit hash multiplier: odd (so the hash is a bijection) and below 2**31, so a
# 32-bit value times it stays below 2**63 and int64 arithmetic never overflows, on any device.
_MUL = 0x045D9F3B
_GOLDEN = 0x9E3779B9


class SamplerRequest(NamedTuple):
    """What the runner knows about one row of the batch."""

    params: SamplingParams
    seed: int  # always set: the engine resolves SamplingParams.seed=None beforehand
    # The sequence's tokens, prompt then output, shared rather than copied (Sequence.token_array): only
    # rows with a penalty look at them, and then as one numpy concatenation.
    token_ids: np.ndarray | list[int]
    num_prompt_tokens: int
    stop_ids: frozenset[int] | list[int]  # EOS ids + stop_token_ids, suppressed until min_tokens
    # Tokens drawn by a step still running on the device, not in token_ids yet. Rows with penalties
    # never have any: the engine waits for a step's tokens before it schedules such a row again.
    num_pending_tokens: int = 0
    # Structured output: the tokens the row's grammar allows next, packed bits in int64 words
    # (structured_output/grammar.py). Such rows never have pending tokens either.
    grammar_words: np.ndarray | None = None

    @property
    def prompt_token_ids(self) -> np.ndarray | list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> np.ndarray | list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        """Tokens drawn before this one: the output position of the token being drawn."""
        return len(self.token_ids) + self.num_pending_tokens - self.num_prompt_tokens


@dataclass
class SamplingMetadata:
    """Batch tensors on the device; ``None`` where no row needs them."""

    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows so the shared math stays finite
    seeds: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64: len(output_token_ids), the index of the token being drawn
    greedy: torch.Tensor | None  # [B] bool, only in batches mixing greedy and sampled rows
    top_k: torch.Tensor | None  # [B] int64, 0 = off
    top_p: torch.Tensor | None  # [B] float32, 1.0 = off
    min_p: torch.Tensor | None  # [B] float32, 0.0 = off
    repetition_penalty: torch.Tensor | None  # [B] float32
    presence_penalty: torch.Tensor | None  # [B] float32
    frequency_penalty: torch.Tensor | None  # [B] float32
    prompt_index: torch.Tensor | None  # flat row * V + token over prompts of rows with a repetition penalty
    output_index: torch.Tensor | None  # flat row * V + token over outputs of rows with any penalty
    suppress_index: torch.Tensor | None  # flat row * V + stop id of rows still under min_tokens
    bias_index: torch.Tensor | None  # flat row * V + token of every logit_bias entry
    bias: torch.Tensor | None  # float32, the bias of each bias_index entry
    allowed_rows: torch.Tensor | None  # int64, the rows with allowed_token_ids
    allowed_index: torch.Tensor | None  # flat row * V + token of every allowed token of those rows
    grammar_rows: torch.Tensor | None  # int64, the rows with a grammar
    grammar_words: torch.Tensor | None  # int64 [len(grammar_rows), words]: their masks' packed bits
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_penalties: bool
    max_top_k: int
    max_num_logprobs: int | None  # None: no row asked for logprobs
    vocab_size: int

    @classmethod
    def build(cls, requests: list[SamplerRequest], vocab_size: int, device: torch.device | str) -> SamplingMetadata:
        params = [r.params for r in requests]
        greedy = [p.greedy for p in params]
        sampled = [p for p, g in zip(params, greedy, strict=True) if not g]
        # Filters only matter on sampled rows; a top_k at or past the vocabulary keeps everything.
        top_k = [0 if g or not 0 < p.top_k < vocab_size else p.top_k for p, g in zip(params, greedy, strict=True)]
        any_top_k = any(top_k)
        any_top_p = any(p.top_p < 1.0 for p in sampled)
        any_min_p = any(p.min_p > 0.0 for p in sampled)
        rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        pen_rows = [i for i, p in enumerate(params) if p.has_penalties]
        suppress_rows = [i for i, r in enumerate(requests) if r.num_output_tokens < r.params.min_tokens]
        bias_rows = [i for i, p in enumerate(params) if p.logit_bias]
        allowed_rows = [i for i, p in enumerate(params) if p.allowed_token_ids]
        grammar_rows = [i for i, r in enumerate(requests) if r.grammar_words is not None]
        logprob_counts = [p.logprobs for p in params if p.logprobs is not None]

        host = _HostArrays()
        host.add_float("temperature", [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)])
        host.add_int("seeds", [r.seed for r in requests])
        host.add_int("positions", [r.num_output_tokens for r in requests])
        if any(greedy) and sampled:
            host.add_int("greedy", greedy)
        if any_top_k:
            host.add_int("top_k", top_k)
        if any_top_p:
            host.add_float("top_p", [1.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)])
        if any_min_p:
            host.add_float("min_p", [0.0 if g else p.min_p for p, g in zip(params, greedy, strict=True)])
        if pen_rows:
            host.add_float("repetition_penalty", [p.repetition_penalty for p in params])
            host.add_float("presence_penalty", [p.presence_penalty for p in params])
            host.add_float("frequency_penalty", [p.frequency_penalty for p in params])
            host.add_int("prompt_index", _flat_index(rep_rows, [requests[i].prompt_token_ids for i in rep_rows],
                                                     vocab_size))
            host.add_int("output_index", _flat_index(pen_rows, [requests[i].output_token_ids for i in pen_rows],
                                                     vocab_size))
        if suppress_rows:
            # A stop id past the logits' width cannot be drawn anyway, and its flat index would land in the next row.
            stop_ids = [[t for t in requests[i].stop_ids if t < vocab_size] for i in suppress_rows]
            host.add_int("suppress_index", _flat_index(suppress_rows, stop_ids, vocab_size))
        # Admission checked that every id is below the vocabulary's size.
        if bias_rows:
            ids, biases = zip(*(params[i].logit_bias_arrays for i in bias_rows), strict=True)
            host.add_int("bias_index", _flat_index(bias_rows, ids, vocab_size))
            host.add_float("bias", np.concatenate(biases))
        if allowed_rows:
            host.add_int("allowed_rows", allowed_rows)
            allowed = [params[i].allowed_token_array for i in allowed_rows]
            host.add_int("allowed_index", _flat_index(allowed_rows, allowed, vocab_size))
        if grammar_rows:
            host.add_int("grammar_rows", grammar_rows)
            host.add_int("grammar_words", np.concatenate([requests[i].grammar_words for i in grammar_rows]))
        t = host.to(device)
        f32 = {name: t[name].float() for name, is_float in host.floats.items() if is_float}
        return cls(
            temperature=f32["temperature"],
            seeds=t["seeds"],
            positions=t["positions"],
            greedy=t["greedy"].bool() if "greedy" in t else None,
            top_k=t.get("top_k"),
            top_p=f32.get("top_p"),
            min_p=f32.get("min_p"),
            repetition_penalty=f32.get("repetition_penalty"),
            presence_penalty=f32.get("presence_penalty"),
            frequency_penalty=f32.get("frequency_penalty"),
            prompt_index=t.get("prompt_index"),
            output_index=t.get("output_index"),
            suppress_index=t.get("suppress_index"),
            bias_index=t.get("bias_index"),
            bias=f32.get("bias"),
            allowed_rows=t.get("allowed_rows"),
            allowed_index=t.get("allowed_index"),
            grammar_rows=t.get("grammar_rows"),
            grammar_words=t["grammar_words"].view(len(grammar_rows), -1) if grammar_rows else None,
            all_greedy=not sampled,
            any_top_k=any_top_k,
            any_top_p=any_top_p,
            any_min_p=any_min_p,
            any_penalties=bool(pen_rows),
            max_top_k=max(top_k, default=0),
            max_num_logprobs=max(logprob_counts) if logprob_counts else None,
            vocab_size=vocab_size,
        )


class _HostArrays:
    """Named host arrays packed into one int64 buffer so the device gets them in a single copy."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.floats: dict[str, bool] = {}

    def add_int(self, name: str, values) -> None:
        self.parts.append(np.asarray(values, dtype=np.int64).reshape(-1))
        self.floats[name] = False

    def add_float(self, name: str, values) -> None:
        # float64 bits travel as int64 and are reinterpreted on the device: exact, and still one copy.
        self.parts.append(np.asarray(values, dtype=np.float64).reshape(-1).view(np.int64))
        self.floats[name] = True

    def to(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        # Every part starts on a 16-byte boundary (an even int64 offset). Triton specialises a kernel on
        # whether each pointer is 16-byte aligned, so an offset following the batch size's parity would
        # compile a second variant of the sampling kernel in the middle of serving, at the first odd batch.
        starts = np.cumsum([0] + [len(part) + len(part) % 2 for part in self.parts])
        host = np.zeros(starts[-1], dtype=np.int64)
        for part, start in zip(self.parts, starts, strict=False):
            host[start : start + len(part)] = part
        buffer = torch.from_numpy(host).to(device, non_blocking=True)
        out = {}
        for (name, is_float), part, start in zip(self.floats.items(), self.parts, starts, strict=False):
            view = buffer[start : start + len(part)]
            out[name] = view.view(torch.float64) if is_float else view
        return out


def _flat_index(rows: list[int], token_lists: Sequence[np.ndarray | Collection[int]], vocab_size: int) -> np.ndarray:
    """row * vocab_size + token for every token of every listed row (indices into the flattened logits).

    Token arrays are joined as they are; lists (stop ids) are converted first."""
    arrays = [t if isinstance(t, np.ndarray) else np.fromiter(t, dtype=np.int64, count=len(t)) for t in token_lists]
    lengths = np.fromiter((len(t) for t in arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)  # a copy: free to add into
    flat += np.repeat(np.asarray(rows, dtype=np.int64) * vocab_size, lengths)
    return flat


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    # Only when some row asked for logprobs (None otherwise); raw-distribution logprobs, see the module doc.
    logprobs: torch.Tensor | None = None  # [B] float32, of the sampled token
    top_ids: torch.Tensor | None = None  # [B, N] int64, N = max_num_logprobs, most likely first
    top_logprobs: torch.Tensor | None = None  # [B, N] float32


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        # Logits stay in the model's dtype until arithmetic needs float32: suppressing, argmax and the
        # fused draw are exact on 16-bit values, and a float32 copy of [256, 152k] logits moves 230 MB
        # (about 0.1 ms of a 6.6 ms decode step on the H200). Every step below is out of place.
        raw = logits
        if meta.suppress_index is not None:
            logits = logits.flatten().index_fill(0, meta.suppress_index, float("-inf")).view_as(raw)
        if meta.any_penalties:
            logits = apply_penalties(logits.float(), meta)
        if meta.bias_index is not None:
            # float32 as the penalties: a bias added in 16 bits would round to the logit's precision.
            logits = logits.float().flatten().index_add(0, meta.bias_index, meta.bias).view_as(raw)
        if meta.allowed_index is not None:
            logits = apply_allowed_token_ids(logits, meta.allowed_rows, meta.allowed_index)
        if meta.grammar_words is not None:
            logits = apply_token_bitmask(logits, meta.grammar_rows, meta.grammar_words)

        if meta.all_greedy:
            token_ids = logits.argmax(dim=-1)
        else:
            sampled = sample(logits, meta)
            token_ids = sampled if meta.greedy is None else torch.where(meta.greedy, logits.argmax(dim=-1), sampled)

        if meta.max_num_logprobs is None:
            return SamplerOutput(token_ids)
        chosen, top_logprobs, top_ids = token_logprobs(raw, token_ids, meta.max_num_logprobs)
        return SamplerOutput(token_ids, chosen, top_ids, top_logprobs)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                   num_top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of raw ``logits``: the logprob of its ``token_ids`` entry [B], and the ``num_top`` largest
    logprobs [B, num_top] with their token ids, most likely first (the module doc's raw distribution)."""
    logprobs = logits.float().log_softmax(dim=-1)
    top_logprobs, top_ids = logprobs.topk(num_top, dim=-1)
    return logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1), top_logprobs, top_ids


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens, then presence/frequency over output tokens."""
    batch, vocab = logits.shape
    counts = torch.zeros(batch * vocab, dtype=torch.float32, device=logits.device)
    counts.index_add_(0, meta.output_index, torch.ones_like(meta.output_index, dtype=torch.float32))
    counts = counts.view(batch, vocab)
    seen = (counts > 0).flatten().index_fill(0, meta.prompt_index, True).view(batch, vocab)
    rep = meta.repetition_penalty.unsqueeze(1)
    # Dividing positive and multiplying negative logits both make a seen token less likely.
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    presence = meta.presence_penalty.unsqueeze(1) * (counts > 0)
    return logits - meta.frequency_penalty.unsqueeze(1) * counts - presence


def apply_allowed_token_ids(logits: torch.Tensor, rows: torch.Tensor, allowed_index: torch.Tensor) -> torch.Tensor:
    """``rows`` keep only the logits at ``allowed_index`` (flat row * V + token); their other tokens get -inf."""
    kept = logits.flatten().index_select(0, allowed_index)
    restricted = logits.index_fill(0, rows, float("-inf"))  # a copy: the model's logits stay as they are
    restricted.view(-1).index_copy_(0, allowed_index, kept)  # a repeated id copies the same value twice
    return restricted


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """``rows`` keep the logits of the tokens their packed masks allow (bit t % 8 of byte t // 8 of a row's
    words allows token t); every other token gets -inf."""
    vocab = logits.shape[1]
    packed = words.view(torch.uint8)  # the host packed bytes, little end first: the same bytes here
    shifts = torch.arange(8, dtype=torch.uint8, device=logits.device)
    allowed = (packed.unsqueeze(-1) >> shifts).bitwise_and_(1).view(len(rows), -1)[:, :vocab].bool()
    masked = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))
    return logits.index_copy(0, rows, masked)


def sample(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """A seeded draw from softmax(logits / temperature) after the min_p, top_k and top_p filters."""
    # On CUDA a Triton kernel makes the noise on the fly in one pass over the logits (the same draw).
    fused = _fused_gumbel_argmax() if logits.is_cuda else None
    filtered = meta.any_min_p or meta.any_top_k or meta.any_top_p
    if fused is not None and not filtered:
        return fused(logits, meta.seeds, meta.positions, meta.temperature)  # divides as it reads, in float32
    logits = logits.float() / meta.temperature.unsqueeze(1)
    if meta.any_min_p:
        logits = apply_min_p(logits, meta.min_p)
    if meta.any_top_k or meta.any_top_p:
        logits = apply_top_k_top_p(logits, meta.top_k, meta.max_top_k, meta.top_p)
    if fused is not None:
        return fused(logits, meta.seeds, meta.positions)
    # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits); filtered tokens are -inf.
    return random_noise(meta.seeds, meta.positions, logits.shape[1]).add_(logits).argmax(dim=-1)


@functools.cache
def _fused_gumbel_argmax() -> Callable[..., torch.Tensor] | None:
    """pagoda_engine.kernels.sampling.gumbel_argmax, or None without Triton (CPU-only installs, CI)."""
    if importlib.util.find_spec("triton") is None:
        return None
    from pagoda_engine.kernels.sampling import gumbel_argmax  # imports the sampler: not at the top

    return gumbel_argmax


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top probability.

    p / p_max = exp(logit - logit_max), so the test needs no softmax; min_p = 0 gives log(0) = -inf: keep all.
    """
    cutoff = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)
    return logits.masked_fill(logits < cutoff, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Keep each row's top_k most likely tokens, then the smallest set of those reaching top_p of the mass.

    Both filters become a per-row logit threshold, so tokens tied with the last kept one are kept too.
    top_k alone uses a partial top-k (max_top_k wide), never a full-vocabulary sort.
    """
    if top_p is None:
        values = logits.topk(max_top_k, dim=-1).values
        kth = values.gather(1, (top_k - 1).clamp(min=0).unsqueeze(1))
        threshold = kth.masked_fill(top_k.unsqueeze(1) == 0, float("-inf"))
        return logits.masked_fill(logits < threshold, float("-inf"))

    ordered = logits.sort(dim=-1, descending=True).values
    if top_k is not None:
        rank = torch.arange(ordered.shape[1], device=logits.device)
        ordered = ordered.masked_fill((rank >= top_k.unsqueeze(1)) & (top_k.unsqueeze(1) > 0), float("-inf"))
    probs = ordered.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the tokens strictly ahead in the order
    p = top_p.unsqueeze(1)
    # The first token has nothing ahead of it and top_p > 0, so at least one token is always kept;
    # rows with top_p off keep every finite token (a float cumsum may reach 1.0 before the tail).
    keep = ((mass_before < p) | (p >= 1.0)) & (ordered > float("-inf"))
    last_kept = keep.sum(dim=-1, keepdim=True).clamp(min=1) - 1
    threshold = ordered.gather(1, last_kept)
    return logits.masked_fill(logits < threshold, float("-inf"))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Thomas Mueller's bijective 32-bit integer hash, on int64 values in [0, 2**32); x is left alone."""
    x = x ^ (x >> 16)
    # In place from here on: on [B, V] every pass is a full read and write of an int64 tensor.
    x.mul_(_MUL).bitwise_and_(_MASK32)
    x ^= x >> 16
    x.mul_(_MUL).bitwise_and_(_MASK32)
    x ^= x >> 16
    return x


def random_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise [B, V] that depends only on (seed, position, token id): a counter-based RNG.

    The integer part is pure int64 arithmetic (xor, shifts, multiplies that cannot overflow, masks), so
    it is bit-identical on CPU and CUDA and independent of what else is in the batch or the row order:
    a row's draw depends on its own seed and output position only, and a request resumed after
    preemption draws the same noise for the same output position. Per row, a 32-bit key hashes the
    seed's two halves and the position; per token, the hash of the token id is xored with the key and
    hashed again. The 32 bits become u in (0, 1) and the noise is -log(-log(1 - u)); those float
    functions may differ by an ulp between devices, so CPU and CUDA draws agree except on near-ties.
    """
    key = _mix32(((positions + _GOLDEN) & _MASK32) ^ _mix32(seeds >> 32))
    key = _mix32(key ^ (seeds & _MASK32))
    token_hash = _mix32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) + _GOLDEN)
    bits = _mix32(key.unsqueeze(1) ^ token_hash.unsqueeze(0))
    # 1 - u = (bits + 0.5) / 2**32 is finest near 0, where the winning (smallest) exponentials live;
    # the clamp keeps float32 rounding from reaching 1, which would give a token -inf noise.
    one_minus_u = bits.float().add_(0.5).mul_(2.0**-32).clamp_(max=1.0 - 2.0**-24)
    exponential = one_minus_u.neg_().log1p_().neg_()  # -log(u): an Exp(1) draw
    return exponential.log_().neg_()
