"""GroupNorm statistics as an affine: the reference reproduces nn.GroupNorm, and the Triton
kernel equals the reference (compiled on a GPU, interpreted on CPU tensors). The affine is
fp32 for maps of any dtype. Statistics of pixel blocks merge to the map's: a sparse call
recomputes the blocks it changed and merges the recorded ones. GroupNorm of a whole map
applies the affine in the map's own layout, and SiLU after it where asked."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisedit.engine.kernels.group_norm import (
    BLOCK_SIDE,
    affine_from_block_statistics,
    block_grid,
    block_statistics_reference,
    empty_block_statistics,
    group_norm,
    group_norm_affine,
    group_norm_affine_reference,
    group_norm_reference,
)
from fisedit.engine.kernels.launch import ChannelConcat, StepView, interpreting

DEVICE = "cpu" if interpreting() else "cuda"


def _norm(groups: int, channels: int, seed: int = 0) -> nn.GroupNorm:
    torch.manual_seed(seed)
    norm = nn.GroupNorm(groups, channels, eps=1e-6)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    return norm.requires_grad_(False).to(DEVICE)


def _map(
    channels: int,
    height: int,
    width: int,
    channels_last: bool = False,
    mean: float = 1.0,
    std: float = 3.0,
) -> torch.Tensor:
    x = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(1))
    x = (x * std + mean).to(DEVICE)
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
# Group means 0, 20 and 50 times the spread: shift = bias - mean * scale then cancels most of
# x * scale, which an fp16 or bf16 affine cannot do to fp16 GroupNorm's own accuracy.
@pytest.mark.parametrize("mean_over_std", [0, 20, 50])
@pytest.mark.parametrize(
    "affine_of", [group_norm_affine, group_norm_affine_reference], ids=["triton", "reference"]
)
def test_low_precision_maps_give_fp32_affines_that_normalise_them_exactly(
    affine_of, dtype, mean_over_std
):
    norm = _norm(4, 32).to(dtype)
    x = _map(32, 16, 16, channels_last=True, mean=mean_over_std, std=1.0).to(dtype)

    scale, shift = affine_of(norm, x)

    assert scale.dtype == shift.dtype == torch.float32 and scale.shape == (2, 32)
    # Against GroupNorm of the same rounded map and weights in fp64 (PyTorch's fp32 GroupNorm
    # of a channels_last map on CPU is itself off by 2e-3 at mean/std 50).
    weight, bias = norm.weight.double(), norm.bias.double()
    expected = F.group_norm(x.double(), norm.num_groups, weight, bias, norm.eps)
    normed = x.float() * scale[..., None, None] + shift[..., None, None]
    torch.testing.assert_close(normed.double(), expected, atol=1e-4, rtol=1e-4)


def test_reads_a_channels_last_map_at_a_step_in_device_memory():
    norm, x = _norm(2, 20), _map(20, 8, 8, channels_last=True)
    # Steps of channels_last maps, laid out as an activation cache stores them.
    buffer = torch.randn(3 * 2, 20, 8, 8, device=DEVICE).to(memory_format=torch.channels_last)
    buffer = buffer.view(3, 2, 20, 8, 8)
    buffer[1] = x
    view = StepView(buffer, torch.tensor([1], device=DEVICE))

    torch.testing.assert_close(group_norm_affine(norm, view), group_norm_affine_reference(norm, x))


def test_reads_a_map_in_two_channel_parts_as_their_concatenation():
    """A skip connection's input, never concatenated: 12 + 8 channels in 4 groups of 5, so
    groups straddle the parts; the second part a channels_last map at a step."""
    norm = _norm(4, 20)
    first, second = _map(12, 8, 8), _map(8, 8, 8, channels_last=True)
    buffer = torch.randn(3 * 2, 8, 8, 8, device=DEVICE).to(memory_format=torch.channels_last)
    buffer = buffer.view(3, 2, 8, 8, 8)
    buffer[2] = second
    joined = ChannelConcat(first, StepView(buffer, torch.tensor([2], device=DEVICE)))

    expected = group_norm_affine_reference(norm, torch.cat([first, second], dim=1))
    torch.testing.assert_close(group_norm_affine(norm, joined), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    # Partial blocks at odd sides; a single pixel.
    ("groups", "channels", "height", "width"),
    [(4, 8, 5, 5), (3, 30, 16, 20), (8, 16, 1, 1)],
)
def test_block_statistics_merge_to_the_statistics_of_the_whole_map(groups, channels, height, width):
    norm, x = _norm(groups, channels), _map(channels, height, width, mean=50.0, std=1.0)

    statistics = block_statistics_reference(norm, x)

    rows, cols = block_grid(height, width)
    assert statistics.shape == (2, groups, 2 * rows * cols)
    torch.testing.assert_close(
        affine_from_block_statistics(norm, statistics, (height, width)),
        group_norm_affine_reference(norm, x),
    )


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    ("groups", "channels", "height", "width"), [(4, 8, 5, 5), (3, 30, 16, 20), (4, 64, 12, 12)]
)
def test_triton_writes_each_blocks_statistics_as_it_reduces(
    groups, channels, height, width, channels_last
):
    norm, x = _norm(groups, channels), _map(channels, height, width, channels_last)
    statistics = empty_block_statistics(norm, x)

    affine = group_norm_affine(norm, x, statistics)

    torch.testing.assert_close(affine, group_norm_affine_reference(norm, x), atol=1e-5, rtol=1e-4)
    expected = block_statistics_reference(norm, x)
    torch.testing.assert_close(statistics, expected, atol=1e-4, rtol=1e-4)


def _edit_blocks(x: torch.Tensor, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` with new values (another mean and spread) in `blocks`, and every block's flag."""
    rows, cols = block_grid(*x.shape[-2:])
    active = torch.zeros(rows * cols, dtype=torch.uint8)
    active[blocks] = 1
    region = active.bool().reshape(rows, cols)
    region = region.repeat_interleave(BLOCK_SIDE, 0).repeat_interleave(BLOCK_SIDE, 1)
    region = region[: x.shape[-2], : x.shape[-1]].to(x.device)
    edited = torch.where(region, torch.randn_like(x) * 2 + 45, x)
    return edited, active.to(x.device)


@pytest.mark.parametrize(
    "affine_of", [group_norm_affine, group_norm_affine_reference], ids=["triton", "reference"]
)
def test_a_sparse_call_recomputes_its_blocks_and_merges_the_recorded_ones(affine_of):
    """The recorded statistics are those of the map before the edit; the call lists the
    blocks it changed (the last, partial at odd sides, among them; -1 pads the list)."""
    norm, x = _norm(4, 20), _map(20, 9, 11, mean=50.0, std=1.0)
    rows, cols = block_grid(9, 11)
    changed = [0, 7, 12, rows * cols - 1]
    edited, active = _edit_blocks(x, changed)
    blocks = torch.tensor([*changed, -1, -1], dtype=torch.int32, device=DEVICE)
    statistics = block_statistics_reference(norm, x)

    affine = affine_of(norm, edited, statistics, blocks, active)

    expected = group_norm_affine_reference(norm, edited)
    torch.testing.assert_close(affine, expected, atol=1e-5, rtol=1e-4)
    recorded = block_statistics_reference(norm, edited)
    torch.testing.assert_close(statistics, recorded, atol=1e-4, rtol=1e-4)


def test_a_sparse_call_reads_two_parts_and_its_statistics_at_a_step_in_device_memory():
    norm = _norm(4, 20)
    first, second = _map(12, 8, 8), _map(8, 8, 8, channels_last=True)
    joined = torch.cat([first, second], dim=1)
    edited, active = _edit_blocks(joined, [3, 4, 9])
    blocks = torch.tensor([3, 4, 9], dtype=torch.int32, device=DEVICE)
    buffer = torch.zeros(3, 2, 4, 2 * 16, device=DEVICE)
    buffer[1] = block_statistics_reference(norm, joined)
    step = StepView(buffer, torch.tensor([1], device=DEVICE))
    parts = ChannelConcat(
        edited[:, :12], edited[:, 12:].contiguous(memory_format=torch.channels_last)
    )

    affine = group_norm_affine(norm, parts, step, blocks, active)

    torch.testing.assert_close(
        affine, group_norm_affine_reference(norm, edited), atol=1e-5, rtol=1e-4
    )
    expected = block_statistics_reference(norm, edited)
    torch.testing.assert_close(buffer[1], expected, atol=1e-4, rtol=1e-4)
    assert torch.count_nonzero(buffer[0]) == torch.count_nonzero(buffer[2]) == 0


def test_an_empty_batch_launches_nothing():
    norm = _norm(4, 8)

    assert group_norm_affine(norm, torch.zeros(0, 8, 4, 4, device=DEVICE)).shape == (2, 0, 8)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_reference_is_group_norm_in_the_maps_layout(channels_last):
    norm, x = _norm(4, 8), _map(8, 5, 7, channels_last)

    normed = group_norm_reference(norm, x)

    torch.testing.assert_close(normed, norm(x))
    assert normed.stride() == x.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    ("groups", "channels", "height", "width"),
    # Channels fewer than, equal to and more than one tile (64); pixels likewise.
    [(4, 8, 5, 5), (3, 30, 16, 20), (8, 96, 12, 12), (8, 16, 1, 1)],
)
def test_triton_group_norm_matches_reference_and_keeps_the_layout(
    groups, channels, height, width, channels_last, dtype
):
    norm = _norm(groups, channels).to(dtype)
    x = _map(channels, height, width, channels_last).to(dtype)

    normed = group_norm(norm, x)

    tolerance = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(normed, group_norm_reference(norm, x), **tolerance)
    assert normed.dtype == dtype and normed.stride() == x.stride()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_with_silu_is_silu_of_group_norm_rounded_once(channels_last):
    norm, half_norm = _norm(8, 96), _norm(8, 96).half()
    x = _map(96, 12, 12, channels_last, mean=20.0)
    half_x = x.half()

    normed = group_norm(norm, x, silu=True)
    half = group_norm(half_norm, half_x, silu=True)

    torch.testing.assert_close(normed, F.silu(norm(x)), atol=1e-5, rtol=1e-4)
    assert normed.stride() == half.stride() == x.stride()
    assert group_norm_reference(norm, x, silu=True).stride() == x.stride()
    # In fp16 the SiLU comes before the one rounding: within half an fp16 ulp (2**-11 of
    # the value) of the fp32 computation on the same fp16 inputs.
    weight, bias = half_norm.weight.float(), half_norm.bias.float()
    exact = F.silu(F.group_norm(half_x.float(), 8, weight, bias, half_norm.eps))
    torch.testing.assert_close(half.float(), exact, atol=1e-5, rtol=2**-11)
