"""Sparse convolution as one fused implicit GEMM over the active output pixels.

Rows are the B * P active (sample, pixel) pairs, columns the output channels, and K runs over
the T kernel taps times the C input channels. Each program gathers its rows' inputs with
their halo straight from the feature map (any strides; -1 taps read zero padding), applies
the GroupNorm affine and SiLU on load, and accumulates in fp32 with tl.dot. The epilogue adds
bias and residual, scales, and writes tokens or scatters the rows into a feature map. The
input and scattered-into maps may be StepViews of a per-step cache.

Few active pixels make a small grid with a long serial K loop (latency-bound), so K is split
across programs: each split writes a partial sum, and a finalise pass of the same kernel adds
the partials in fp32 in a fixed order (deterministic, no atomics) before the epilogue. A split
pays where the weights are what the conv waits on (few rows, many channels: more programs
pull them at once); where the rows are many and the weights small, the partials would move
more bytes than the weights, so such a conv runs unsplit (`partial_budget`, from
`SparseConfig.split_k_partials`, sets that bound as a fraction of the weights' bytes).

The partials are in the conv's dtype: in fp16 or bf16, half the bytes of fp32, and rounding
a partial costs far less than rounding the output already does. On an SD 1.5 16x16-level
conv (1280 to 1280 channels, K split 7 ways) the RMS error against fp64 went from 0.00299 to
0.00300 in fp16 (the kernel, under the interpreter); in torch, with the inputs already
rounded, 0.00214 to 0.00220 in fp16 and 0.0171 to 0.0176 in bf16.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fisedit.engine.kernels.launch import (
    ChannelConcat,
    StepView,
    launcher,
    multiprocessors,
    part_addresses,
    step_addressed,
)
from fisedit.engine.sparse_ops import scatter_tokens_

# Splits beyond this add workspace traffic for little extra parallelism.
MAX_SPLIT_K = 16


def pack_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """Conv2d weight [C_out, C, kh, kw] as the kernel reads it, [kh * kw * C, C_out].

    Row t * C + c holds tap t (row-major over kh, kw, as in `conv_taps`) and input channel c.
    A linear's weight [C_out, C] packs as a 1x1 conv's. The kernel takes any strides, so a
    channels_last weight (as the engine's are), a linear's and a 1x1 conv's pack as views of
    it, with no copy; others are copied.
    """
    if weight.dim() == 2:
        weight = weight[:, :, None, None]
    c_out = weight.shape[0]
    return weight.permute(2, 3, 1, 0).reshape(-1, c_out)


def sparse_conv2d_reference(
    x: torch.Tensor,
    taps: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm_affine: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out_scale: float = 1.0,
    out: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The conv at the active pixels in plain PyTorch, computed in fp32.

    x [B, C, H, W]; taps [P, T] flat input positions (-1: padding); weight [C_out, C, kh, kw]
    (or a linear's [C_out, C], as 1x1);
    bias [C_out], or [B, C_out] per sample (a ResNet's time embedding rides on its conv1 bias);
    norm_affine [2, B, C] (fp32, from `group_norm_affine`) makes the input
    silu(x * scale + shift), computed in fp32, with padding still zero.
    Returns tokens [B, P, C_out] = (conv + bias + residual) * out_scale, or, given `out` and
    `out_index` [P], writes them into `out` [B, C_out, H_out, W_out] in place and returns it.
    """
    batch, channels = x.shape[:2]
    # A trailing zero column for padding taps to read.
    flat = F.pad(x.float().flatten(2), (0, 1))
    cols = flat[:, :, torch.where(taps < 0, flat.shape[-1] - 1, taps)]  # [B, C, P, T]
    if norm_affine is not None:
        scale, shift = norm_affine.float()[:, :, :, None, None].unbind(0)
        cols = F.silu(cols * scale + shift) * (taps >= 0)
    cols = cols.permute(0, 2, 1, 3).reshape(batch, taps.shape[0], channels * taps.shape[1])
    result = F.linear(cols, weight.float().flatten(1))
    if bias is not None:
        result = result + bias.float().reshape(-1, 1, result.shape[-1])
    if residual is not None:
        result = result + residual.float()
    result = (result * out_scale).to(x.dtype)
    return result if out is None else scatter_tokens_(out, out_index, result)


# Counts that follow the mask: specialising on them (== 1, divisible by 16) would compile
# new variants for new masks, and they only bound loops and masks.
@triton.jit(do_not_specialize=["M", "P", "W_out", "chunks_per_split", "n_splits"])
def _sparse_conv_kernel(
    x_ptr,
    x_step_ptr,
    x2_ptr,
    x2_step_ptr,
    taps_ptr,
    w_ptr,
    bias_ptr,
    affine_ptr,
    res_ptr,
    out_ptr,
    out_step_ptr,
    out_index_ptr,
    part_ptr,
    M,
    P,
    C,
    C1,
    N,
    W_in,
    W_out,
    c_chunks,
    c_chunks1,
    k_chunks,
    chunks_per_split,
    n_splits,
    out_scale,
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
    sb_b,
    sw_k,
    sw_n,
    st_p,
    st_t,
    sa_k,
    sa_b,
    sa_c,
    sr_b,
    sr_p,
    sr_c,
    so_s,
    so_b,
    so_c,
    so_h,
    so_w,
    HAS_BIAS: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SCATTER: tl.constexpr,
    TWO_PARTS: tl.constexpr,
    PARTIAL: tl.constexpr,
    FINALISE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Three passes share this source, picked by constexpr flags:
    fused (neither flag): the whole K loop and the epilogue;
    PARTIAL: split program_id(2) of the K loop, written to part_ptr [n_splits, M, N] in fp32;
    FINALISE: sums those partials in split order, then the epilogue.
    TWO_PARTS: input channels from C1 on are channel - C1 of x2 (a ChannelConcat); a chunk
    of channels lies in one part (c_chunks1 chunks cover the first).
    """
    x_ptr += tl.load(x_step_ptr) * sx_s
    if TWO_PARTS:
        x2_ptr += tl.load(x2_step_ptr) * sx2_s
    out_ptr += tl.load(out_step_ptr) * so_s
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_m < M
    n_mask = offs_n < N
    tile_mask = row_mask[:, None] & n_mask[None, :]
    b = offs_m // P
    p = offs_m % P
    tile_offs = offs_m[:, None] * N + offs_n[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FINALISE:
        for s in range(n_splits):
            part = tl.load(part_ptr + s * M * N + tile_offs, mask=tile_mask, other=0.0)
            acc += part.to(tl.float32)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        start = tl.program_id(2) * chunks_per_split
        end = tl.minimum(start + chunks_per_split, k_chunks)
        # One chunk is BLOCK_K input channels of one tap.
        for i in range(start, end):
            t = i // c_chunks
            chunk = i % c_chunks
            pos = tl.load(taps_ptr + p * st_p + t * st_t, mask=row_mask, other=-1).to(tl.int32)
            valid = pos >= 0
            pos = tl.where(valid, pos, 0)
            y_in, x_in = pos // W_in, pos % W_in
            # c: the input channel (of both parts); local: within its part.
            local = chunk * BLOCK_K + offs_k
            c_mask = local < C1
            a_ptrs = x_ptr + (b * sx_b + y_in * sx_h + x_in * sx_w)[:, None] + local[None, :] * sx_c
            # Nested: the constexpr prunes the runtime branch from one-part variants.
            if TWO_PARTS:  # noqa: SIM102
                if chunk >= c_chunks1:
                    local = (chunk - c_chunks1) * BLOCK_K + offs_k
                    c_mask = local < C - C1
                    pix = b * sx2_b + y_in * sx2_h + x_in * sx2_w
                    a_ptrs = x2_ptr + pix[:, None] + local[None, :] * sx2_c
                    local += C1
            c = local
            a_mask = valid[:, None] & c_mask[None, :]
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            if HAS_AFFINE:
                # Masked scale and shift load as 0, so padding stays silu(0) = 0.
                aff = b[:, None] * sa_b + c[None, :] * sa_c
                scale = tl.load(affine_ptr + aff, mask=a_mask, other=0.0).to(tl.float32)
                shift = tl.load(affine_ptr + sa_k + aff, mask=a_mask, other=0.0).to(tl.float32)
                a = a.to(tl.float32) * scale + shift
                a = a * tl.sigmoid(a)
            w_offs = (t * C + c)[:, None] * sw_k + offs_n[None, :] * sw_n
            w = tl.load(w_ptr + w_offs, mask=c_mask[:, None] & n_mask[None, :], other=0.0)
            acc += tl.dot(a.to(w.dtype), w)

    if PARTIAL:
        part = acc.to(part_ptr.dtype.element_ty)
        tl.store(part_ptr + tl.program_id(2) * M * N + tile_offs, part, mask=tile_mask)
    else:
        if HAS_BIAS:
            bias_offs = b[:, None] * sb_b + offs_n[None, :]
            acc += tl.load(bias_ptr + bias_offs, mask=tile_mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            res_offs = b[:, None] * sr_b + p[:, None] * sr_p + offs_n[None, :] * sr_c
            acc += tl.load(res_ptr + res_offs, mask=tile_mask, other=0.0).to(tl.float32)
        acc = acc * out_scale
        # Tokens [B, P, N] are addressed as a 1 x P map with W_out = P.
        pos = p
        if SCATTER:
            pos = tl.load(out_index_ptr + p, mask=row_mask, other=0).to(tl.int32)
        pix = b * so_b + (pos // W_out) * so_h + (pos % W_out) * so_w
        out_offs = pix[:, None] + offs_n[None, :] * so_c
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)


def _block_sizes(rows: int, cols: int, channels: int) -> tuple[int, int, int]:
    """BLOCK_M, BLOCK_N, BLOCK_K: at least 16 (tl.dot's minimum), no larger than needed."""

    def fit(size: int, cap: int) -> int:
        return min(cap, max(16, triton.next_power_of_2(size)))

    return fit(rows, 64), fit(cols, 64), fit(channels, 64)


def _programs_wanted(device: torch.device) -> int:
    """About two programs per SM; on CPU (the interpreter) a small target still exercises
    the split path."""
    sms = multiprocessors(device)
    return 16 if sms is None else 2 * sms


def _auto_split_k(
    tiles: int, k_chunks: int, partial_bytes: int, budget_bytes: float, device: torch.device
) -> int:
    """Enough splits to give about two programs per SM, when the output tiles alone do not,
    as long as the partials (each split writes `partial_bytes`, the finalise pass reads
    them) move no more than `budget_bytes`."""
    affordable = int(budget_bytes // (2 * partial_bytes))
    wanted = triton.cdiv(_programs_wanted(device), tiles)
    return max(1, min(wanted, affordable, k_chunks, MAX_SPLIT_K))


def sparse_conv2d_triton(
    x: torch.Tensor | StepView | ChannelConcat,
    taps: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    norm_affine: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out_scale: float = 1.0,
    out: torch.Tensor | StepView | None = None,
    out_index: torch.Tensor | None = None,
    *,
    packed_weight: torch.Tensor | None = None,
    split_k: int | None = None,
    partial_budget: float = 1.0,
) -> torch.Tensor:
    """`sparse_conv2d_reference` as one fused Triton kernel (plus a finalise pass if split).

    `packed_weight` (from `pack_conv_weight`) replaces `weight`, so callers can pack once.
    `split_k` splits the K loop (taps x channel chunks) across that many programs; by default
    it is chosen from the grid size, with partial sums that move at most `partial_budget`
    times the weights' bytes.
    """
    batch, channels, _, width = x.shape
    n_pix, n_taps = taps.shape
    first, second, first_channels = part_addresses(x)
    if packed_weight is None:
        if weight is None:
            raise ValueError("pass weight or packed_weight")
        packed_weight = pack_conv_weight(weight)
    if packed_weight.dim() != 2 or packed_weight.shape[0] != n_taps * channels:
        raise ValueError(
            f"packed weight must be [{n_taps * channels}, C_out], got {tuple(packed_weight.shape)}"
        )
    if (out is None) != (out_index is None):
        raise ValueError("out and out_index go together")
    c_out = packed_weight.shape[1]
    if bias is not None and bias.stride(-1) != 1:
        bias = bias.contiguous()
    scatter = out is not None
    if out is None:
        out = torch.empty(batch, n_pix, c_out, dtype=x.dtype, device=x.device)
    if n_pix == 0 or batch == 0:
        return out
    run = launcher(_sparse_conv_kernel, x.device)

    rows = batch * n_pix
    widest = max(first_channels, channels - first_channels)
    block_m, block_n, block_k = _block_sizes(rows, c_out, widest)
    first_chunks = triton.cdiv(first_channels, block_k)
    c_chunks = first_chunks + triton.cdiv(channels - first_channels, block_k)
    k_chunks = n_taps * c_chunks
    tiles = (triton.cdiv(rows, block_m), triton.cdiv(c_out, block_n))
    if split_k is None:
        weight_bytes = packed_weight.numel() * packed_weight.element_size()
        partial_bytes = rows * c_out * x.dtype.itemsize
        split_k = _auto_split_k(
            tiles[0] * tiles[1], k_chunks, partial_bytes, partial_budget * weight_bytes, x.device
        )
    split_k = max(1, min(split_k, k_chunks))
    chunks_per_split = triton.cdiv(k_chunks, split_k)
    # No empty splits: the last one may be short but never idle.
    split_k = triton.cdiv(k_chunks, chunks_per_split)

    if scatter:
        out_index = out_index.contiguous()
        out_strides = out.stride()
        out_width = out.shape[-1]
    else:
        # Tokens [B, P, C_out] as a [B, C_out, 1, P] map.
        out_strides = (out.stride(0), out.stride(2), 0, out.stride(1))
        out_width = n_pix
    out_base, out_step, out_step_stride = step_addressed(out)
    partials = (
        torch.empty(split_k, rows, c_out, dtype=x.dtype, device=x.device)
        if split_k > 1
        else out_base
    )
    # Absent tensors get a stand-in pointer that their constexpr flag keeps unread.
    affine = taps if norm_affine is None else norm_affine
    res = taps if residual is None else residual
    args = [
        first.base,
        first.step,
        second.base,
        second.step,
        taps,
        packed_weight,
        taps if bias is None else bias,
        affine,
        res,
        out_base,
        out_step,
        taps if out_index is None else out_index,
        partials,
        rows,
        n_pix,
        channels,
        first_channels,
        c_out,
        width,
        out_width,
        c_chunks,
        first_chunks,
        k_chunks,
        chunks_per_split,
        split_k,
        float(out_scale),
        *first.strides,
        *second.strides,
        0 if bias is None or bias.dim() == 1 else bias.stride(0),
        *packed_weight.stride(),
        *taps.stride(),
        *(affine.stride() if norm_affine is not None else (0, 0, 0)),
        *(res.stride() if residual is not None else (0, 0, 0)),
        out_step_stride,
        *out_strides,
    ]
    flags = dict(
        HAS_BIAS=bias is not None,
        HAS_AFFINE=norm_affine is not None,
        HAS_RESIDUAL=residual is not None,
        SCATTER=scatter,
        TWO_PARTS=isinstance(x, ChannelConcat),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )
    if split_k == 1:
        run[tiles](*args, PARTIAL=False, FINALISE=False, **flags)
    else:
        run[(*tiles, split_k)](*args, PARTIAL=True, FINALISE=False, **flags)
        run[tiles](*args, PARTIAL=False, FINALISE=True, **flags)
    return out
