"""A linear layer over token rows as one Triton GEMM, fused with what follows it.

Rows are the B * L tokens of x [B, L, K] (any strides; a StepView of a per-step cache too,
so a captured step reads a cached token map at its step without copying it), columns the
output features. The epilogue adds bias and a residual, or applies GEGLU: a program
accumulates the same columns of its projection's hidden and gate halves, so only
hidden * gelu(gate) is written, never the projection twice as wide. The rows go to a new
tensor, or into given rows of a token map (a StepView too: a step's cached keys and values
at the active tokens). Weights are read as the layer holds them, [N, K] with any strides:
the engine keeps no second, packed copy. Arithmetic is fp32; outputs take the dtype of x.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fisedit.engine.kernels.launch import StepView, launcher, step_addressed

# Rows per program: fixed, so that row counts (which follow the mask) compile nothing new.
BLOCK_ROWS = 64


def geglu_reference(projected: torch.Tensor) -> torch.Tensor:
    """GEGLU after its projection: [..., 2 * I] -> [..., I], hidden * gelu(gate) with the
    hidden half first, as diffusers' GEGLU (exact, erf-based GELU)."""
    hidden, gate = projected.chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    geglu: bool = False,
    out: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.linear(x, weight, bias) computed in fp32, then GEGLU (`geglu_reference`, halving
    the features), then + residual; in x's dtype. With `out` [B, L', N] and `out_index`
    [L], written into rows `out_index` of `out`, which it returns."""
    rows = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    if geglu:
        rows = geglu_reference(rows)
    if residual is not None:
        rows = rows + residual.float()
    if out is None:
        return rows.to(x.dtype)
    out[:, out_index] = rows.to(out.dtype)
    return out


@triton.jit(do_not_specialize=["M", "L"])
def _linear_kernel(
    x_ptr,
    x_step_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    out_step_ptr,
    index_ptr,
    M,
    L,
    K,
    N,
    sx_s,
    sx_b,
    sx_l,
    sx_k,
    sw_n,
    sw_k,
    sr_b,
    sr_l,
    sr_n,
    so_s,
    so_b,
    so_l,
    so_n,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    GEGLU: tl.constexpr,
    SCATTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out = x @ w.T (+ bias), then with GEGLU hidden * gelu(gate), then + residual. w is
    the layer's own [N, K] weight, any strides; with GEGLU its rows are the hidden features,
    then the gate features, and a program takes the same BLOCK_N columns of both halves.
    Row l of sample b goes to row l of out, or with SCATTER to row index[l]."""
    x_ptr += tl.load(x_step_ptr) * sx_s
    n_out = N
    if GEGLU:
        n_out = N // 2
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_m < M
    n_mask = offs_n < n_out
    rows = x_ptr + (offs_m // L) * sx_b + (offs_m % L) * sx_l
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GEGLU:
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        a_mask = row_mask[:, None] & k_mask[None, :]
        a = tl.load(rows[:, None] + k[None, :] * sx_k, mask=a_mask, other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        w_offs = k[:, None] * sw_k + offs_n[None, :] * sw_n
        w = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0)
        acc += tl.dot(a.to(w.dtype), w)
        if GEGLU:
            w = tl.load(w_ptr + n_out * sw_n + w_offs, mask=w_mask, other=0.0)
            gate += tl.dot(a.to(w.dtype), w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if GEGLU:
        if HAS_BIAS:
            gate_bias = tl.load(bias_ptr + n_out + offs_n, mask=n_mask, other=0.0)
            gate += gate_bias.to(tl.float32)[None, :]
        acc = acc * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
    tile_mask = row_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:
        res_rows = (offs_m // L) * sr_b + (offs_m % L) * sr_l
        res = tl.load(res_ptr + res_rows[:, None] + offs_n[None, :] * sr_n, mask=tile_mask)
        acc += res.to(tl.float32)
    out_ptr += tl.load(out_step_ptr) * so_s
    out_rows = offs_m % L
    if SCATTER:
        out_rows = tl.load(index_ptr + out_rows, mask=row_mask, other=0)
    out_rows = (offs_m // L) * so_b + out_rows * so_l
    out_offs = out_rows[:, None] + offs_n[None, :] * so_n
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)


def linear(
    x: torch.Tensor | StepView,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    geglu: bool = False,
    out: torch.Tensor | StepView | None = None,
    out_index: torch.Tensor | None = None,
) -> torch.Tensor | StepView:
    """`linear_reference` as one kernel; x is [B, L, K], the result [B, L, N] contiguous
    (N / 2 with GEGLU), or rows `out_index` of `out` (a StepView too), which it returns.
    The kernel reads the weight [N, K] where it lies, with its strides: no packed copy of
    it (a stack of layers' weights, too, as `stacked_linear` makes)."""
    batch, length, k = x.shape
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must be [N, {k}], got {tuple(weight.shape)}")
    n = weight.shape[0]
    if geglu and n % 2:
        raise ValueError(f"a GEGLU projection has an even number of features, got {n}")
    n_out = n // 2 if geglu else n
    if (out is None) != (out_index is None):
        raise ValueError("out and out_index go together")
    scatter = out is not None
    if scatter:
        if out.dim() != 3 or out.shape[0] != batch or out.shape[2] != n_out:
            raise ValueError(f"out must be [{batch}, L, {n_out}], got {tuple(out.shape)}")
        if out_index.shape != (length,):
            raise ValueError(f"out_index must be [{length}], got {tuple(out_index.shape)}")
        out_index = out_index.contiguous()
    else:
        out = torch.empty(batch, length, n_out, dtype=x.dtype, device=x.device)
    if residual is not None and residual.shape != (batch, length, n_out):
        raise ValueError(f"residual must be {(batch, length, n_out)}, got {tuple(residual.shape)}")
    if batch * length == 0:
        return out
    if bias is not None and bias.stride(-1) != 1:
        bias = bias.contiguous()
    base, step, step_stride = step_addressed(x)
    out_base, out_step, out_step_stride = step_addressed(out)
    # GEGLU's programs hold two accumulators: half as many columns each.
    block_n = min(32 if geglu else 64, max(16, triton.next_power_of_2(n_out)))
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    grid = (triton.cdiv(batch * length, BLOCK_ROWS), triton.cdiv(n_out, block_n))
    launcher(_linear_kernel, x.device)[grid](
        base,
        step,
        weight,
        weight if bias is None else bias,
        weight if residual is None else residual,
        out_base,
        out_step,
        out_index if scatter else out_step,
        batch * length,
        length,
        k,
        n,
        step_stride,
        *x.stride(),
        *weight.stride(),
        *(residual.stride() if residual is not None else (0, 0, 0)),
        out_step_stride,
        *out.stride(),
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        GEGLU=geglu,
        SCATTER=scatter,
        BLOCK_M=BLOCK_ROWS,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return out
