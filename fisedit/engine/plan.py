"""The static geometry of one edit's sparse steps: which pixels each resolution computes.

Each layer's active pixels are padded up to a size bucket by repeating one of them: the
repeated rows compute and write the same values again, so results do not change, while the
kernels' integer arguments, tile sizes and buffer shapes take only a few values: edits with
similar masks (plans of one `signature`) run the same compiled kernels.
"""

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fisedit.engine.config import SparseConfig
from fisedit.engine.kernels.group_norm import BLOCK_SIDE
from fisedit.engine.sparse_ops import conv_taps

# The smallest bucket: one 64-row tile of the kernels (so tile sizes never depend on it).
MIN_BUCKET = 64
# The GroupNorm statistics kernel loops over blocks in tiles of a few: a smaller floor.
MIN_BLOCK_BUCKET = 16


def bucket(active: int, pixels: int, smallest: int = MIN_BUCKET) -> int:
    """`active` pixels of a `pixels`-pixel layer rounded up to a bucket: at least `smallest`,
    then multiples of 16 spaced four to an octave (at most a quarter over), at most `pixels`."""
    if active == 0:
        return 0
    step = max(16, (1 << (active - 1).bit_length()) // 8)
    return min(pixels, max(smallest, -(-active // step) * step))


@dataclass(frozen=True)
class LayerGeometry:
    """Active output pixels of the layers at one resolution (`index` may repeat its last
    pixel up to a bucket)."""

    hw: tuple[int, int]
    index: torch.Tensor
    dense: bool
    blocks: torch.Tensor
    """The GroupNorm statistics blocks (kernels/group_norm.py) holding active pixels, padded
    to a bucket with -1 (none)."""
    active_blocks: torch.Tensor
    """Every statistics block's flag (uint8), 1 for those in `blocks`."""

    @property
    def empty(self) -> bool:
        return self.index.numel() == 0

    @property
    def pixels(self) -> int:
        return self.hw[0] * self.hw[1]

    @property
    def region(self) -> torch.Tensor:
        """The active pixels as a [H, W] boolean map."""
        region = torch.zeros(self.pixels, dtype=torch.bool, device=self.index.device)
        region[self.index] = True
        return region.reshape(self.hw)


@dataclass
class SparsePlan:
    """The mask pyramid and per-layer indices of an edit, built once and reused every step.

    The latent mask is max-pooled to each resolution, then grown to whole
    `block_size` x `block_size` output blocks. Layers whose side is below `dense_below`
    compute everything (unless nothing is active at all).
    """

    mask: torch.Tensor
    config: SparseConfig
    device: torch.device | str = "cpu"
    _geometry: dict = field(default_factory=dict, repr=False)
    _taps: dict = field(default_factory=dict, repr=False)

    @property
    def region(self) -> torch.Tensor:
        """The latent pixels the sparse steps recompute: the mask grown to whole blocks."""
        return self.at(tuple(self.mask.shape)).region

    @functools.cached_property
    def signature(self) -> tuple:
        """Everything a sparse step's shapes and kernels depend on: the config, and at each
        resolution of the mask pyramid the (padded) active count and the dense fallback.
        Plans with one signature differ only in the values of their index tensors."""
        levels, (height, width) = [], self.mask.shape
        scale = 1
        while height % scale == 0 and width % scale == 0 and scale <= min(height, width):
            geometry = self.at((height // scale, width // scale))
            counts = (geometry.index.numel(), geometry.blocks.numel())
            levels.append((geometry.hw, *counts, geometry.dense))
            scale *= 2
        return (self.config, tuple(levels))

    def load(self, other: "SparsePlan") -> None:
        """Takes `other`'s mask and indices into this plan's tensors, in place, so that a step
        captured over this plan replays over `other`'s pixels; the plans must share a
        signature (so every tensor keeps its shape)."""
        if other.signature != self.signature:
            raise ValueError("a plan loads only plans of its own signature (same buckets)")
        self.mask.copy_(other.mask)
        for hw, geometry in self._geometry.items():
            theirs = _plan_tensors(other.at(hw))
            for mine, their in zip(_plan_tensors(geometry), theirs, strict=True):
                mine.copy_(their)
        for (_, _, _, in_hw, out_hw, upsample), (conv, taps) in self._taps.items():
            taps.copy_(other.taps(conv, in_hw, out_hw, upsample))

    def at(self, hw: tuple[int, int]) -> LayerGeometry:
        if hw not in self._geometry:
            self._geometry[hw] = self._build(hw)
        return self._geometry[hw]

    def taps(
        self, conv: nn.Conv2d, in_hw: tuple[int, int], out_hw: tuple[int, int], upsample: int = 1
    ):
        key = (conv.kernel_size, conv.stride, conv.padding, in_hw, out_hw, upsample)
        if key not in self._taps:
            taps = conv_taps(self.at(out_hw).index, out_hw, in_hw, conv, upsample)
            self._taps[key] = (conv, taps)
        return self._taps[key][1]

    @property
    def _padded(self) -> bool:
        # Self-attention over the active tokens alone would see repeated ones twice.
        return self.config.bucketed and not self.config.active_only_attention

    def _build(self, hw: tuple[int, int]) -> LayerGeometry:
        height, width = self.mask.shape
        if height % hw[0] or width % hw[1]:
            raise ValueError(f"a {hw} feature map does not tile the {tuple(self.mask.shape)} mask")
        grid = self.mask[None, None].float()
        pooled = F.max_pool2d(grid, (height // hw[0], width // hw[1]))
        block = self.config.block_size
        blocks = F.max_pool2d(pooled, block, ceil_mode=True)
        active = blocks.repeat_interleave(block, 2).repeat_interleave(block, 3)[
            ..., : hw[0], : hw[1]
        ]
        index = active.flatten().nonzero().flatten()
        flags = F.max_pool2d(active, BLOCK_SIDE, ceil_mode=True).flatten().to(torch.uint8)
        blocks = flags.nonzero().flatten().to(torch.int32)
        dense = self.config.dense_at(hw) and index.numel() > 0
        if dense:
            index = torch.arange(hw[0] * hw[1])
        elif self._padded and index.numel():
            padding = bucket(index.numel(), hw[0] * hw[1]) - index.numel()
            index = torch.cat([index, index[-1:].expand(padding)])
        if self.config.bucketed and blocks.numel():
            padding = bucket(blocks.numel(), flags.numel(), MIN_BLOCK_BUCKET) - blocks.numel()
            blocks = torch.cat([blocks, blocks.new_full((padding,), -1)])
        return LayerGeometry(
            hw=hw,
            index=index.to(self.device),
            dense=dense,
            blocks=blocks.to(self.device),
            active_blocks=flags.to(self.device),
        )


def _plan_tensors(geometry: LayerGeometry) -> tuple[torch.Tensor, ...]:
    """What `SparsePlan.load` copies for one resolution."""
    return geometry.index, geometry.blocks, geometry.active_blocks
