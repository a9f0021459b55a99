"""The attention and element-wise kernels compile for an H100 (sm_90) on a machine without a GPU.

Triton's whole pipeline down to ptxas runs on the CPU, so every variant the engine launches (16-bit and
fp8 caches, split and unsplit decode, the reduce, prefill, with and without a sliding window and a score
soft-cap) and the MoE grouped GEMM are checked
here in CI, ahead of the GPU machine, which alone can run them (tests/test_triton_attention.py).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pagoda_engine.kernels import fused_moe, fused_ops  # noqa: E402
from pagoda_engine.kernels.decode_attention import _decode_reduce_kernel, _decode_split_kernel  # noqa: E402
from pagoda_engine.kernels.prefill_attention import _prefill_kernel  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
# (cache element type, query type, head dim, decode BLOCK_N, warps, stages, prefill BLOCK_M, BLOCK_N, warps,
# stages): the engine's configs per cache dtype, and for Gemma 3's 256-wide heads.
CACHES = {
    "bf16": ("bf16", "bf16", 128, 64, 2, 3, 128, 128, 8, 3),
    "fp8": ("fp8e4nv", "bf16", 128, 32, 1, 5, 128, 128, 8, 3),
    "bf16_head_dim_256": ("bf16", "bf16", 256, 32, 4, 2, 64, 32, 4, 2),
    # The GPU tests' fp32 oracle runs exact (IEEE) dots, Gemma's wide heads included.
    "fp32_head_dim_256": ("fp32", "fp32", 256, 32, 4, 2, 32, 32, 4, 2),
}


def compile_for_h100(kernel, pointer_types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int,
                     **options):
    """Scalars not named are int32, as the launches pass them; returns the compiled kernel."""
    signature = {name: "constexpr" if name in constexprs else pointer_types.get(name, "i32")
                 for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=H100,
                          options={"num_warps": num_warps, "num_stages": num_stages, **options})


def paged_types(cache: str, query: str) -> dict[str, str]:
    return {"q_ptr": f"*{query}", "out_ptr": f"*{query}", "k_cache_ptr": f"*{cache}", "v_cache_ptr": f"*{cache}",
            "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "order_ptr": "*i32", "query_start_loc_ptr": "*i32",
            "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "qk_scale": "fp32"}


@pytest.mark.parametrize(("window", "softcap"), [(0, 0.0), (64, 0.0), (64, 50.0)])  # 64, 50.0: Gemma 2's kind
@pytest.mark.parametrize("cache", CACHES)
def test_attention_kernels_compile_for_sm90(cache, window, softcap):
    cache_type, query_type, head_dim, block_n, warps, stages, *prefill = CACHES[cache]
    types = paged_types(cache_type, query_type)
    fp16_dots, ieee = cache == "fp8", query_type == "fp32"
    for split in (False, True):
        compiled = compile_for_h100(_decode_split_kernel, types, dict(
            GROUP=2, HEAD_DIM=head_dim, PAGE=16, BLOCK_H=16, BLOCK_D=head_dim, BLOCK_N=block_n, SPLIT=split,
            IEEE=ieee, FP16=fp16_dots, WINDOW=window, SOFTCAP=softcap), warps, stages)
        assert compiled.asm["cubin"]
    compile_for_h100(_decode_reduce_kernel, types, dict(HEAD_DIM=head_dim, BLOCK_S=64, BLOCK_D=head_dim,
                                                        BLOCK_N=block_n, WINDOW=window), 4, 2)
    block_m, prefill_block_n, prefill_warps, prefill_stages = prefill
    compile_for_h100(_prefill_kernel, types, dict(GROUP=2, HEAD_DIM=head_dim, PAGE=16, BLOCK_M=block_m,
                                                  BLOCK_N=prefill_block_n, BLOCK_D=head_dim, IEEE=ieee,
                                                  FP16=fp16_dots, WINDOW=window, SOFTCAP=softcap), prefill_warps,
                     prefill_stages)


@pytest.mark.parametrize("gemma", [False, True])
def test_fused_elementwise_kernels_compile_for_sm90(gemma):
    """The norm and the rotary with Llama's or Gemma's norm, and both gated activations with libdevice (which
    the interpreter test cannot run)."""
    bf16 = {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16",
            "residual_out_ptr": "*bf16", "inv_n_cols": "fp32", "eps": "fp32"}
    semantics = dict(fused_ops._TORCH_FLOAT_SEMANTICS)
    for residual in (False, True):
        compile_for_h100(fused_ops._rms_norm_kernel, bf16, dict(HAS_RESIDUAL=residual, GEMMA=gemma, BLOCK_ROWS=1,
                                                                BLOCK_COLS=2048), 4, 2, **semantics)
    rotary = {"positions_ptr": "*i64", "q_ptr": "*bf16", "k_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
              "q_weight_ptr": "*bf16", "k_weight_ptr": "*bf16", "inv_head_dim": "fp32", "eps": "fp32"}
    compile_for_h100(fused_ops._rotary_kernel, rotary, dict(HAS_NORM=True, GEMMA=gemma, HALF=128, BLOCK_HALF=128,
                                                            BLOCK_Q_HEADS=8, BLOCK_K_HEADS=4), 4, 2, **semantics)
    gated = {"x_ptr": "*bf16", "out_ptr": "*bf16"}
    compile_for_h100(fused_ops._gated_kernel, gated, dict(GELU=gemma, LIBDEVICE=True, BLOCK=1024), 4, 2, **semantics)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_moe_kernels_compile_for_sm90(dtype):
    """The alignment and, at both tile heights, the gate/up GEMM (rows gathered per token) and the weighted
    down GEMM."""
    types = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "weights_ptr": "*fp32",
             "sorted_pairs_ptr": "*i32", "tile_experts_ptr": "*i32", "num_padded_ptr": "*i32"}
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    for block_m in (16, 64):
        block_n, block_k, warps, stages = fused_moe.gemm_config(block_m, torch_dtype)
        for pairs_per_row, weighted in ((8, False), (1, True)):
            compile_for_h100(fused_moe._grouped_gemm_kernel, types, dict(
                PAIRS_PER_ROW=pairs_per_row, WEIGHTED=weighted, IEEE=dtype == "fp32", BLOCK_M=block_m,
                BLOCK_N=block_n, BLOCK_K=block_k), warps, stages)
        compile_for_h100(fused_moe._layout_kernel, {"counts_ptr": "*i32", "cursors_ptr": "*i32",
                                                    "sorted_pairs_ptr": "*i32", "tile_experts_ptr": "*i32",
                                                    "num_padded_ptr": "*i32"},
                         dict(NUM_EXPERTS=128, BLOCK_E=128, BLOCK_M=block_m, BLOCK_T=2048 // block_m), 8, 2)
    ids = {"ids_ptr": "*i64", "counts_ptr": "*i32", "cursors_ptr": "*i32", "sorted_pairs_ptr": "*i32"}
    compile_for_h100(fused_moe._count_kernel, ids, dict(BLOCK_E=128, BLOCK=fused_moe.PAIRS_PER_PROGRAM), 4, 2)
    compile_for_h100(fused_moe._place_kernel, ids, dict(BLOCK=fused_moe.PAIRS_PER_PROGRAM), 4, 2)
