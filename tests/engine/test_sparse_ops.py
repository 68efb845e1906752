"""Building blocks of the sparse pass equal their dense counterparts."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisedit.engine.sparse_ops import (
    attention_over,
    conv_taps,
    gather_tokens,
    key_value_projection,
)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "upsample"),
    [(3, 1, 1, 1), (1, 1, 0, 1), (3, 2, 1, 1), (3, 1, 1, 2)],
)
def test_conv_taps_read_what_the_dense_conv_reads(kernel, stride, padding, upsample):
    conv = nn.Conv2d(1, 1, kernel, stride=stride, padding=padding, bias=False)
    # Each input pixel holds its own flat position + 1, so the taps can be read back.
    x = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    source = F.interpolate(x, scale_factor=upsample, mode="nearest") if upsample > 1 else x
    out_hw = tuple(F.conv2d(source, conv.weight, stride=stride, padding=padding).shape[-2:])
    index = torch.arange(out_hw[0] * out_hw[1])

    taps = conv_taps(index, out_hw, (4, 4), conv, upsample)

    patches = F.unfold(source, kernel, padding=padding, stride=stride)[0].T  # [P, k*k]
    assert torch.equal(torch.where(taps < 0, 0, taps + 1).float(), patches)


def test_gather_tokens_takes_the_active_pixels_in_order():
    x = torch.arange(2 * 3 * 16.0).reshape(2, 3, 4, 4)

    tokens = gather_tokens(x, torch.tensor([0, 5, 15]))

    assert tokens.shape == (2, 3, 3)
    assert tokens[1, 1].tolist() == [x[1, 0, 1, 1], x[1, 1, 1, 1], x[1, 2, 1, 1]]


def test_attention_on_query_subset_equals_rows_of_full_attention():
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=16, heads=2, dim_head=8)
    x = torch.randn(2, 10, 16)
    rows = torch.tensor([1, 4, 9])

    keys_values = F.linear(x, *key_value_projection(attn))
    torch.testing.assert_close(attention_over(attn, x[:, rows], keys_values), attn(x)[:, rows])
