"""Edit masks: Target Area Capture (FISEdit, AAAI 2024) and user-supplied masks.

After an edit's first k dense denoise steps, the edited latents are compared with the cached
latents of the original image; the region that changed is where sparse inference must run.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# OpenCV skips split points whose class weight is within FLT_EPSILON of 0 or 1.
_FLT_EPSILON = float(np.finfo(np.float32).eps)


def latent_difference(edited: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """Float32 [H, W] map of |edited - cached| summed over channels (batch element 0)."""
    if edited.shape != cached.shape:
        raise ValueError(f"latent shapes differ: {tuple(edited.shape)} vs {tuple(cached.shape)}")
    if edited.dim() == 4:
        edited, cached = edited[0], cached[0]
    # Half-precision latents would lose small differences in the channel sum.
    return (edited.float() - cached.float()).abs().sum(dim=0)


def otsu_threshold(image: np.ndarray) -> int:
    """Otsu threshold of a uint8 2-D image, equal to OpenCV's THRESH_OTSU value.

    Pixels strictly above the threshold are foreground. A constant image returns its value
    (OpenCV would return 0), so that it has no foreground.
    """
    hist = np.bincount(np.asarray(image, dtype=np.uint8).ravel(), minlength=256)
    values = np.flatnonzero(hist)
    if len(values) == 1:
        return int(values[0])
    # Same recurrence and float64 arithmetic as OpenCV, so ties between equally good
    # thresholds resolve to the same value.
    scale = 1.0 / int(hist.sum())
    mu = float(np.dot(np.arange(256), hist)) * scale
    mu1 = q1 = max_sigma = 0.0
    best = 0
    for i, h in enumerate(hist):
        p_i = float(h) * scale
        mu1 *= q1
        q1 += p_i
        q2 = 1.0 - q1
        if min(q1, q2) < _FLT_EPSILON or max(q1, q2) > 1.0 - _FLT_EPSILON:
            continue
        mu1 = (mu1 + i * p_i) / q1
        mu2 = (mu - q1 * mu1) / q2
        sigma = q1 * q2 * (mu1 - mu2) * (mu1 - mu2)
        if sigma > max_sigma:
            max_sigma, best = sigma, i
    return best


def _windows_2x2(mask: torch.Tensor, border: bool) -> list[torch.Tensor]:
    """The four taps src[y-1..y, x-1..x] of every pixel, out-of-image taps set to `border`."""
    h, w = mask.shape
    padded = torch.full((h + 1, w + 1), border, dtype=torch.bool, device=mask.device)
    padded[1:, 1:] = mask
    return [padded[:-1, :-1], padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]]


def erode_2x2(mask: torch.Tensor) -> torch.Tensor:
    """cv2.erode with a 2x2 ones kernel and default anchor on a bool [H, W] mask."""
    a, b, c, d = _windows_2x2(mask, border=True)
    return a & b & c & d


def dilate_2x2(mask: torch.Tensor) -> torch.Tensor:
    """cv2.dilate with a 2x2 ones kernel and default anchor on a bool [H, W] mask."""
    a, b, c, d = _windows_2x2(mask, border=False)
    return a | b | c | d


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise to [0, 1]; a constant map becomes zeros instead of dividing by 0."""
    lo, hi = x.min(), x.max()
    if hi == lo:
        return torch.zeros_like(x)
    return (x - lo) / (hi - lo)


def target_area_capture(diffs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Bool [H, W] CPU mask of the edited region from k per-step latent difference maps.

    Follows the paper's code: normalise each map, sum, scale to uint8, Otsu threshold, then a
    2x2 erode and a 2x2 dilate to drop isolated specks.
    """
    if len(diffs) == 0:
        raise ValueError("target_area_capture needs at least one difference map, got none")
    total = sum(_normalise(d.detach().cpu().float()) for d in diffs)
    # Converting to uint8 truncates, like numpy's astype(np.uint8) in the reference code.
    gray = (_normalise(total) * 255).to(torch.uint8)
    active = gray > otsu_threshold(gray.numpy())
    # Like cv2, both ops read the same up-left window, so kept regions move one latent pixel
    # down and right; kept as is to reproduce the paper's masks.
    return dilate_2x2(erode_2x2(active))


def _binarise(values: torch.Tensor) -> torch.Tensor:
    if values.dtype == torch.bool:
        return values
    if values.is_floating_point():
        return values > 0.5
    return values != 0


def _image_mask(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("L")) > 127)


def _read_image(path: Path) -> torch.Tensor:
    if not path.exists():
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with Image.open(path) as image:
            return _image_mask(image)
    except OSError as err:  # PIL's UnidentifiedImageError and truncated files are OSErrors
        raise ValueError(f"cannot read mask image {path}: {err}") from err


def load_mask(
    source: str | Path | np.ndarray | torch.Tensor | Image.Image,
    latent_hw: tuple[int, int],
    vae_scale: int,
) -> torch.Tensor:
    """Load a user mask as a bool [H, W] CPU tensor at latent size.

    Image files and PIL images are active above gray level 127; float arrays above 0.5; integer
    and bool arrays where nonzero. Arrays may carry a leading singleton dim, or a trailing
    channel dim (active where any channel is). A mask at image size (latent size * vae_scale)
    is max-pooled, so a latent pixel is active if any image pixel under it is. A mask with
    no active pixel is an error: it would make a version equal to the previous one.
    """
    if isinstance(source, str | Path):
        mask = _read_image(Path(source))
    elif isinstance(source, Image.Image):
        mask = _image_mask(source)
    elif isinstance(source, np.ndarray):
        # Copy so that read-only or negatively strided arrays convert cleanly.
        mask = _binarise(torch.from_numpy(np.array(source)))
    elif isinstance(source, torch.Tensor):
        mask = _binarise(source.detach().cpu())
    else:
        raise TypeError(f"unsupported mask source type: {type(source).__name__}")
    if mask.dim() == 3:
        mask = mask[0] if mask.shape[0] == 1 else mask.any(dim=-1)
    got = tuple(mask.shape)
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D (optionally with a channel dim), got shape {got}")
    image_hw = (latent_hw[0] * vae_scale, latent_hw[1] * vae_scale)
    if got not in (tuple(latent_hw), image_hw):
        raise ValueError(
            f"mask size {got} matches neither the latent size {tuple(latent_hw)} "
            f"nor the image size {image_hw}"
        )
    if not mask.any():
        raise ValueError(
            "the mask is empty (no pixel above grey level 127, or no nonzero value): "
            "it selects nothing to edit"
        )
    return mask if got == tuple(latent_hw) else pool_mask(mask, latent_hw)


def pool_mask(mask: torch.Tensor, side: tuple[int, int]) -> torch.Tensor:
    """Max-pool a bool [H, W] mask to `side`; H and W must be multiples of it."""
    h, w = mask.shape
    sh, sw = side
    if h % sh or w % sw:
        raise ValueError(f"mask size {(h, w)} is not a multiple of {(sh, sw)}")
    return mask.reshape(sh, h // sh, sw, w // sw).any(dim=3).any(dim=1)
