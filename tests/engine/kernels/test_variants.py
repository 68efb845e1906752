"""A new mask compiles nothing new: Triton compiles a kernel variant for each new set of
constexprs and integer specialisations (== 1, divisible by 16), so the launches of a sparse
step must take the same few of them whatever the mask.

Steps run on the SD 1.5 UNet built on the meta device (no GPU, no compute); launches are
recorded with grids sized for an H100.
"""

import pytest
import torch

from fisedit.bench.edit_bench import square_mask
from fisedit.bench.step_launches import MetaUNet
from fisedit.engine.config import SparseConfig
from fisedit.engine.kernels.aot import variant_key
from fisedit.engine.model_shapes import UNET_SHAPES
from fisedit.engine.plan import SparsePlan

SIDE = 64  # SD 1.5's latent at 512 px
# A small, a middle-sized and a full mask: with and without split-K at every layer.
WARM_UP_RATIOS = (0.02, 0.3, 1.0)


def random_mask(generator: torch.Generator) -> torch.Tensor:
    """One to three rectangles of random sides (4 to 40 latent pixels) and places."""
    mask = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    for _ in range(int(torch.randint(1, 4, (), generator=generator))):
        height, width = (int(s) for s in torch.randint(4, 41, (2,), generator=generator))
        top = int(torch.randint(0, SIDE - height + 1, (), generator=generator))
        left = int(torch.randint(0, SIDE - width + 1, (), generator=generator))
        mask[top : top + height, left : left + width] = True
    return mask


@pytest.fixture(
    scope="module",
    params=[SparseConfig(), SparseConfig(cached_keys_values=True)],
    ids=["default", "cached-keys-values"],
)
def unet(request):
    unet = MetaUNet(UNET_SHAPES["sd15-512"], sparse=request.param)
    unet.step(None)  # the recording step the sparse ones read
    return unet


def _variants(unet: MetaUNet, mask: torch.Tensor, bucketed: bool) -> set[str]:
    config = unet.state.config.model_copy(update={"bucketed": bucketed})
    _, _, launches = unet.step(SparsePlan(mask, config, "meta"))
    return {variant_key(launch) for launch in launches}


def test_after_a_warm_up_twenty_random_masks_compile_no_new_variant(unet):
    warm = set().union(*(_variants(unet, square_mask(SIDE, r), True) for r in WARM_UP_RATIOS))
    generator = torch.Generator().manual_seed(0)
    masks = [random_mask(generator) for _ in range(20)]

    new = set().union(*(_variants(unet, mask, True) for mask in masks)) - warm

    # Before buckets, with every count specialised: 57 after this warm-up, and these masks
    # added 33 more (at 7 of them, the last at the 16th). With buckets: 41 in all, 3 of them
    # applying the GroupNorms of the layers that run dense (39 in all when convs with small
    # weights split K too, before those norms kept their maps channels_last; 43 since the
    # transformers' output projections run as 1x1 convs, unsplit, split and finalised,
    # instead of a scatter kernel after a PyTorch GEMM; 44 since a resnet's norms apply
    # their SiLU, and a transformer's norm none). Cached keys and values: the attention
    # kernel at SD 1.5's three head dims, and projections scattered into the cache instead
    # of over every token, but no LayerNorm that adds a residual since the attentions'
    # output projections add it (47 before; the default's norms changed kind, not number).
    assert len(warm) == 44
    assert not new, f"{len(new)} variants compiled after the warm-up"


def test_without_buckets_small_masks_compile_new_tile_sizes(unet):
    warm = set().union(*(_variants(unet, square_mask(SIDE, r), False) for r in WARM_UP_RATIOS))
    few_pixels = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    few_pixels[10:14, 30:32] = True

    assert _variants(unet, few_pixels, False) - warm
