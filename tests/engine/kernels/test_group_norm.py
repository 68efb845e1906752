"""GroupNorm statistics as an affine: the reference reproduces nn.GroupNorm, and the Triton
kernel equals the reference (compiled on a GPU, interpreted on CPU tensors)."""

import pytest
import torch
from torch import nn

from fisedit.engine.kernels.group_norm import group_norm_affine, group_norm_affine_reference
from fisedit.engine.kernels.launch import interpreting

DEVICE = "cpu" if interpreting() else "cuda"


def _norm(groups: int, channels: int, seed: int = 0) -> nn.GroupNorm:
    torch.manual_seed(seed)
    norm = nn.GroupNorm(groups, channels, eps=1e-6)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    return norm.requires_grad_(False).to(DEVICE)


def _map(channels: int, height: int, width: int, channels_last: bool = False) -> torch.Tensor:
    x = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(1))
    x = (x * 3 + 1).to(DEVICE)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def test_reference_reproduces_group_norm():
    norm, x = _norm(4, 8), _map(8, 5, 5)

    scale, shift = group_norm_affine_reference(norm, x)

    torch.testing.assert_close(x * scale[..., None, None] + shift[..., None, None], norm(x))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    ("groups", "channels", "height", "width"),
    # Channels per group a power of two or not; pixels fewer than, equal to and more than
    # one tile; a single pixel.
    [(4, 8, 5, 5), (2, 20, 8, 8), (3, 30, 16, 20), (4, 64, 48, 48), (8, 16, 1, 1)],
)
def test_triton_matches_reference(groups, channels, height, width, channels_last):
    norm, x = _norm(groups, channels), _map(channels, height, width, channels_last)

    torch.testing.assert_close(
        group_norm_affine(norm, x), group_norm_affine_reference(norm, x), atol=1e-5, rtol=1e-4
    )


def test_fp16_maps_give_fp16_affines_close_to_the_reference():
    norm, x = _norm(4, 32).half(), _map(32, 16, 16, channels_last=True).half()

    got = group_norm_affine(norm, x)

    assert got.dtype == torch.float16 and got.shape == (2, 2, 32)
    torch.testing.assert_close(got, group_norm_affine_reference(norm, x), atol=2e-3, rtol=2e-3)


def test_an_empty_batch_launches_nothing():
    norm = _norm(4, 8)

    assert group_norm_affine(norm, torch.zeros(0, 8, 4, 4, device=DEVICE)).shape == (2, 0, 8)
