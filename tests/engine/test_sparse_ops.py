"""Each sparse operator equals its dense layer at the active pixels of a partial mask."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisedit.engine.sparse_ops import (
    attention,
    conv_taps,
    gather_tokens,
    group_norm_affine,
    scatter_tokens,
    sparse_conv2d,
)


@pytest.fixture
def active() -> torch.Tensor:
    torch.manual_seed(0)
    # Includes border pixels, so padding taps are exercised.
    return torch.tensor([0, 5, 7, 18, 36, 63])


def _dense_tokens(out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return gather_tokens(out, index)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding"), [(3, 1, 1), (1, 1, 0), (3, 2, 1), (3, 2, 0)]
)
def test_sparse_conv_equals_dense_conv_at_active_pixels(active, kernel, stride, padding):
    conv = nn.Conv2d(6, 5, kernel, stride=stride, padding=padding)
    x = torch.randn(2, 6, 16, 16)
    dense = conv(x)
    index = active[active < dense.shape[-1] * dense.shape[-2]]

    taps = conv_taps(index, tuple(dense.shape[-2:]), (16, 16), conv)
    tokens = sparse_conv2d(x, conv, taps)

    torch.testing.assert_close(tokens, _dense_tokens(dense, index), atol=1e-5, rtol=1e-5)


def test_sparse_conv_fuses_group_norm_and_silu_with_zero_padding(active):
    norm, conv = nn.GroupNorm(2, 6), nn.Conv2d(6, 4, 3, padding=1)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 6, 8, 8)
    dense = conv(F.silu(norm(x)))

    taps = conv_taps(active, (8, 8), (8, 8), conv)
    tokens = sparse_conv2d(x, conv, taps, group_norm_affine(norm, x))

    torch.testing.assert_close(tokens, _dense_tokens(dense, active), atol=1e-5, rtol=1e-5)


def test_sparse_conv_reads_a_nearest_upsampled_input_without_materialising_it(active):
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 4, 4)
    dense = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    taps = conv_taps(active, (8, 8), (4, 4), conv, upsample=2)

    torch.testing.assert_close(
        sparse_conv2d(x, conv, taps), _dense_tokens(dense, active), atol=1e-5, rtol=1e-5
    )


def test_group_norm_affine_reproduces_group_norm():
    norm = nn.GroupNorm(4, 8, eps=1e-6)
    nn.init.normal_(norm.weight)
    x = torch.randn(2, 8, 5, 5) * 3 + 1
    scale, shift = group_norm_affine(norm, x)

    torch.testing.assert_close(x * scale[..., None, None] + shift[..., None, None], norm(x))


def test_scatter_replaces_only_active_pixels(active):
    base = torch.zeros(1, 2, 8, 8)
    tokens = torch.arange(12.0).reshape(1, 6, 2)

    out = scatter_tokens(base, active, tokens)

    assert torch.equal(gather_tokens(out, active), tokens)
    assert out.abs().sum() == tokens.sum()
    assert base.abs().sum() == 0


def test_attention_on_query_subset_equals_rows_of_full_attention():
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=16, heads=2, dim_head=8)
    x = torch.randn(2, 10, 16)
    rows = torch.tensor([1, 4, 9])

    torch.testing.assert_close(attention(attn, x[:, rows], x), attn(x)[:, rows])
