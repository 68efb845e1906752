"""The static geometry of one edit's sparse steps: which pixels each resolution computes."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fisedit.engine.config import SparseConfig
from fisedit.engine.sparse_ops import conv_taps


@dataclass(frozen=True)
class LayerGeometry:
    """Active output pixels of the layers at one resolution."""

    hw: tuple[int, int]
    index: torch.Tensor
    dense: bool

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

    def at(self, hw: tuple[int, int]) -> LayerGeometry:
        if hw not in self._geometry:
            self._geometry[hw] = self._build(hw)
        return self._geometry[hw]

    def taps(
        self, conv: nn.Conv2d, in_hw: tuple[int, int], out_hw: tuple[int, int], upsample: int = 1
    ):
        key = (conv.kernel_size, conv.stride, conv.padding, in_hw, out_hw, upsample)
        if key not in self._taps:
            self._taps[key] = conv_taps(self.at(out_hw).index, out_hw, in_hw, conv, upsample)
        return self._taps[key]

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
        dense = min(hw) < self.config.dense_below and index.numel() > 0
        if dense:
            index = torch.arange(hw[0] * hw[1])
        return LayerGeometry(hw=hw, index=index.to(self.device), dense=dense)
