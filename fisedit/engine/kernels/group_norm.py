"""GroupNorm statistics as a per-(sample, channel) affine, in one kernel; and GroupNorm of a
whole map as that affine applied by a second, in the map's own layout.

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

Dense steps normalise whole maps with `group_norm`: on CUDA, PyTorch's GroupNorm copies a
channels_last map to NCHW first and returns NCHW, which the convolution after it (with
channels_last weights) converts back; these two kernels read and write the map as it is.
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


def group_norm_apply_reference(x: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """x * scale + shift over a map [B, C, H, W], in fp32 with the [2, B, C] affine of
    `group_norm_affine`, in x's dtype and memory layout."""
    scale, shift = affine.float()[..., None, None].unbind(0)
    return (x.float() * scale + shift).to(x.dtype)


@triton.jit
def _group_norm_apply_kernel(
    x_ptr,
    affine_ptr,
    out_ptr,
    HW,
    C,
    W,
    sx_b,
    sx_c,
    sx_h,
    sx_w,
    sa_k,
    sa_b,
    sa_c,
    so_b,
    so_c,
    so_h,
    so_w,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(2)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = (offs_p < HW)[:, None] & c_mask[None, :]
    h, w = offs_p // W, offs_p % W
    x_offs = (b * sx_b + h * sx_h + w * sx_w)[:, None] + offs_c[None, :] * sx_c
    x = tl.load(x_ptr + x_offs, mask=mask).to(tl.float32)
    scale = tl.load(affine_ptr + b * sa_b + offs_c * sa_c, mask=c_mask)
    shift = tl.load(affine_ptr + sa_k + b * sa_b + offs_c * sa_c, mask=c_mask)
    out = x * scale[None, :] + shift[None, :]
    out_offs = (b * so_b + h * so_h + w * so_w)[:, None] + offs_c[None, :] * so_c
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def group_norm_apply(x: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """`group_norm_apply_reference` as one kernel: the output has x's strides (channels_last
    in, channels_last out)."""
    batch, channels, height, width = x.shape
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    # Tiles of pixels x channels: the channels of a channels_last map are contiguous.
    block_c = min(64, triton.next_power_of_2(channels))
    block_p = min(triton.next_power_of_2(height * width), TILE_ELEMENTS // block_c)
    grid = (triton.cdiv(height * width, block_p), triton.cdiv(channels, block_c), batch)
    launcher(_group_norm_apply_kernel, x.device)[grid](
        x,
        affine,
        out,
        height * width,
        channels,
        width,
        *x.stride(),
        *affine.stride(),
        *out.stride(),
        BLOCK_P=block_p,
        BLOCK_C=block_c,
    )
    return out


def group_norm_reference(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm of the map `x` through its fp32 affine, in x's dtype and memory layout."""
    return group_norm_apply_reference(x, group_norm_affine_reference(norm, x))


def group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """`group_norm_reference` as two kernels: the statistics, then the affine applied."""
    return group_norm_apply(x, group_norm_affine(norm, x))
