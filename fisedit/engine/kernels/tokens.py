"""Token gathers and row norms around transformer blocks, fused with their elementwise neighbours.

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

from fisedit.engine.kernels.launch import StepView, launcher, step_addressed
from fisedit.engine.sparse_ops import gather_tokens


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
    x_step_ptr,
    index_ptr,
    affine_ptr,
    tokens_ptr,
    normed_ptr,
    P,
    C,
    W,
    sx_s,
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
    x_ptr += tl.load(x_step_ptr) * sx_s
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
    x: torch.Tensor | StepView, index: torch.Tensor, norm_affine: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gather_tokens_affine_reference` as one kernel (`x` may be a StepView); without an
    affine, tokens come twice."""
    batch, channels, _, width = x.shape
    n_pix = index.shape[0]
    tokens = torch.empty(batch, n_pix, channels, dtype=x.dtype, device=x.device)
    normed = tokens if norm_affine is None else torch.empty_like(tokens)
    if tokens.numel() == 0:
        return tokens, normed
    block_p, block_c = _tile(n_pix), _tile(channels)
    grid = (triton.cdiv(n_pix, block_p), triton.cdiv(channels, block_c), batch)
    base, step, step_stride = step_addressed(x)
    affine = base if norm_affine is None else norm_affine
    launcher(_gather_tokens_affine_kernel, x.device)[grid](
        base,
        step,
        index.contiguous(),
        affine,
        tokens,
        normed,
        n_pix,
        channels,
        width,
        step_stride,
        *x.stride(),
        *(affine.stride() if norm_affine is not None else (0, 0, 0)),
        HAS_AFFINE=norm_affine is not None,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
    )
    return tokens, normed


# Elements of the [rows, D] tile one program of `layernorm_rows` holds.
ROWS_TILE_ELEMENTS = 4096


def _rows_tile(n_rows: int, dim: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_D) of a row kernel: whole rows, as many as fit the tile."""
    block_d = triton.next_power_of_2(dim)
    return min(triton.next_power_of_2(n_rows), max(1, ROWS_TILE_ELEMENTS // block_d)), block_d


def layernorm_rows_reference(
    rows: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LayerNorm of tokens [B, P, D] over D with fp32 statistics. Given the token map
    `out` [B, L, D] and `index` [P], it also goes into rows `index` of `out`, in place."""
    weight = None if weight is None else weight.float()
    bias = None if bias is None else bias.float()
    normed = F.layer_norm(rows.float(), rows.shape[-1:], weight, bias, eps).to(rows.dtype)
    if out is not None:
        out[:, index] = normed.to(out.dtype)
    return normed


@triton.jit(do_not_specialize=["P"])
def _layernorm_rows_kernel(
    rows_ptr,
    index_ptr,
    map_ptr,
    map_step_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    P,
    D,
    eps,
    sr_b,
    sr_p,
    sr_d,
    sm_s,
    sm_b,
    sm_l,
    sm_d,
    SCATTER: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program normalises BLOCK_P token rows, each held whole in registers.
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    b = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    d_mask = offs < D
    mask = (offs_p < P)[:, None] & d_mask[None, :]
    x = tl.load(
        rows_ptr + b * sr_b + offs_p[:, None] * sr_p + offs[None, :] * sr_d, mask=mask, other=0.0
    ).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)
    y = centred * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + offs, mask=d_mask).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs, mask=d_mask).to(tl.float32)[None, :]
    y = y.to(out_ptr.dtype.element_ty)
    out_offs = (b * P + offs_p)[:, None] * D + offs[None, :]
    tl.store(out_ptr + out_offs, y, mask=mask)
    if SCATTER:
        map_ptr += tl.load(map_step_ptr) * sm_s
        row = tl.load(index_ptr + offs_p, mask=offs_p < P, other=0)
        map_offs = b * sm_b + row[:, None] * sm_l + offs[None, :] * sm_d
        tl.store(map_ptr + map_offs, y.to(map_ptr.dtype.element_ty), mask=mask)


def layernorm_rows(
    rows: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out: torch.Tensor | StepView | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """`layernorm_rows_reference` as one kernel (`out` may be a StepView)."""
    batch, n_rows, dim = rows.shape
    if (out is None) != (index is None):
        raise ValueError("out and index go together")
    normed = torch.empty(batch, n_rows, dim, dtype=rows.dtype, device=rows.device)
    if normed.numel() == 0:
        return normed
    base, step, step_stride = step_addressed(normed if out is None else out)
    block_p, block_d = _rows_tile(n_rows, dim)
    grid = (triton.cdiv(n_rows, block_p), batch)
    launcher(_layernorm_rows_kernel, rows.device)[grid](
        rows,
        rows if index is None else index.contiguous(),
        base,
        step,
        rows if weight is None else weight.contiguous(),
        rows if bias is None else bias.contiguous(),
        normed,
        n_rows,
        dim,
        float(eps),
        *rows.stride(),
        step_stride,
        *(out.stride() if out is not None else (0, 0, 0)),
        SCATTER=index is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        BLOCK_P=block_p,
        BLOCK_D=block_d,
    )
    return normed
