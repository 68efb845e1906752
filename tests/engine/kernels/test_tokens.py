"""The Triton token gathers and row norms equal their PyTorch references and the dense ops.

Kernels run compiled on a GPU, or under Triton's interpreter on CPU tensors (set up by
tests/conftest.py).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisedit.engine import sparse_ops
from fisedit.engine.kernels.group_norm import group_norm_affine, group_norm_affine_reference
from fisedit.engine.kernels.launch import StepView, interpreting, with_step_views
from fisedit.engine.kernels.tokens import (
    gather_tokens_affine,
    gather_tokens_affine_reference,
    layernorm_rows,
    layernorm_rows_reference,
)

DEVICE = "cpu" if interpreting() else "cuda"
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# Border and inner pixels of an 8x8 map.
INDEX = torch.tensor([0, 7, 19, 36, 63], device=DEVICE)
EMPTY = torch.zeros(0, dtype=torch.long, device=DEVICE)


def _randn(*shape: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _map(channels: int = 20, memory_format: str = "nchw", seed: int = 0) -> torch.Tensor:
    return _randn(2, channels, 8, 8, seed=seed).to(memory_format=FORMATS[memory_format])


def _tokens(channels: int = 20, seed: int = 1) -> torch.Tensor:
    return _randn(2, len(INDEX), channels, seed=seed)


def test_gather_reference_equals_group_norm_at_active_pixels():
    norm = nn.GroupNorm(4, 20).requires_grad_(False)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    norm.to(DEVICE)
    x = _map()
    tokens, normed = gather_tokens_affine_reference(x, INDEX, group_norm_affine_reference(norm, x))
    torch.testing.assert_close(tokens, sparse_ops.gather_tokens(x, INDEX))
    torch.testing.assert_close(normed, sparse_ops.gather_tokens(norm(x), INDEX))


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_gather_tokens_affine_matches_reference(memory_format, affine):
    x = _map(memory_format=memory_format)
    norm_affine = _randn(2, 2, 20) if affine else None
    tokens, normed = gather_tokens_affine(x, INDEX, norm_affine)
    ref_tokens, ref_normed = gather_tokens_affine_reference(x, INDEX, norm_affine)
    torch.testing.assert_close(tokens, ref_tokens, atol=0, rtol=0)
    torch.testing.assert_close(normed, ref_normed)
    assert tokens.shape == (2, len(INDEX), 20) and tokens.is_contiguous()
    assert (normed is tokens) == (not affine)


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    # One rounding of the result to the dtype; with an affine in the dtype the error is 2.5e-2
    # (fp16) and 0.14 (bf16) at mean/std 20.
    [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)],
    ids=["fp16", "bf16"],
)
@pytest.mark.parametrize("mean_over_std", [0, 20, 50])
def test_low_precision_gather_normalises_like_fp32_group_norm(dtype, tolerance, mean_over_std):
    gen = torch.Generator().manual_seed(0)
    norm = nn.GroupNorm(4, 20).requires_grad_(False)
    nn.init.normal_(norm.weight, generator=gen)
    nn.init.normal_(norm.bias, generator=gen)
    norm.to(DEVICE, dtype)
    x = (_map(memory_format="channels_last") + mean_over_std).to(dtype)

    _, normed = gather_tokens_affine(x, INDEX, group_norm_affine(norm, x))

    # GroupNorm of the same rounded map and weights in fp64, as in test_group_norm.
    weight, bias = norm.weight.double(), norm.bias.double()
    expected = F.group_norm(x.double(), norm.num_groups, weight, bias, norm.eps)
    assert normed.dtype == dtype
    torch.testing.assert_close(
        normed.double(), sparse_ops.gather_tokens(expected, INDEX), atol=tolerance, rtol=tolerance
    )


def _layer_norm(dim: int = 20) -> nn.LayerNorm:
    layer = nn.LayerNorm(dim).requires_grad_(False)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    return layer.to(DEVICE)


def test_layernorm_reference_is_torchs_layer_norm():
    layer = _layer_norm()
    rows = _tokens()
    normed = layernorm_rows_reference(rows, layer.weight, layer.bias, layer.eps)
    torch.testing.assert_close(normed, layer(rows))


@pytest.mark.parametrize("affine", [False, True], ids=["no-affine", "affine"])
def test_layernorm_matches_reference(affine):
    layer = _layer_norm()
    weight, bias = (layer.weight, layer.bias) if affine else (None, None)
    # Offset rows (the variance is taken about the mean), with their own strides.
    rows = (_tokens() * 3 + 5).transpose(1, 2).contiguous().transpose(1, 2)
    got = layernorm_rows(rows, weight, bias, 1e-5)
    expected = layernorm_rows_reference(rows, weight, bias, 1e-5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_layernorm_spans_programs_the_last_one_partial():
    # 20 channels: a program holds 128 rows, so 300 rows take three.
    rows = _randn(2, 300, 20) * 3 + 5
    got = layernorm_rows(rows, None, None, 1e-5)
    expected = layernorm_rows_reference(rows, None, None, 1e-5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_layernorm_rows_into_a_step_of_a_cache_sets_only_those_rows(kernel):
    """The LayerNorm written into rows of step 1 of a [steps, B, L, D] buffer, addressed
    through a step index in device memory, as a captured sparse step writes attn1's input
    into its run's cache."""
    layer = _layer_norm()
    buffer, rows = _randn(3, 2, 64, 20), _tokens(seed=3)
    view = StepView(buffer.clone(), torch.tensor([1], device=DEVICE))
    run = layernorm_rows if kernel == "triton" else with_step_views(layernorm_rows_reference)
    normed = run(rows, layer.weight, layer.bias, layer.eps, view, INDEX)
    torch.testing.assert_close(normed, layer(rows), atol=1e-5, rtol=1e-5)
    expected_map = buffer[1].clone()
    expected_map[:, INDEX] = normed
    assert torch.equal(view.buffer[1], expected_map)
    for step in (0, 2):
        assert torch.equal(view.buffer[step], buffer[step])


def test_empty_index_gives_empty_gathers_and_unchanged_maps():
    x, rows = _map(), _randn(2, 64, 20)
    tokens, normed = gather_tokens_affine(x, EMPTY, _randn(2, 2, 20))
    assert tokens.shape == normed.shape == (2, 0, 20)
    none = torch.zeros(2, 0, 20, device=DEVICE)
    into = rows.clone()
    normed = layernorm_rows(none, None, None, 1e-5, into, EMPTY)
    assert normed.shape == (2, 0, 20)
    assert torch.equal(into, rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_gpu_matches_reference():
    x = _map(64, "channels_last").cuda().half()
    index = INDEX.cuda()
    # GroupNorm affines are fp32 whatever the model dtype.
    affine = torch.randn(2, 2, 64).cuda()
    tokens, normed = gather_tokens_affine(x, index, affine)
    _, ref_normed = gather_tokens_affine_reference(x.float(), index, affine)
    torch.testing.assert_close(tokens, sparse_ops.gather_tokens(x, index), atol=0, rtol=0)
    torch.testing.assert_close(normed.float(), ref_normed, atol=1e-3, rtol=1e-3)

    rows = torch.randn(2, 64, 320, device="cuda", dtype=torch.half)
    weight, bias = torch.randn(320, device="cuda").half(), torch.randn(320, device="cuda").half()

    # Rows offset by 20 standard deviations: the statistics are fp32.
    got = layernorm_rows(rows[:, :10] + 20, weight, bias, 1e-5)
    expected = layernorm_rows_reference(rows[:, :10].float() + 20, weight, bias, 1e-5)
    torch.testing.assert_close(got.float(), expected, atol=1e-2, rtol=1e-2)
