"""Token gathers and scatters around transformer blocks, fused with their elementwise neighbours.

Feature maps are [B, C, H, W] with any strides (NCHW or channels_last); `index` [P] holds the
active flat pixel positions (row-major), shared by the batch. Token maps are [B, L, D], and
may be StepViews of a per-step cache. Arithmetic is fp32; results take the dtype of the map
they come from or go into. The token count P follows the mask, so no kernel specialises on
it: a new mask compiles nothing new.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fisedit.engine.kernels.launch import StepView, launcher, mirror_addressed, step_addressed
from fisedit.engine.sparse_ops import gather_tokens, scatter_tokens_


def _tile(size: int, cap: int = 64) -> int:
    return min(cap, triton.next_power_of_2(max(size, 1)))


def gather_tokens_affine_reference(
    x: torch.Tensor, index: torch.Tensor, norm_affine: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, P, C] at the active pixels, tokens * scale + shift computed in fp32 with the
    fp32 [2, B, C] affine of `group_norm_affine`)."""
    tokens = gather_tokens(x, index).contiguous()
    if norm_affine is None:
        return tokens, tokens
    scale, shift = norm_affine.float()[:, :, None, :].unbind(0)
    return tokens, (tokens.float() * scale + shift).to(x.dtype)


@triton.jit(do_not_specialize=["P"])
def _gather_tokens_affine_kernel(
    x_ptr,
    index_ptr,
    affine_ptr,
    tokens_ptr,
    normed_ptr,
    P,
    C,
    W,
    sx_b,
    sx_c,
    sx_h,
    sx_w,
    sa_k,
    sa_b,
    sa_c,
    HAS_AFFINE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(2)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    mask = (offs_p < P)[:, None] & c_mask[None, :]
    pos = tl.load(index_ptr + offs_p, mask=offs_p < P, other=0).to(tl.int32)
    pix = b * sx_b + (pos // W) * sx_h + (pos % W) * sx_w
    tokens = tl.load(x_ptr + pix[:, None] + offs_c[None, :] * sx_c, mask=mask)
    out_offs = (b * P + offs_p)[:, None] * C + offs_c[None, :]
    tl.store(tokens_ptr + out_offs, tokens, mask=mask)
    if HAS_AFFINE:
        scale = tl.load(affine_ptr + b * sa_b + offs_c * sa_c, mask=c_mask).to(tl.float32)
        shift = tl.load(affine_ptr + sa_k + b * sa_b + offs_c * sa_c, mask=c_mask).to(tl.float32)
        normed = tokens.to(tl.float32) * scale[None, :] + shift[None, :]
        tl.store(normed_ptr + out_offs, normed.to(normed_ptr.dtype.element_ty), mask=mask)


def gather_tokens_affine(
    x: torch.Tensor, index: torch.Tensor, norm_affine: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gather_tokens_affine_reference` as one kernel; without an affine, tokens come twice."""
    batch, channels, _, width = x.shape
    n_pix = index.shape[0]
    tokens = torch.empty(batch, n_pix, channels, dtype=x.dtype, device=x.device)
    normed = tokens if norm_affine is None else torch.empty_like(tokens)
    if tokens.numel() == 0:
        return tokens, normed
    block_p, block_c = _tile(n_pix), _tile(channels)
    grid = (triton.cdiv(n_pix, block_p), triton.cdiv(channels, block_c), batch)
    affine = x if norm_affine is None else norm_affine
    launcher(_gather_tokens_affine_kernel, x.device)[grid](
        x,
        index.contiguous(),
        affine,
        tokens,
        normed,
        n_pix,
        channels,
        width,
        *x.stride(),
        *(affine.stride() if norm_affine is not None else (0, 0, 0)),
        HAS_AFFINE=norm_affine is not None,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
    )
    return tokens, normed


def gather_rows_layernorm_reference(
    rows: torch.Tensor,
    index: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """LayerNorm over D of rows[:, index] ([B, L, D] -> [B, P, D]; all rows if index is None)."""
    picked = rows if index is None else rows[:, index]
    weight = None if weight is None else weight.float()
    bias = None if bias is None else bias.float()
    normed = F.layer_norm(picked.float(), picked.shape[-1:], weight, bias, eps)
    return normed.to(rows.dtype)


@triton.jit(do_not_specialize=["P"])
def _gather_rows_layernorm_kernel(
    rows_ptr,
    rows_step_ptr,
    index_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    P,
    D,
    eps,
    sr_s,
    sr_b,
    sr_l,
    sr_d,
    HAS_INDEX: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program normalises BLOCK_P output rows, each held whole in registers.
    rows_ptr += tl.load(rows_step_ptr) * sr_s
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    b = tl.program_id(1)
    row = offs_p
    if HAS_INDEX:
        row = tl.load(index_ptr + offs_p, mask=offs_p < P, other=0)
    offs = tl.arange(0, BLOCK_D)
    d_mask = offs < D
    mask = (offs_p < P)[:, None] & d_mask[None, :]
    x = tl.load(
        rows_ptr + b * sr_b + row[:, None] * sr_l + offs[None, :] * sr_d, mask=mask, other=0.0
    ).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)
    y = centred * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + offs, mask=d_mask).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs, mask=d_mask).to(tl.float32)[None, :]
    out_offs = (b * P + offs_p)[:, None] * D + offs[None, :]
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=mask)


# Elements of the [rows, D] tile one program of the row kernels or `geglu` holds.
ROWS_TILE_ELEMENTS = 4096


def _rows_tile(n_rows: int, dim: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_D) of a row kernel: whole rows, as many as fit the tile."""
    block_d = triton.next_power_of_2(dim)
    return min(triton.next_power_of_2(n_rows), max(1, ROWS_TILE_ELEMENTS // block_d)), block_d


def gather_rows_layernorm(
    rows: torch.Tensor | StepView,
    index: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """`gather_rows_layernorm_reference` as one kernel, with fp32 statistics."""
    batch, length, dim = rows.shape
    n_rows = length if index is None else index.shape[0]
    out = torch.empty(batch, n_rows, dim, dtype=rows.dtype, device=rows.device)
    if out.numel() == 0:
        return out
    base, step, step_stride = step_addressed(rows)
    block_p, block_d = _rows_tile(n_rows, dim)
    grid = (triton.cdiv(n_rows, block_p), batch)
    launcher(_gather_rows_layernorm_kernel, rows.device)[grid](
        base,
        step,
        base if index is None else index.contiguous(),
        base if weight is None else weight.contiguous(),
        base if bias is None else bias.contiguous(),
        out,
        n_rows,
        dim,
        float(eps),
        step_stride,
        *rows.stride(),
        HAS_INDEX=index is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_P=block_p,
        BLOCK_D=block_d,
    )
    return out


def scatter_tokens_into_reference(
    out: torch.Tensor,
    index: torch.Tensor,
    tokens: torch.Tensor,
    residual: torch.Tensor | None = None,
    mirror: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sets the active pixels of the map `out` [B, C, H, W] to tokens (+ residual), in place,
    and those of `mirror`, a map like `out`, too."""
    values = tokens.float() if residual is None else tokens.float() + residual.float()
    if mirror is not None:
        scatter_tokens_(mirror, index, values)
    return scatter_tokens_(out, index, values)


@triton.jit(do_not_specialize=["P"])
def _scatter_tokens_kernel(
    tokens_ptr,
    res_ptr,
    index_ptr,
    out_ptr,
    mirror_ptr,
    mirror_step_ptr,
    P,
    C,
    W,
    st_b,
    st_p,
    st_c,
    sr_b,
    sr_p,
    sr_c,
    sm_s,
    so_b,
    so_c,
    so_h,
    so_w,
    HAS_RESIDUAL: tl.constexpr,
    MIRROR: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(2)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_p < P)[:, None] & (offs_c < C)[None, :]
    values = tl.load(
        tokens_ptr + b * st_b + offs_p[:, None] * st_p + offs_c[None, :] * st_c, mask=mask
    ).to(tl.float32)
    if HAS_RESIDUAL:
        res_offs = b * sr_b + offs_p[:, None] * sr_p + offs_c[None, :] * sr_c
        values += tl.load(res_ptr + res_offs, mask=mask).to(tl.float32)
    pos = tl.load(index_ptr + offs_p, mask=offs_p < P, other=0).to(tl.int32)
    pix = b * so_b + (pos // W) * so_h + (pos % W) * so_w
    out_offs = pix[:, None] + offs_c[None, :] * so_c
    tl.store(out_ptr + out_offs, values.to(out_ptr.dtype.element_ty), mask=mask)
    if MIRROR:
        mirror_ptr += tl.load(mirror_step_ptr) * sm_s
        tl.store(mirror_ptr + out_offs, values.to(mirror_ptr.dtype.element_ty), mask=mask)


def scatter_tokens_into(
    out: torch.Tensor,
    index: torch.Tensor,
    tokens: torch.Tensor,
    residual: torch.Tensor | None = None,
    mirror: torch.Tensor | StepView | None = None,
) -> torch.Tensor:
    """`scatter_tokens_into_reference` as one kernel (`mirror` may be a StepView)."""
    batch, channels, _, width = out.shape
    n_pix = index.shape[0]
    if n_pix == 0 or batch == 0 or channels == 0:
        return out
    block_p, block_c = _tile(n_pix), _tile(channels)
    grid = (triton.cdiv(n_pix, block_p), triton.cdiv(channels, block_c), batch)
    mirror_base, mirror_step, mirror_step_stride = mirror_addressed(mirror, out)
    launcher(_scatter_tokens_kernel, out.device)[grid](
        tokens,
        tokens if residual is None else residual,
        index.contiguous(),
        out,
        mirror_base,
        mirror_step,
        n_pix,
        channels,
        width,
        *tokens.stride(),
        *(residual.stride() if residual is not None else (0, 0, 0)),
        mirror_step_stride,
        *out.stride(),
        HAS_RESIDUAL=residual is not None,
        MIRROR=mirror is not None,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
    )
    return out


def layernorm_rows_reference(
    rows: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows + residual, its LayerNorm over D), for tokens [B, P, D]. The sum is rounded to
    its dtype before it is normalised, as adding and then normalising would do. Given the
    token map `out` [B, L, D] and `index` [P], the sum goes into rows `index` of `out` in
    place, and `out` comes first instead."""
    summed = rows if residual is None else rows + residual
    if out is not None:
        out[:, index] = summed.to(out.dtype)
        summed = out[:, index]
    normed = gather_rows_layernorm_reference(summed, None, weight, bias, eps)
    return (summed if out is None else out), normed


@triton.jit
def _layernorm_rows_kernel(
    rows_ptr,
    res_ptr,
    index_ptr,
    sum_ptr,
    sum_step_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    P,
    D,
    eps,
    sr_b,
    sr_p,
    sr_d,
    sres_b,
    sres_p,
    sres_d,
    ss_s,
    ss_b,
    ss_l,
    ss_d,
    HAS_RESIDUAL: tl.constexpr,
    SCATTER: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program sums and normalises BLOCK_P token rows, each held whole in registers.
    sum_ptr += tl.load(sum_step_ptr) * ss_s
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    b = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    d_mask = offs < D
    mask = (offs_p < P)[:, None] & d_mask[None, :]
    x = tl.load(
        rows_ptr + b * sr_b + offs_p[:, None] * sr_p + offs[None, :] * sr_d, mask=mask, other=0.0
    ).to(tl.float32)
    if HAS_RESIDUAL:
        res_offs = b * sres_b + offs_p[:, None] * sres_p + offs[None, :] * sres_d
        x += tl.load(res_ptr + res_offs, mask=mask, other=0.0).to(tl.float32)
    row = offs_p
    if SCATTER:
        row = tl.load(index_ptr + offs_p, mask=offs_p < P, other=0)
    summed = x.to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + b * ss_b + row[:, None] * ss_l + offs[None, :] * ss_d, summed, mask=mask)
    x = summed.to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)
    y = centred * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + offs, mask=d_mask).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs, mask=d_mask).to(tl.float32)[None, :]
    out_offs = (b * P + offs_p)[:, None] * D + offs[None, :]
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def layernorm_rows(
    rows: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out: torch.Tensor | StepView | None = None,
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor | StepView, torch.Tensor]:
    """`layernorm_rows_reference` as one kernel, with fp32 statistics."""
    batch, n_rows, dim = rows.shape
    if (out is None) != (index is None):
        raise ValueError("out and index go together")
    summed = torch.empty_like(rows) if out is None else out
    normed = torch.empty(batch, n_rows, dim, dtype=rows.dtype, device=rows.device)
    if normed.numel() == 0:
        return summed, normed
    base, step, step_stride = step_addressed(summed)
    block_p, block_d = _rows_tile(n_rows, dim)
    grid = (triton.cdiv(n_rows, block_p), batch)
    launcher(_layernorm_rows_kernel, rows.device)[grid](
        rows,
        rows if residual is None else residual,
        rows if index is None else index.contiguous(),
        base,
        step,
        base if weight is None else weight.contiguous(),
        base if bias is None else bias.contiguous(),
        normed,
        n_rows,
        dim,
        float(eps),
        *rows.stride(),
        *(residual.stride() if residual is not None else (0, 0, 0)),
        step_stride,
        *summed.stride(),
        HAS_RESIDUAL=residual is not None,
        SCATTER=index is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_P=block_p,
        BLOCK_D=block_d,
    )
    return summed, normed


def geglu_reference(projected: torch.Tensor) -> torch.Tensor:
    """GEGLU after its projection: [..., 2 * I] -> [..., I], hidden * gelu(gate) with the
    hidden half first, as diffusers' GEGLU (exact, erf-based GELU)."""
    hidden, gate = projected.chunk(2, dim=-1)
    return hidden * F.gelu(gate)


@triton.jit
def _geglu_kernel(
    x_ptr,
    out_ptr,
    M,
    INNER,
    sx_m,
    so_m,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (offs_m < M)[:, None] & (offs_i < INNER)[None, :]
    row = x_ptr + offs_m[:, None] * sx_m + offs_i[None, :]
    hidden = tl.load(row, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(row + INNER, mask=mask, other=0.0).to(tl.float32)
    gelu = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    out = out_ptr + offs_m[:, None] * so_m + offs_i[None, :]
    tl.store(out, (hidden * gelu).to(out_ptr.dtype.element_ty), mask=mask)


def geglu(projected: torch.Tensor) -> torch.Tensor:
    """`geglu_reference` as one kernel, computed in fp32."""
    *lead, width = projected.shape
    inner = width // 2
    x = projected.reshape(-1, width)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape[0], inner, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out.reshape(*lead, inner)
    block_i = _tile(inner, cap=128)
    block_m = _tile(x.shape[0], cap=ROWS_TILE_ELEMENTS // block_i)
    grid = (triton.cdiv(x.shape[0], block_m), triton.cdiv(inner, block_i))
    launcher(_geglu_kernel, x.device)[grid](
        x,
        out,
        x.shape[0],
        inner,
        x.stride(0),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_I=block_i,
    )
    return out.reshape(*lead, inner)
