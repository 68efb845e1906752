"""Attention of a few queries over every token of a token map of keys and values, as one
Triton kernel.

With `SparseConfig(cached_keys_values=True)` a sparse step's self-attention has queries at
the active tokens and keys and values at every token: the cached ones at the step, with
the active rows just written. In a captured step they are a StepView of the per-step
cache, which torch's attention cannot read at a step index in device memory without a
copy. A program takes BLOCK_M queries of one (sample, head) and streams the keys and
values in blocks with an online softmax (FlashAttention's forward), accumulating in fp32.
Head dims that are not a power of two (SD 1.5's 40, 80, 160) are padded with masked lanes.
"""

import torch
import triton
import triton.language as tl

from fisedit.engine.kernels.launch import StepView, launcher, step_addressed
from fisedit.engine.sparse_ops import multi_head_attention

# Query rows per program: fixed, so that row counts (which follow the mask) compile nothing
# new; halved for wide heads, whose accumulators would otherwise spill.
BLOCK_QUERIES = 64
BLOCK_KEYS = 64


def attention_reference(
    queries: torch.Tensor, keys_values: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    """`multi_head_attention` in fp32: queries [B, P, inner], keys_values [B, L, 2 * inner]
    (the keys' features, then the values'), -> [B, P, inner] in the queries' dtype."""
    out = multi_head_attention(queries.float(), keys_values.float(), heads, scale)
    return out.to(queries.dtype)


@triton.jit(do_not_specialize=["P", "L"])
def _attention_kernel(
    q_ptr,
    kv_ptr,
    kv_step_ptr,
    out_ptr,
    P,
    L,
    heads,
    inner,
    qk_scale,
    sq_b,
    sq_p,
    skv_s,
    skv_b,
    skv_l,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, p, head] = softmax over l of q[b, p, head] . k[b, l, head] * scale, applied to
    v[b, l, head]. qk_scale is the scale times log2(e): the softmax runs on exp2. The head
    dim is a constant, so loads of a head's features vectorise (40 = 5 x 8 halves)."""
    head_dim = HEAD_DIM
    sample, head = tl.program_id(1) // heads, tl.program_id(1) % heads
    kv_ptr += tl.load(kv_step_ptr) * skv_s + sample * skv_b + head * head_dim
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask, d_mask = offs_m < P, offs_d < head_dim
    q_offs = sample * sq_b + offs_m[:, None] * sq_p + head * head_dim + offs_d[None, :]
    q_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)
    best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, L, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < L
        keys = tl.load(
            kv_ptr + offs_n[None, :] * skv_l + offs_d[:, None],
            mask=d_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        scores = tl.dot(q, keys) * qk_scale
        scores = tl.where(n_mask[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        weights = tl.math.exp2(scores - new_best[:, None])
        rescale = tl.math.exp2(best - new_best)
        total = total * rescale + tl.sum(weights, 1)
        values = tl.load(
            kv_ptr + inner + offs_n[:, None] * skv_l + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = acc * rescale[:, None] + tl.dot(weights.to(values.dtype), values)
        best = new_best
    acc = acc / total[:, None]
    out_offs = sample * P * inner + offs_m[:, None] * inner + head * head_dim + offs_d[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=q_mask)


def attention(
    queries: torch.Tensor, keys_values: torch.Tensor | StepView, heads: int, scale: float
) -> torch.Tensor:
    """`attention_reference` as one kernel; keys_values may be a StepView of a per-step
    cache. Features must be contiguous (unit stride) in both; the result is contiguous."""
    batch, length, inner = queries.shape
    if keys_values.dim() != 3 or keys_values.shape[0] != batch:
        raise ValueError(f"keys_values must be [{batch}, L, {2 * inner}], got {keys_values.shape}")
    if keys_values.shape[2] != 2 * inner or inner % heads:
        raise ValueError(
            f"{heads} heads of queries [.., {inner}] need keys_values [.., {2 * inner}], "
            f"got {tuple(keys_values.shape)}"
        )
    if keys_values.stride()[-1] != 1:
        raise ValueError("keys_values' features must be contiguous")
    queries = queries if queries.stride(-1) == 1 else queries.contiguous()
    out = torch.empty(batch, length, inner, dtype=queries.dtype, device=queries.device)
    if out.numel() == 0:
        return out
    head_dim = inner // heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = BLOCK_QUERIES if block_d <= 128 else BLOCK_QUERIES // 2
    base, step, step_stride = step_addressed(keys_values)
    grid = (triton.cdiv(length, block_m), batch * heads)
    launcher(_attention_kernel, queries.device)[grid](
        queries,
        base,
        step,
        out,
        length,
        keys_values.shape[1],
        heads,
        inner,
        scale * 1.4426950408889634,
        queries.stride(0),
        queries.stride(1),
        step_stride,
        *keys_values.stride()[:2],
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_KEYS,
        BLOCK_D=block_d,
        num_warps=8,
    )
    return out
