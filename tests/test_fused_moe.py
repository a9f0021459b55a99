"""The routed experts' grouped GEMMs (kernels/fused_moe.py) against the torch loop of layers/moe.py.

The kernels (the block alignment and the two GEMMs) run on random inputs on the GPU (eager and inside a
CUDA graph that replays new routings) and, on CPU machines, under the Triton interpreter in a subprocess
(TRITON_INTERPRET must be set before triton is first imported).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from pagoda_engine.kernels.fused_moe import align_to_blocks, fused_experts, max_padded_pairs  # noqa: E402
from pagoda_engine.layers.moe import FusedMoE, route  # noqa: E402
from tests.conftest import read_loaded_scalars, run_under_interpreter  # noqa: E402

TOLERANCE = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=5e-3, atol=5e-3),
             torch.float32: dict(rtol=1e-5, atol=1e-5)}
# (tokens, experts, top_k, hidden, intermediate): one token; decode-sized batches over many experts (16-row
# tiles) with sizes that are no multiple of any tile; a prefill where experts get whole 64-row tiles.
SHAPES = [(1, 8, 2, 64, 32), (5, 128, 8, 256, 96), (37, 16, 4, 200, 72), (300, 8, 2, 128, 64)]


def make_experts(num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype, device: str) -> FusedMoE:
    with torch.device(device):
        experts = FusedMoE(hidden, num_experts, intermediate).to(dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    for param in (experts.gate_up_proj, experts.down_proj):
        param.data.normal_(0.0, hidden ** -0.5, generator=generator)
    return experts


def random_routing(num_tokens: int, num_experts: int, top_k: int, hidden: int, dtype: torch.dtype, device: str,
                   seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=generator, device=device).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=generator, device=device)
    weights, ids = route(logits, top_k, renormalize=True)
    return x, weights, ids


def check_alignment(device: str) -> None:
    """Every pair lands once, in tiles of its own expert; padding holds the sentinel; sizes as promised."""
    generator = torch.Generator().manual_seed(0)
    num_experts, top_k = 6, 2
    # Expert 5 gets nothing; expert 0 gets exactly one tile's worth when block_m is 16.
    ids = torch.cat([torch.zeros(8, 2, dtype=torch.long),
                     torch.randint(1, 5, (23, top_k), generator=generator)]).view(-1, top_k)
    for block_m in (16, 64):
        sorted_pairs, tile_experts, num_padded = (t.cpu() for t in align_to_blocks(ids.to(device), num_experts,
                                                                                     block_m))
        num_pairs, used = ids.numel(), num_padded.item()
        counts = torch.bincount(ids.flatten(), minlength=num_experts)
        assert used == int(((counts + block_m - 1) // block_m * block_m).sum())
        assert sorted_pairs.numel() == max_padded_pairs(num_pairs, num_experts, block_m) >= used
        real = sorted_pairs[:used]
        assert sorted(real[real < num_pairs].tolist()) == list(range(num_pairs))
        assert (sorted_pairs[used:] == num_pairs).all()
        for tile, expert in enumerate(tile_experts[: used // block_m].tolist()):
            pairs = real[tile * block_m:(tile + 1) * block_m]
            pairs = pairs[pairs < num_pairs]
            assert pairs.numel() > 0 and (ids.flatten()[pairs] == expert).all()


@pytest.mark.gpu
def test_alignment_puts_every_pair_once_in_tiles_of_one_expert():
    check_alignment("cuda")


def check_kernels(device: str, dtypes: list[torch.dtype], shapes: list[tuple]) -> None:
    for dtype in dtypes:
        for num_tokens, num_experts, top_k, hidden, intermediate in shapes:
            experts = make_experts(num_experts, hidden, intermediate, dtype, device)
            x, weights, ids = random_routing(num_tokens, num_experts, top_k, hidden, dtype, device)
            # The oracle runs in fp32 on the same (rounded) weights and inputs.
            oracle = make_experts(num_experts, hidden, intermediate, torch.float32, device)
            oracle.load_state_dict({name: t.float() for name, t in experts.state_dict().items()})
            expected = oracle.forward_torch(x.float(), weights, ids).to(dtype)
            got = fused_experts(x, experts.gate_up_proj, experts.down_proj, weights, ids)
            torch.testing.assert_close(got, expected, **TOLERANCE[dtype])


@pytest.mark.gpu
def test_grouped_gemm_kernels_match_the_torch_loop():
    check_kernels("cuda", [torch.bfloat16, torch.float16, torch.float32], SHAPES)


@pytest.mark.gpu
def test_moe_layer_replays_new_routings_in_a_cuda_graph():
    """The routing changes between replays (ids copied into the graph's input), and so do the results."""
    num_tokens, num_experts, top_k, hidden, intermediate = 24, 32, 4, 128, 64
    experts = make_experts(num_experts, hidden, intermediate, torch.bfloat16, "cuda")
    x, weights, ids = random_routing(num_tokens, num_experts, top_k, hidden, torch.bfloat16, "cuda")
    static = [t.clone() for t in (x, weights, ids)]
    fused_experts(*static[:1], experts.gate_up_proj, experts.down_proj, *static[1:])  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(static[0], experts.gate_up_proj, experts.down_proj, static[1], static[2])
    for seed in (2, 3):
        for buffer, fresh in zip(static, random_routing(num_tokens, num_experts, top_k, hidden, torch.bfloat16,
                                                         "cuda", seed), strict=True):
            buffer.copy_(fresh)
        graph.replay()
        expected = fused_experts(static[0], experts.gate_up_proj, experts.down_proj, static[1], static[2])
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def check_under_interpreter() -> None:
    """fp32, small shapes (the interpreter is slow): one token, ragged decode sizes, whole 64-row tiles."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    read_loaded_scalars()  # the kernel returns early on a loaded count
    check_alignment("cpu")
    check_kernels("cpu", [torch.float32], [(1, 8, 2, 64, 32), (5, 16, 4, 40, 24), (70, 4, 2, 32, 16)])


def test_alignment_and_grouped_gemm_kernels_under_the_triton_interpreter():
    run_under_interpreter("tests.test_fused_moe")
