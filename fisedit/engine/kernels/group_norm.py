"""GroupNorm statistics as a per-(sample, channel) affine, in one kernel.

The sparse pass applies GroupNorm as silu(x * scale + shift) inside its conv and gather
kernels, so it needs only scale = weight * rstd and shift = bias - mean * scale per sample
and channel. A sparse step computes them for every norm over the layer's mixed input
(fresh in the region, cached elsewhere), so one launch replaces the handful of reductions
and casts the PyTorch version takes. One
program reduces one (sample, group) over its channels and pixels in fp32, in two passes
(mean, then the centred variance) for accuracy.

The affine stays in fp32 whatever the map's dtype: x * scale + shift cancels mean * scale,
so when a group's mean is large against its spread, an fp16 scale and shift lose the low
bits of the normalised value (errors of 0.03 to 0.04 at mean/std 50, ten times fp16
GroupNorm's own; bf16 is worse). Kernels that apply it load fp32, compute in fp32 and cast
only their result.
"""

import torch
import triton
import triton.language as tl
from torch import nn

from fisedit.engine.kernels.launch import ChannelConcat, StepView, launcher, part_addresses

# Elements one program loads per iteration.
TILE_ELEMENTS = 2048


def group_norm_affine_reference(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm of `x` as a per-(sample, channel) affine: returns [2, B, C] (scale, shift)
    in fp32."""
    batch, channels = x.shape[:2]
    groups = x.float().reshape(batch, norm.num_groups, -1)
    var, mean = torch.var_mean(groups, dim=-1, unbiased=False)
    rstd = torch.rsqrt(var + norm.eps).repeat_interleave(channels // norm.num_groups, dim=1)
    mean = mean.repeat_interleave(channels // norm.num_groups, dim=1)
    scale = norm.weight.float() * rstd
    shift = norm.bias.float() - mean * scale
    return torch.stack([scale, shift])


@triton.jit
def _group_norm_affine_kernel(
    x_ptr,
    x_step_ptr,
    x2_ptr,
    x2_step_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    HW,
    W,
    C1,
    group_channels,
    eps,
    sx_s,
    sx_b,
    sx_c,
    sx_h,
    sx_w,
    sx2_s,
    sx2_b,
    sx2_c,
    sx2_h,
    sx2_w,
    so_k,
    so_b,
    so_c,
    TWO_PARTS: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """TWO_PARTS: channels from C1 on are channel - C1 of x2 (a ChannelConcat)."""
    x_ptr += tl.load(x_step_ptr) * sx_s
    b = tl.program_id(0)
    g = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < group_channels
    c = g * group_channels + offs_g
    in_first = g_mask
    base = x_ptr + b * sx_b + c[None, :] * sx_c
    if TWO_PARTS:
        in_first = g_mask & (c < C1)
        x2_ptr += tl.load(x2_step_ptr) * sx2_s
        in_second = g_mask & (c >= C1)
        base2 = x2_ptr + b * sx2_b + (c - C1)[None, :] * sx2_c
    count = HW * group_channels

    total = tl.zeros((BLOCK_HW, BLOCK_G), dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        pix = start + tl.arange(0, BLOCK_HW)
        total += _load_group(base, pix, in_first, W, HW, sx_h, sx_w)
        if TWO_PARTS:
            total += _load_group(base2, pix, in_second, W, HW, sx2_h, sx2_w)
    mean = tl.sum(tl.sum(total, axis=1), axis=0) / count

    squares = tl.zeros((BLOCK_HW, BLOCK_G), dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        pix = start + tl.arange(0, BLOCK_HW)
        values = _load_group(base, pix, in_first, W, HW, sx_h, sx_w)
        if TWO_PARTS:
            values += _load_group(base2, pix, in_second, W, HW, sx2_h, sx2_w)
        mask = (pix < HW)[:, None] & g_mask[None, :]
        centred = tl.where(mask, values - mean, 0.0)
        squares += centred * centred
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(squares, axis=1), axis=0) / count + eps)

    scale = tl.load(weight_ptr + c, mask=g_mask).to(tl.float32) * rstd
    shift = tl.load(bias_ptr + c, mask=g_mask).to(tl.float32) - mean * scale
    out = out_ptr + b * so_b + c * so_c
    tl.store(out, scale, mask=g_mask)
    tl.store(out + so_k, shift, mask=g_mask)


@triton.jit
def _load_group(base, pix, channels, W, HW, s_h, s_w):
    """A [pixels, channels] tile of a group in fp32, zero where masked."""
    mask = (pix < HW)[:, None] & channels[None, :]
    offs = ((pix // W) * s_h + (pix % W) * s_w)[:, None]
    return tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)


def group_norm_affine(
    norm: nn.GroupNorm, x: torch.Tensor | StepView | ChannelConcat
) -> torch.Tensor:
    """`group_norm_affine_reference` as one kernel; `x` [B, C, H, W] may have any strides,
    or be a StepView, or a ChannelConcat of such maps."""
    batch, channels, height, width = x.shape
    out = torch.empty(2, batch, channels, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    group_channels = channels // norm.num_groups
    block_g = triton.next_power_of_2(group_channels)
    pixels = height * width
    # Two parts: two loads per tile, so half the tile (else registers spill).
    tile = TILE_ELEMENTS // (2 if isinstance(x, ChannelConcat) else 1)
    block_hw = min(triton.next_power_of_2(pixels), max(16, tile // block_g))
    first, second, first_channels = part_addresses(x)
    launcher(_group_norm_affine_kernel, x.device)[(batch, norm.num_groups)](
        first.base,
        first.step,
        second.base,
        second.step,
        norm.weight,
        norm.bias,
        out,
        pixels,
        width,
        first_channels,
        group_channels,
        float(norm.eps),
        *first.strides,
        *second.strides,
        *out.stride(),
        TWO_PARTS=isinstance(x, ChannelConcat),
        BLOCK_HW=block_hw,
        BLOCK_G=block_g,
    )
    return out
