"""A linear layer over token rows as one Triton GEMM, fused with what follows it.

Rows are the B * L tokens of x [B, L, K] (any strides; a StepView of a per-step cache too,
so a captured step reads a cached token map at its step without copying it), columns the
output features. The epilogue adds bias and a residual, or applies GEGLU: its projection's
weights are packed with each hidden column beside its gate column (`pack_linear`), so one
tile holds both halves of its outputs and only hidden * gelu(gate) is written, never the
projection twice as wide. Arithmetic is fp32; outputs take the dtype of x.
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
) -> torch.Tensor:
    """F.linear(x, weight, bias) computed in fp32, then GEGLU (`geglu_reference`, halving
    the features), then + residual; in x's dtype."""
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    if geglu:
        out = geglu_reference(out)
    if residual is not None:
        out = out + residual.float()
    return out.to(x.dtype)


def pack_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, geglu: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear's weight [N, K] as the kernel reads it, [K, N] contiguous, and its bias; for
    GEGLU, features reordered to hidden 0, gate 0, hidden 1, gate 1, ..."""
    if geglu:
        if weight.shape[0] % 2:
            raise ValueError(
                f"a GEGLU projection has an even number of features, got {weight.shape[0]}"
            )
        order = torch.arange(weight.shape[0], device=weight.device)
        order = order.reshape(2, -1).t().flatten()
        weight = weight[order]
        bias = None if bias is None else bias[order]
    return weight.t().contiguous(), None if bias is None else bias.contiguous()


@triton.jit(do_not_specialize=["M", "L"])
def _linear_kernel(
    x_ptr,
    x_step_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    M,
    L,
    K,
    N,
    sx_s,
    sx_b,
    sx_l,
    sx_k,
    sr_b,
    sr_l,
    sr_n,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    GEGLU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    x_ptr += tl.load(x_step_ptr) * sx_s
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_m < M
    n_mask = offs_n < N
    rows = x_ptr + (offs_m // L) * sx_b + (offs_m % L) * sx_l
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        a_mask = row_mask[:, None] & k_mask[None, :]
        a = tl.load(rows[:, None] + k[None, :] * sx_k, mask=a_mask, other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        w = tl.load(w_ptr + k[:, None] * N + offs_n[None, :], mask=w_mask, other=0.0)
        acc += tl.dot(a.to(w.dtype), w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    n_out = N
    if GEGLU:
        # Packed columns 2j and 2j + 1 are hidden and gate feature j of this tile.
        hidden, gate = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        acc = hidden * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
        offs_n = tl.program_id(1) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        n_out = N // 2
        n_mask = offs_n < n_out
    tile_mask = row_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:
        res_rows = (offs_m // L) * sr_b + (offs_m % L) * sr_l
        res = tl.load(res_ptr + res_rows[:, None] + offs_n[None, :] * sr_n, mask=tile_mask)
        acc += res.to(tl.float32)
    out_offs = offs_m[:, None] * n_out + offs_n[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)


def linear(
    x: torch.Tensor | StepView,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    geglu: bool = False,
    *,
    packed: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """`linear_reference` as one kernel; x is [B, L, K], the result [B, L, N] contiguous
    (N / 2 with GEGLU). `packed` (from `pack_linear`, with the same `geglu`) replaces weight
    and bias, so callers can pack once."""
    if packed is None:
        if weight is None:
            raise ValueError("pass weight or packed")
        packed = pack_linear(weight, bias, geglu)
    weight, bias = packed
    batch, length, k = x.shape
    if weight.shape[0] != k or not weight.is_contiguous():
        raise ValueError(f"packed weight must be contiguous [{k}, N], got {tuple(weight.shape)}")
    n = weight.shape[1]
    out = torch.empty(batch, length, n // 2 if geglu else n, dtype=x.dtype, device=x.device)
    if residual is not None and residual.shape != out.shape:
        raise ValueError(f"residual must be {tuple(out.shape)}, got {tuple(residual.shape)}")
    if out.numel() == 0:
        return out
    base, step, step_stride = step_addressed(x)
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    grid = (triton.cdiv(batch * length, BLOCK_ROWS), triton.cdiv(n, block_n))
    launcher(_linear_kernel, x.device)[grid](
        base,
        step,
        weight,
        weight if bias is None else bias,
        weight if residual is None else residual,
        out,
        batch * length,
        length,
        k,
        n,
        step_stride,
        *x.stride(),
        *(residual.stride() if residual is not None else (0, 0, 0)),
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        GEGLU=geglu,
        BLOCK_M=BLOCK_ROWS,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )
    return out
