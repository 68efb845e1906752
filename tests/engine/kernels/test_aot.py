"""The kernels an edit launches build for the GPUs we serve on (sm_90: H100, H200).

Launches are recorded from a real fp16 generation and edit of the tiny model with the Triton
kernels selected, then compiled by Triton's CUDA pipeline and ptxas, with no GPU needed.
"""

import pytest
import torch

from fisedit.engine.config import EngineConfig, SparseConfig
from fisedit.engine.kernels.aot import compile_launches
from fisedit.engine.kernels.attention import attention
from fisedit.engine.kernels.launch import recording_launches
from fisedit.engine.kernels.linear import linear
from fisedit.engine.kernels.sparse_conv import sparse_conv2d_triton

# Shared memory per thread block on sm_90.
SM90_SHARED_BYTES = 227 * 1024
# Registers per thread that each kernel's variants in this test may use: the most ptxas
# reported (Triton 3.9, sm_90; in the comments) plus about a quarter, rounded up to the
# allocation unit of 8. A change that bloats a kernel fails here, before it costs occupancy on
# a GPU; past the hardware's 255 ptxas spills, which is checked on its own. The variants of
# full-size shapes use more (the conv up to 232), and `python -m fisedit.bench.step_launches
# --compile` reports them (bench/results/step-launches-sm90-static-2026-11-28-cpu.json).
REGISTER_BUDGETS = {
    "_sparse_conv_kernel": 176,  # 140: 64x64x64 tiles, GroupNorm affine applied on load
    "_group_norm_affine_kernel": 80,  # 64
    "_gather_tokens_affine_kernel": 64,  # 48
    "_layernorm_rows_kernel": 80,  # 64: up to 4096-element tiles of rows
    "_linear_kernel": 96,  # 72: 64x64x64 tiles, bias and residual
    "_attention_kernel": 184,  # 148: SD 1.5's 160-wide heads
}


@pytest.fixture(scope="module")
def edit_launches(tiny_model_dir, static_step_engine):
    config = EngineConfig(dtype="float16", progress=False, sparse=SparseConfig(kernels="triton"))
    # The launches of the steps a GPU captures (a step index in device memory).
    engine = static_step_engine.from_pretrained(tiny_model_dir, config)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[6:26, 4:20] = True
    # Nothing is run, so this works on any machine; the values computed around are junk.
    with recording_launches() as launches:
        session = engine.generate("a cat on a bench", steps=3, seed=0)
        version = session.edit("a dog on a bench", mask=mask)
        # The tiny model's weights are too small to pay for split-K's partials; the split
        # variants of one of its convs are compiled too.
        channels = engine.model.unet.config.block_out_channels[0]
        x = torch.zeros(2, channels, 32, 32, dtype=torch.float16)
        weight = torch.zeros(channels, channels, 3, 3, dtype=torch.float16)
        sparse_conv2d_triton(x, torch.zeros(20, 9, dtype=torch.long), weight, split_k=3)
        # With cached keys and values: the active tokens' projected into the cache, and the
        # attention over them at SD 1.5's narrowest and widest heads (8 of 40 and of 160).
        half = {"dtype": torch.float16}
        rows, index = torch.zeros(2, 20, 64, **half), torch.zeros(20, dtype=torch.long)
        out = torch.zeros(2, 50, 128, **half)
        linear(rows, torch.zeros(128, 64, **half), out=out, out_index=index)
        for dim in (40, 160):
            queries, keys_values = (
                torch.zeros(2, 64, 8 * dim, **half),
                torch.zeros(2, 256, 16 * dim, **half),
            )
            attention(queries, keys_values, 8, dim**-0.5)
    return version, launches


def test_recording_collects_the_launches_without_running_them(edit_launches):
    version, launches = edit_launches

    assert version.report.sparse_steps == 3
    names = {launch.kernel.fn.__name__ for launch in launches}
    assert names == {
        "_group_norm_affine_kernel",
        "_sparse_conv_kernel",
        "_gather_tokens_affine_kernel",
        "_layernorm_rows_kernel",
        "_linear_kernel",
        "_attention_kernel",
    }
    # Split-K launches come in pairs: partial sums over a 3-D grid, then the finalise pass.
    split = [launch for launch in launches if launch.kwargs.get("PARTIAL")]
    assert split and all(len(launch.grid) == 3 and launch.grid[2] > 1 for launch in split)


def test_every_launched_kernel_compiles_for_sm90_without_spilling(edit_launches):
    _, launches = edit_launches

    resources = compile_launches(launches, arch=90)

    assert len(resources) >= 10
    assert {r.kernel for r in resources} == {launch.kernel.fn.__name__ for launch in launches}
    for r in resources:
        assert 0 < r.registers <= REGISTER_BUDGETS[r.kernel], r
        assert r.spill_bytes == 0, r
        assert r.shared_bytes <= SM90_SHARED_BYTES, r
