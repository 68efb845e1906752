import numpy as np
import torch

from fisedit.engine.images import preserve_background, psnr


def test_preserve_background_keeps_pixels_beyond_the_dilation_and_feathers_the_seam():
    previous = np.zeros((16, 16, 3), dtype=np.uint8)
    edited = np.full((16, 16, 3), 200, dtype=np.uint8)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1, 1] = True  # image pixels 4..7 in both directions

    out = preserve_background(edited, previous, mask, dilation=2, feather=1)

    # The mask grows by dilation - feather = 1 pixel (3..8), then a 3x3 box blur ramps the
    # weight down to zero at 2 pixels from the mask.
    assert out[5, :, 0].tolist() == [0, 0, 67, 133, 200, 200, 200, 200, 133, 67] + [0] * 6
    assert np.array_equal(out[:2], previous[:2])


def test_preserve_background_without_dilation_replaces_exactly_the_mask():
    previous = np.zeros((8, 8, 3), dtype=np.uint8)
    edited = np.full((8, 8, 3), 9, dtype=np.uint8)
    mask = torch.tensor([[True, False], [False, False]])

    out = preserve_background(edited, previous, mask, dilation=0, feather=0)

    assert out[:4, :4].min() == 9 and out.sum() == 9 * 16 * 3


def test_psnr():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255

    assert psnr(a, a) == 100.0
    assert round(psnr(a, b), 2) == round(10 * np.log10(48), 2)
