import numpy as np
import torch

from fisedit.engine.images import (
    REGION_COLOUR,
    SEAM_COLOUR,
    blend_weight,
    preserve_background,
    preview_edit,
    psnr,
)


def test_preserve_background_keeps_pixels_beyond_the_dilation_and_feathers_the_seam():
    previous = np.zeros((16, 16, 3), dtype=np.uint8)
    edited = np.full((16, 16, 3), 200, dtype=np.uint8)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1, 1] = True  # image pixels 4..7 in both directions

    weight = blend_weight(mask, (16, 16), dilation=2, feather=1)
    out = preserve_background(edited, previous, weight)

    # The mask grows by dilation - feather = 1 pixel (3..8), then a 3x3 box blur ramps the
    # weight down to zero at 2 pixels from the mask.
    assert out[5, :, 0].tolist() == [0, 0, 67, 133, 200, 200, 200, 200, 133, 67] + [0] * 6
    assert np.array_equal(out[:2], previous[:2])
    assert np.array_equal(weight > 0, out[..., 0] > 0)  # nothing else may differ


def test_preserve_background_without_dilation_replaces_exactly_the_mask():
    previous = np.zeros((8, 8, 3), dtype=np.uint8)
    edited = np.full((8, 8, 3), 9, dtype=np.uint8)
    mask = torch.tensor([[True, False], [False, False]])

    out = preserve_background(edited, previous, blend_weight(mask, (8, 8), 0, 0))

    assert out[:4, :4].min() == 9 and out.sum() == 9 * 16 * 3


def test_preview_tints_the_recomputed_region_and_the_seam_in_two_colours():
    image = np.full((16, 16, 3), 100, dtype=np.uint8)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1, 1] = True  # image pixels 4..7
    weight = blend_weight(mask, (16, 16), dilation=2, feather=1)  # may differ over 2..9

    preview = preview_edit(image, mask, weight)

    row = preview[5]
    region = [(100 + c) // 2 for c in REGION_COLOUR]
    seam = [(100 + c) // 2 for c in SEAM_COLOUR]
    assert [row[x].tolist() for x in (1, 2, 3, 4, 7, 8, 9, 10)] == [
        [100] * 3, seam, seam, region, region, seam, seam, [100] * 3
    ]  # fmt: skip
    tinted = (preview != image).any(axis=2)
    assert tinted.sum() == 8 * 8 == (weight > 0).sum()


def test_psnr():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255

    assert psnr(a, a) == 100.0
    assert round(psnr(a, b), 2) == round(10 * np.log10(48), 2)
