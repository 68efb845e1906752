"""Plain PyTorch building blocks of the sparse pass: tap tables, per-token layers and
attention on a subset of queries.

Feature maps are [B, C, H, W]; values at active pixels travel as tokens [B, P, C], where
`index` holds the P active flat pixel positions (row-major) shared by the whole batch. The
gather -> dense op -> scatter references of the fused kernels live beside them in
`fisedit.engine.kernels`.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, P, C] at the active pixels."""
    return x.flatten(2)[:, :, index].transpose(1, 2)


def scatter_tokens_(out: torch.Tensor, index: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Writes tokens [B, P, C] into the map `out` [B, C, H, W] at the active pixels, in place."""
    width = out.shape[-1]
    out[:, :, index // width, index % width] = tokens.transpose(1, 2).to(out.dtype)
    return out


def conv_taps(
    index: torch.Tensor,
    out_hw: tuple[int, int],
    in_hw: tuple[int, int],
    conv: nn.Conv2d,
    upsample: int = 1,
) -> torch.Tensor:
    """For each active output pixel, the flat input position read by each kernel tap.

    Returns [P, kh * kw]; -1 marks taps in the zero padding. `upsample` > 1 reads a
    nearest-neighbour upsampled input without materialising it.
    """
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    oy, ox = index // out_hw[1], index % out_hw[1]
    dy, dx = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
    y = oy[:, None] * sh - ph + dy.flatten()[None].to(index.device)
    x = ox[:, None] * sw - pw + dx.flatten()[None].to(index.device)
    inside = (y >= 0) & (y < in_hw[0] * upsample) & (x >= 0) & (x < in_hw[1] * upsample)
    flat = (y // upsample) * in_hw[1] + (x // upsample)
    return torch.where(inside, flat, torch.full_like(flat, -1))


def pointwise(layer: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A linear layer or a 1x1 convolution applied to tokens [B, P, C]."""
    if isinstance(layer, nn.Conv2d):
        return F.linear(tokens, layer.weight.flatten(1), layer.bias)
    return layer(tokens)


def stacked_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(tensors)`, after which each of them that is a Parameter holds a view of its
    rows: a stack of a model's weights takes no memory beyond the weights themselves."""
    stacked = torch.cat(tensors)
    start = 0
    for tensor in tensors:
        rows = stacked[start : start + tensor.shape[0]]
        start += tensor.shape[0]
        if isinstance(tensor, nn.Parameter):
            tensor.data = rows
    return stacked


def stacked_linear(
    parts: list[tuple[torch.Tensor, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linears (weight [out, in], bias or None) stacked as one (`stacked_rows`): its weight,
    and its bias (zeros for the parts without one), or None if no part has one."""
    weight = stacked_rows([w for w, _ in parts])
    if all(b is None for _, b in parts):
        return weight, None
    return weight, stacked_rows([w.new_zeros(w.shape[0]) if b is None else b for w, b in parts])


def key_value_parts(attn: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """An `Attention`'s to_k and to_v, as (weight, bias or None)."""
    return [(attn.to_k.weight, attn.to_k.bias), (attn.to_v.weight, attn.to_v.bias)]


def key_value_projection(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An `Attention`'s to_k and to_v stacked as one linear (`stacked_linear`)."""
    return stacked_linear(key_value_parts(attn))


def multi_head_attention(
    queries: torch.Tensor, keys_values: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale) v per head: queries [B, P, inner], keys_values [B, L, 2 * inner]
    (the keys' features, then the values'), -> [B, P, inner]."""
    batch, length, inner = queries.shape
    keys, values = keys_values.chunk(2, dim=-1)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(queries), split(keys), split(values), scale=scale)
    return out.transpose(1, 2).reshape(batch, length, inner)


def attention_over(
    attn: nn.Module,
    queries: torch.Tensor,
    keys_values: torch.Tensor,
    core: Callable[..., torch.Tensor] = multi_head_attention,
) -> torch.Tensor:
    """A diffusers `Attention` with queries from `queries` [B, P, D] and the context's keys
    and values [B, L, 2 * inner], projected by `key_value_projection`'s weights: on a subset
    of the queries, the matching rows of the full attention."""
    return attn.to_out[0](attended_values(attn, queries, keys_values, core))


def attended_values(
    attn: nn.Module,
    queries: torch.Tensor,
    keys_values: torch.Tensor,
    core: Callable[..., torch.Tensor] = multi_head_attention,
) -> torch.Tensor:
    """`attention_over` before its output projection, [B, P, inner]. `core` is the attention
    between the projections (`multi_head_attention`'s signature; a kernel reading a
    StepView)."""
    return core(attn.to_q(queries), keys_values, attn.heads, attn.scale)
