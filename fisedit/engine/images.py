"""Final-image compositing and image comparison."""

import math

import numpy as np
import torch
import torch.nn.functional as F


def preserve_background(
    edited: np.ndarray,
    previous: np.ndarray,
    mask: torch.Tensor,
    dilation: int,
    feather: int,
) -> np.ndarray:
    """Keeps `previous` outside the dilated, upsampled mask, bit for bit.

    Inside, `edited` shows through, blended over a seam `feather` pixels wide that ends at
    the dilated mask's edge: the blend weight is a box blur of the mask grown by
    `dilation - feather`, so it is exactly zero farther out than `dilation`.
    """
    height, width = edited.shape[:2]
    region = F.interpolate(mask[None, None].float().cpu(), size=(height, width), mode="nearest")
    core = max(dilation - feather, 0)
    if core:
        region = F.max_pool2d(region, 2 * core + 1, stride=1, padding=core)
    weight = region
    if feather:
        size = 2 * feather + 1
        weight = F.avg_pool2d(region, size, stride=1, padding=feather, count_include_pad=False)
    weight = weight[0, 0, :, :, None].numpy()
    blended = np.rint(weight * edited + (1 - weight) * previous).astype(np.uint8)
    return np.where(weight > 0, blended, previous)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB; identical images give 100."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else min(100.0, 10 * math.log10(255**2 / mse))
