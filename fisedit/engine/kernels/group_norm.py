"""GroupNorm statistics as a per-(sample, channel) affine, in one kernel; and GroupNorm of a
whole map as that affine applied by a second, in the map's own layout.

The sparse pass applies GroupNorm as silu(x * scale + shift) inside its conv and gather
kernels, so it needs only scale = weight * rstd and shift = bias - mean * scale per sample
and channel. One program reduces one (sample, group) over its channels and pixels in fp32.

It reduces the map in blocks of BLOCK_SIDE x BLOCK_SIDE pixels: each block's mean and
centred sum of squares (M2), merged block by block with Chan's parallel update, which keeps
the variance accurate when the mean is large against the spread (one read of the map, no
sum of squares that cancels). A recording call writes every block's statistics; the cache
keeps them. A sparse step changes a map only in its active blocks, so it recomputes those
blocks' statistics alone, takes every other block's from the cache, and merges them: the
statistics of the whole mixed map, exact, for a read of the active blocks' pixels and of the
other blocks' statistics (8 bytes a block and group, where its pixels hold 80 in a
320-channel fp16 map).

The affine stays in fp32 whatever the map's dtype: x * scale + shift cancels mean * scale,
so when a group's mean is large against its spread, an fp16 scale and shift lose the low
bits of the normalised value (errors of 0.03 to 0.04 at mean/std 50, ten times fp16
GroupNorm's own; bf16 is worse). Kernels that apply it load fp32, compute in fp32 and cast
only their result.

Dense steps normalise whole maps with `group_norm`: on CUDA, PyTorch's GroupNorm copies a
channels_last map to NCHW first and returns NCHW, which the convolution after it (with
channels_last weights) converts back; these two kernels read and write the map as it is.
A ResNet's norms are followed by SiLU, which the second kernel applies as it writes (a read
and a write of the map fewer).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from fisedit.engine.kernels.launch import (
    ChannelConcat,
    StepView,
    launcher,
    part_addresses,
    runs_interpreted,
)

# Elements one program loads per iteration.
TILE_ELEMENTS = 2048

BLOCK_SIDE = 2
"""Side of the pixel blocks whose statistics a recording keeps (see the module doc)."""


def block_grid(height: int, width: int) -> tuple[int, int]:
    """Rows and columns of statistics blocks over a map (partial blocks at odd sides)."""
    return -(-height // BLOCK_SIDE), -(-width // BLOCK_SIDE)


def empty_block_statistics(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """A buffer for the block statistics of the map `x`: [B, G, 2 * blocks], each block's
    (mean, M2) in fp32, blocks row-major over `block_grid`."""
    rows, cols = block_grid(*x.shape[-2:])
    return torch.empty(
        x.shape[0], norm.num_groups, 2 * rows * cols, dtype=torch.float32, device=x.device
    )


def _affine(norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """[2, B, C] (scale, shift) from per-(sample, group) mean and variance [B, G]."""
    per_group = norm.num_channels // norm.num_groups
    rstd = torch.rsqrt(var.float() + norm.eps).repeat_interleave(per_group, dim=1)
    mean = mean.float().repeat_interleave(per_group, dim=1)
    scale = norm.weight.float() * rstd
    return torch.stack([scale, norm.bias.float() - mean * scale])


def _block_pixels(height: int, width: int) -> torch.Tensor:
    """Pixels in each block of a map [rows, cols] (fp64): fewer in the last row and column
    of blocks at odd sides."""
    rows, cols = block_grid(height, width)
    heights = torch.full((rows,), BLOCK_SIDE, dtype=torch.float64)
    widths = torch.full((cols,), BLOCK_SIDE, dtype=torch.float64)
    heights[-1], widths[-1] = height - (rows - 1) * BLOCK_SIDE, width - (cols - 1) * BLOCK_SIDE
    return heights[:, None] * widths[None, :]


def _block_sums(t: torch.Tensor, groups: int, pad: tuple[int, ...]) -> torch.Tensor:
    """Sums of the map `t` [B, C, H, W] (zero-padded by `pad` to whole blocks) over each
    pixel block and the channels of each of `groups` groups: [B, G, rows, cols]."""
    t = F.pad(t, pad) if any(pad) else t
    return F.avg_pool2d(t, BLOCK_SIDE, divisor_override=1).unflatten(1, (groups, -1)).sum(2)


def block_statistics_reference(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """The block statistics of the map `x` (see `empty_block_statistics`), computed in
    fp64 (M2 in two passes: the squared deviations from each block's mean)."""
    batch, channels, height, width = x.shape
    groups = norm.num_groups
    rows, cols = block_grid(height, width)
    pad = (0, cols * BLOCK_SIDE - width, 0, rows * BLOCK_SIDE - height)
    values = x.double()
    pixels = _block_pixels(height, width).to(x.device)
    mean = _block_sums(values, groups, pad) / (pixels * (channels // groups))
    # Each pixel's block mean; the blocks at odd sides are cut back to the map.
    mean_at = mean.repeat_interleave(BLOCK_SIDE, -2).repeat_interleave(BLOCK_SIDE, -1)
    deviations = values.unflatten(1, (groups, -1)) - mean_at[:, :, None, :height, :width]
    m2 = _block_sums(deviations.square().flatten(1, 2), groups, pad)
    return torch.stack([mean, m2], dim=-1).reshape(batch, groups, -1).float()


def affine_from_block_statistics(
    norm: nn.GroupNorm, statistics: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """The [2, B, C] affine of a map of size `hw` from its block statistics, merged in
    fp64."""
    count = _block_pixels(*hw).flatten().to(statistics.device)
    count *= norm.num_channels // norm.num_groups
    mean, m2 = statistics.double().unflatten(-1, (-1, 2)).unbind(-1)
    group_mean = (mean * count).sum(-1) / count.sum()
    group_m2 = (m2 + count * (mean - group_mean[..., None]) ** 2).sum(-1)
    return _affine(norm, group_mean, group_m2 / count.sum())


def group_norm_affine_reference(
    norm: nn.GroupNorm,
    x: torch.Tensor,
    out: torch.Tensor | None = None,
    blocks: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm of `x` as a per-(sample, channel) affine: returns [2, B, C] (scale, shift)
    in fp32.

    With `out` (block statistics, see `empty_block_statistics`) it also writes x's block
    statistics into `out`. With `blocks` too, the blocks of a sparse step (ids, -1 for none)
    and `active` ([blocks] flags, nonzero for those listed: the kernel reads them, this
    reference the list), it writes only those, and the affine is that of the statistics in
    `out` afterwards: x's in the listed blocks, `out`'s own (recorded from the same pixels)
    in every other."""
    if out is not None:
        statistics = block_statistics_reference(norm, x)
        if blocks is None:
            out.copy_(statistics)
        else:
            listed = blocks[blocks >= 0]
            pairs = torch.stack([2 * listed, 2 * listed + 1], dim=-1).flatten()
            out[..., pairs] = statistics[..., pairs]
            return affine_from_block_statistics(norm, out, tuple(x.shape[-2:]))
    batch = x.shape[0]
    var, mean = torch.var_mean(x.float().reshape(batch, norm.num_groups, -1), dim=-1, correction=0)
    return _affine(norm, mean, var)


@triton.jit(do_not_specialize=["n_listed"])
def _group_norm_affine_kernel(
    x_ptr,
    x_step_ptr,
    x2_ptr,
    x2_step_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    stats_ptr,
    stats_step_ptr,
    blocks_ptr,
    active_ptr,
    H,
    W,
    C1,
    group_channels,
    n_listed,
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
    ss_s,
    ss_b,
    ss_g,
    TWO_PARTS: tl.constexpr,
    WRITE_STATS: tl.constexpr,
    LISTED: tl.constexpr,
    SIDE: tl.constexpr,
    BLOCK_NB: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """TWO_PARTS: channels from C1 on are channel - C1 of x2 (a ChannelConcat).
    WRITE_STATS: write the statistics of the blocks computed. LISTED: compute the n_listed
    blocks at blocks_ptr (-1: none), and read every block whose active flag is 0."""
    x_ptr += tl.load(x_step_ptr) * sx_s
    b = tl.program_id(0)
    g = tl.program_id(1)
    # A tile row is one block: its pixels' channels of the group, pixel-major.
    offs_k = tl.arange(0, SIDE * SIDE * BLOCK_G)
    pixel, offs_g = offs_k // BLOCK_G, offs_k % BLOCK_G
    g_mask = offs_g < group_channels
    c = g * group_channels + offs_g
    in_first = g_mask
    base = x_ptr + b * sx_b + c * sx_c
    if TWO_PARTS:
        in_first = g_mask & (c < C1)
        x2_ptr += tl.load(x2_step_ptr) * sx2_s
        in_second = g_mask & (c >= C1)
        base2 = x2_ptr + b * sx2_b + (c - C1) * sx2_c
    stats_ptr += tl.load(stats_step_ptr) * ss_s + b * ss_b + g * ss_g
    cols = (W + SIDE - 1) // SIDE
    n_blocks = ((H + SIDE - 1) // SIDE) * cols

    # Each lane merges the blocks it meets (Chan's update); the lanes merge at the end.
    lane_n = tl.zeros((BLOCK_NB,), dtype=tl.float32)
    lane_mean = tl.zeros((BLOCK_NB,), dtype=tl.float32)
    lane_m2 = tl.zeros((BLOCK_NB,), dtype=tl.float32)
    n_computed = n_listed if LISTED else n_blocks
    for start in range(0, n_computed, BLOCK_NB):
        j = start + tl.arange(0, BLOCK_NB)
        if LISTED:
            block = tl.load(blocks_ptr + j, mask=j < n_listed, other=-1)
        else:
            block = tl.where(j < n_blocks, j, -1)
        h = (block // cols)[:, None] * SIDE + (pixel // SIDE)[None, :]
        w = (block % cols)[:, None] * SIDE + (pixel % SIDE)[None, :]
        inside = (block >= 0)[:, None] & (h < H) & (w < W)
        values = _load_blocks(base, h, w, inside & in_first[None, :], sx_h, sx_w)
        if TWO_PARTS:
            values += _load_blocks(base2, h, w, inside & in_second[None, :], sx2_h, sx2_w)
        inside = inside & g_mask[None, :]
        n = tl.sum(inside.to(tl.float32), axis=1)
        mean = tl.sum(values, axis=1) / tl.maximum(n, 1.0)
        centred = tl.where(inside, values - mean[:, None], 0.0)
        m2 = tl.sum(centred * centred, axis=1)
        if WRITE_STATS:
            tl.store(stats_ptr + 2 * block, mean, mask=block >= 0)
            tl.store(stats_ptr + 2 * block + 1, m2, mask=block >= 0)
        lane_n, lane_mean, lane_m2 = _merge(lane_n, lane_mean, lane_m2, n, mean, m2)
    if LISTED:
        for start in range(0, n_blocks, BLOCK_NB):
            j = start + tl.arange(0, BLOCK_NB)
            cached = (j < n_blocks) & (tl.load(active_ptr + j, mask=j < n_blocks, other=1) == 0)
            rows = tl.minimum(SIDE, H - (j // cols) * SIDE)
            widths = tl.minimum(SIDE, W - (j % cols) * SIDE)
            n = tl.where(cached, rows * widths * group_channels, 0).to(tl.float32)
            mean = tl.load(stats_ptr + 2 * j, mask=cached, other=0.0)
            m2 = tl.load(stats_ptr + 2 * j + 1, mask=cached, other=0.0)
            lane_n, lane_mean, lane_m2 = _merge(lane_n, lane_mean, lane_m2, n, mean, m2)

    count = tl.sum(lane_n, axis=0)
    group_mean = tl.sum(lane_n * lane_mean, axis=0) / count
    apart = lane_mean - group_mean
    group_m2 = tl.sum(lane_m2 + lane_n * apart * apart, axis=0)
    rstd = 1.0 / tl.sqrt(group_m2 / count + eps)

    scale = tl.load(weight_ptr + c, mask=g_mask).to(tl.float32) * rstd
    shift = tl.load(bias_ptr + c, mask=g_mask).to(tl.float32) - group_mean * scale
    out = out_ptr + b * so_b + c * so_c
    tl.store(out, scale, mask=g_mask)
    tl.store(out + so_k, shift, mask=g_mask)


@triton.jit
def _load_blocks(base, h, w, mask, s_h, s_w):
    """A [blocks, pixels x channels] tile of a group in fp32, zero where masked."""
    return tl.load(base[None, :] + h * s_h + w * s_w, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's update: the statistics of two sets of values from each set's count, mean and
    M2 (either count may be 0)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    weight = n_b / tl.maximum(n, 1.0)
    return n, mean_a + delta * weight, m2_a + m2_b + delta * delta * n_a * weight


def group_norm_affine(
    norm: nn.GroupNorm,
    x: torch.Tensor | StepView | ChannelConcat,
    out: torch.Tensor | StepView | None = None,
    blocks: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """`group_norm_affine_reference` as one kernel; `x` [B, C, H, W] may have any strides,
    or be a StepView, or a ChannelConcat of such maps; `out` may be a StepView."""
    batch, channels, height, width = x.shape
    affine = torch.empty(2, batch, channels, dtype=torch.float32, device=x.device)
    if affine.numel() == 0:
        return affine
    group_channels = channels // norm.num_groups
    block_g = triton.next_power_of_2(group_channels)
    rows, cols = block_grid(height, width)
    # Each element of a tile computes its own address: a quarter tile (an eighth with two
    # parts, two loads per element), and at most 32 blocks, else registers spill.
    tile, most = TILE_ELEMENTS // (8 if isinstance(x, ChannelConcat) else 4), 32
    if runs_interpreted(x.device):
        tile, most = 4 * TILE_ELEMENTS, triton.next_power_of_2(rows * cols)
    block_nb = min(most, tile // (BLOCK_SIDE**2 * block_g), triton.next_power_of_2(rows * cols))
    first, second, first_channels = part_addresses(x)
    statistics = affine if out is None else out  # written only with `out`
    if out is not None and out.stride()[-1] != 1:
        raise ValueError("block statistics must be contiguous in their last dimension")
    stats = part_addresses(statistics)[0]
    listed = blocks is not None
    launcher(_group_norm_affine_kernel, x.device)[(batch, norm.num_groups)](
        first.base,
        first.step,
        second.base,
        second.step,
        norm.weight,
        norm.bias,
        affine,
        stats.base,
        stats.step,
        blocks if listed else affine,
        active if listed else affine,
        height,
        width,
        first_channels,
        group_channels,
        blocks.numel() if listed else 0,
        float(norm.eps),
        *first.strides,
        *second.strides,
        *affine.stride(),
        *stats.strides[:3],
        TWO_PARTS=isinstance(x, ChannelConcat),
        WRITE_STATS=out is not None,
        LISTED=listed,
        SIDE=BLOCK_SIDE,
        BLOCK_NB=max(2, block_nb),
        BLOCK_G=block_g,
    )
    return affine


def group_norm_apply_reference(
    x: torch.Tensor, affine: torch.Tensor, silu: bool = False
) -> torch.Tensor:
    """x * scale + shift over a map [B, C, H, W], in fp32 with the [2, B, C] affine of
    `group_norm_affine` (then SiLU, if `silu`), in x's dtype and memory layout."""
    scale, shift = affine.float()[..., None, None].unbind(0)
    out = x.float() * scale + shift
    return (F.silu(out) if silu else out).to(x.dtype)


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
    SILU: tl.constexpr,
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
    if SILU:
        out = out * tl.sigmoid(out)
    out_offs = (b * so_b + h * so_h + w * so_w)[:, None] + offs_c[None, :] * so_c
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def group_norm_apply(x: torch.Tensor, affine: torch.Tensor, silu: bool = False) -> torch.Tensor:
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
        SILU=silu,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
    )
    return out


def group_norm_reference(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """GroupNorm of the map `x` through its fp32 affine (then SiLU, if `silu`), in x's dtype
    and memory layout."""
    return group_norm_apply_reference(x, group_norm_affine_reference(norm, x), silu)


def group_norm(
    norm: nn.GroupNorm,
    x: torch.Tensor,
    statistics: torch.Tensor | None = None,
    silu: bool = False,
) -> torch.Tensor:
    """`group_norm_reference` as two kernels: the statistics (the blocks' written into
    `statistics` too, when given), then the affine applied (and SiLU, if `silu`)."""
    return group_norm_apply(x, group_norm_affine(norm, x, statistics), silu)
