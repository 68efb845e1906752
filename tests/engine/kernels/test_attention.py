"""The Triton attention of a few queries over a token map of keys and values equals its
PyTorch reference, and the reference a diffusers Attention over the same tokens.

Kernels run compiled on a GPU, or under Triton's interpreter on CPU tensors (set up by
tests/conftest.py).
"""

import pytest
import torch
from diffusers.models.attention_processor import Attention

from fisedit.engine.kernels.attention import attention, attention_reference
from fisedit.engine.kernels.launch import StepView, interpreting
from fisedit.engine.sparse_ops import key_value_projection

DEVICE = "cpu" if interpreting() else "cuda"


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def test_reference_is_a_diffusers_attention_at_a_subset_of_its_queries():
    attn = Attention(32, heads=4, dim_head=10).requires_grad_(False).to(DEVICE)
    tokens = _randn(2, 12, 32)
    weight, bias = key_value_projection(attn)
    keys_values = torch.nn.functional.linear(tokens, weight, bias)
    rows = torch.tensor([1, 5, 6, 11], device=DEVICE)
    queries = attn.to_q(tokens[:, rows])
    got = attn.to_out[0](attention_reference(queries, keys_values, attn.heads, attn.scale))
    torch.testing.assert_close(got, attn(tokens)[:, rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("heads", "head_dim"), [(2, 40), (1, 64), (2, 160)], ids=["dim-40", "dim-64", "dim-160"]
)
def test_attention_matches_reference(heads, head_dim):
    # More queries than one program takes and keys that fill no block evenly; head dims as
    # SD 1.5's (padded lanes), SD 2.x's and SD 1.5's widest (half as many rows per program).
    inner = heads * head_dim
    queries, keys_values = _randn(2, 70, inner), _randn(2, 100, 2 * inner, seed=1)
    got = attention(queries, keys_values, heads, head_dim**-0.5)
    assert got.shape == (2, 70, inner) and got.is_contiguous()
    expected = attention_reference(queries, keys_values, heads, head_dim**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_keys_and_values_are_read_at_the_step_in_device_memory():
    heads, inner = 2, 32
    cache = _randn(3, 2, 20, 2 * inner, seed=2)
    queries = _randn(2, 5, inner, seed=3)
    view = StepView(cache, torch.tensor([1], device=DEVICE))
    got = attention(queries, view, heads, 0.25)
    expected = attention_reference(queries, cache[1], heads, 0.25)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    view.step.fill_(2)
    expected = attention_reference(queries, cache[2], heads, 0.25)
    torch.testing.assert_close(attention(queries, view, heads, 0.25), expected)


def test_half_precision_is_within_rounding_of_fp32():
    heads, inner = 2, 80
    queries, keys_values = _randn(2, 33, inner), _randn(2, 90, 2 * inner, seed=1)
    got = attention(queries.half(), keys_values.half(), heads, 40**-0.5)
    assert got.dtype == torch.float16
    exact = attention_reference(queries.half(), keys_values.half(), heads, 40**-0.5).float()
    # The softmax weights are rounded to fp16 before the values are summed, as in
    # FlashAttention: a few ulps of the output.
    torch.testing.assert_close(got.float(), exact, atol=4e-3, rtol=4e-3)


def test_mismatched_shapes_name_what_is_wrong():
    queries = _randn(2, 5, 32)
    with pytest.raises(ValueError, match=r"keys_values \[\.\., 64\]"):
        attention(queries, _randn(2, 9, 48), 2, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        attention(queries, _randn(2, 64, 9).transpose(1, 2), 2, 1.0)
