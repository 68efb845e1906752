"""Final-image compositing and image comparison."""

import math

import numpy as np
import torch
import torch.nn.functional as F

REGION_COLOUR = (255, 0, 0)
"""Red: the pixels over the recomputed latent region, in an edit preview."""
SEAM_COLOUR = (255, 255, 0)
"""Yellow: the pixels of the blended seam around it."""


def blend_weight(
    mask: torch.Tensor, size: tuple[int, int], dilation: int, feather: int
) -> np.ndarray:
    """Float [H, W] weight of the edited image in the composite for a latent `mask`.

    It is 1 over the mask upsampled to `size` and falls to 0 over a seam `feather` pixels
    wide that ends `dilation` pixels out: a box blur of the mask grown by
    `dilation - feather`. Where it is 0 the previous image is kept bit for bit.
    """
    region = F.interpolate(mask[None, None].float().cpu(), size=size, mode="nearest")
    core = max(dilation - feather, 0)
    if core:
        region = F.max_pool2d(region, 2 * core + 1, stride=1, padding=core)
    if feather:
        box = 2 * feather + 1
        region = F.avg_pool2d(region, box, stride=1, padding=feather, count_include_pad=False)
    return region[0, 0].numpy()


def preserve_background(edited: np.ndarray, previous: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """`edited` blended over `previous` by `weight` (blend_weight); `previous` bit for bit
    where the weight is 0."""
    weight = weight[:, :, None]
    blended = np.rint(weight * edited + (1 - weight) * previous).astype(np.uint8)
    return np.where(weight > 0, blended, previous)


def preview_edit(image: np.ndarray, mask: torch.Tensor, weight: np.ndarray) -> np.ndarray:
    """The edited uint8 [H, W, 3] image with the recomputed latent `mask` (upsampled, nearest)
    tinted 50% red and the rest of the pixels that may differ (weight > 0: the blended
    seam) tinted 50% yellow."""
    region = F.interpolate(mask[None, None].float().cpu(), size=image.shape[:2], mode="nearest")
    region = region[0, 0].numpy() > 0
    tint = np.zeros_like(image)
    tint[weight > 0] = SEAM_COLOUR
    tint[region] = REGION_COLOUR
    blended = ((image.astype(np.uint16) + tint) // 2).astype(np.uint8)
    return np.where((region | (weight > 0))[:, :, None], blended, image)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB; identical images give 100."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else min(100.0, 10 * math.log10(255**2 / mse))
