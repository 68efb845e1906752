import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from fisedit.engine.masks import (
    dilate_2x2,
    erode_2x2,
    latent_difference,
    load_mask,
    otsu_threshold,
    pool_mask,
    target_area_capture,
)


def bool_tensor(rows: list[str]) -> torch.Tensor:
    """Mask from rows like ".#.." where '#' is active."""
    return torch.tensor([[c == "#" for c in row] for row in rows])


def as_rows(mask: torch.Tensor) -> list[str]:
    return ["".join("#" if v else "." for v in row) for row in mask.tolist()]


def brute_force_otsu(image: np.ndarray) -> list[int]:
    """Every t maximising the exact between-class variance, class 0 being pixels <= t."""
    values = image.ravel().astype(int)
    scores = {}
    for t in range(256):
        low, high = values[values <= t], values[values > t]
        if len(low) and len(high):
            w0 = Fraction(len(low), len(values))
            mean_gap = Fraction(int(low.sum()), len(low)) - Fraction(int(high.sum()), len(high))
            scores[t] = w0 * (1 - w0) * mean_gap**2
    best = max(scores.values())
    return [t for t, score in scores.items() if score == best]


# latent_difference


def test_latent_difference_sums_absolute_change_over_channels_of_first_batch_element():
    cached = torch.zeros(2, 2, 2, 3)
    edited = cached.clone()
    edited[0, 0] = torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 0.5]])
    edited[0, 1] = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 3.0, 0.5]])
    edited[1] = 100.0  # batch element 1 is ignored

    diff = latent_difference(edited, cached)

    assert diff.dtype == torch.float32
    assert diff.tolist() == [[2.0, 2.0, 0.0], [0.0, 3.0, 1.0]]


def test_latent_difference_accepts_unbatched_half_precision_latents():
    cached = torch.zeros(4, 1, 2, dtype=torch.float16)
    edited = torch.full((4, 1, 2), 0.25, dtype=torch.float16)

    diff = latent_difference(edited, cached)

    assert diff.dtype == torch.float32
    assert diff.tolist() == [[1.0, 1.0]]


def test_latent_difference_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="latent shapes differ"):
        latent_difference(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 4))


# otsu_threshold


def test_otsu_threshold_of_bimodal_image_lies_between_modes_and_maximises_variance():
    low_mode = [v for v in range(40, 61) for _ in range(8)]
    bridge = list(range(61, 170))  # no empty bins, so the optimum is unique
    high_mode = [v for v in range(170, 191) for _ in range(5)]
    image = np.array(low_mode + bridge + high_mode, dtype=np.uint8).reshape(2, -1)

    threshold = otsu_threshold(image)

    assert 60 < threshold < 170
    assert brute_force_otsu(image) == [threshold]


def test_otsu_threshold_of_two_level_image_is_the_lower_level():
    # Every t in [10, 200) splits equally well; OpenCV keeps the first.
    image = np.array([[10, 10, 200], [200, 10, 200]], dtype=np.uint8)

    assert otsu_threshold(image) == 10
    assert otsu_threshold(np.array([[0, 0], [0, 255]], dtype=np.uint8)) == 0


def test_otsu_threshold_of_constant_image_leaves_nothing_above_it():
    assert otsu_threshold(np.full((3, 4), 77, dtype=np.uint8)) == 77
    assert otsu_threshold(np.zeros((2, 2), dtype=np.uint8)) == 0


# erode_2x2 / dilate_2x2: the output at (y, x) reads input rows y-1..y and columns x-1..x


def test_erode_keeps_pixels_whose_window_up_and_left_is_all_active():
    mask = bool_tensor(
        [
            ".##.",
            ".##.",
            "....",
            "#..#",
        ]
    )

    assert as_rows(erode_2x2(mask)) == [
        "..#.",
        "..#.",
        "....",
        "....",
    ]


def test_erode_treats_pixels_outside_the_top_and_left_border_as_active():
    corner = bool_tensor(["##..", "##..", "....", "...."])
    interior = bool_tensor(["....", ".##.", ".##.", "...."])

    assert as_rows(erode_2x2(corner)) == ["##..", "##..", "....", "...."]
    assert as_rows(erode_2x2(interior)) == ["....", "....", "..#.", "...."]
    assert erode_2x2(torch.ones(3, 3, dtype=torch.bool)).all()


def test_dilate_spreads_each_pixel_down_and_right_and_ignores_outside_pixels():
    mask = bool_tensor(
        [
            "....",
            ".#..",
            "....",
            "...#",
        ]
    )

    assert as_rows(dilate_2x2(mask)) == [
        "....",
        ".##.",
        ".##.",
        "...#",
    ]
    assert not dilate_2x2(torch.zeros(3, 3, dtype=torch.bool)).any()


def test_opening_removes_isolated_pixels_and_keeps_a_3x3_square_shifted_down_right():
    # Erode and dilate read the same up-left window (OpenCV does not reflect the kernel for
    # dilate), so a 2x2 opening moves surviving shapes one pixel down and right.
    mask = bool_tensor(
        [
            "...#...",
            ".......",
            "..###..",
            "..###..",
            "..###..",
            "#......",
            ".......",
        ]
    )

    opened = dilate_2x2(erode_2x2(mask))

    assert as_rows(opened) == [
        ".......",
        ".......",
        ".......",
        "...###.",
        "...###.",
        "...###.",
        ".......",
    ]


# target_area_capture


def hand_made_step_diffs() -> list[torch.Tensor]:
    """k=3 maps: low noise (<= 0.1), a bright 6x6 square and an isolated bright speck."""
    y, x = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    diffs = []
    for step in range(3):
        noise = ((y * 7 + x * 3 + step * 5) % 11).float() / 100
        signal = torch.zeros(16, 16)
        signal[4:10, 5:11] = 5.0
        signal[13, 2] = 5.0
        diffs.append((step + 1) * (noise + signal))
    return diffs


def test_target_area_capture_keeps_the_square_and_drops_the_speck():
    # Each normalised map is <= 0.1 / 5 = 0.02 on noise and >= 5 / 5.1 on the square and speck,
    # so the uint8 map is <= 6 on noise and >= 240 on them: Otsu separates exactly those. The
    # 2x2 opening then removes the speck and moves the square one pixel down and right.
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[5:11, 6:12] = True

    mask = target_area_capture(hand_made_step_diffs())

    assert mask.dtype == torch.bool
    assert mask.device.type == "cpu"
    assert mask.tolist() == expected.tolist()


def test_target_area_capture_ignores_a_constant_map():
    diffs = hand_made_step_diffs()
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[5:11, 6:12] = True

    mask = target_area_capture([torch.full((16, 16), 3.0), *diffs])

    assert mask.tolist() == expected.tolist()


def test_target_area_capture_of_unchanged_latents_is_empty():
    mask = target_area_capture([torch.zeros(8, 8), torch.zeros(8, 8)])

    assert mask.shape == (8, 8)
    assert not mask.any()


def test_target_area_capture_rejects_an_empty_sequence():
    with pytest.raises(ValueError, match="at least one difference map"):
        target_area_capture([])


# load_mask: latent size (4, 6), VAE scale 8, so image size (32, 48)


def test_load_mask_from_png_at_latent_size_thresholds_gray_levels(tmp_path):
    pixels = np.zeros((4, 6), dtype=np.uint8)
    pixels[0, 0] = 255
    pixels[1, 2] = 128
    pixels[2, 3] = 127  # not above 127
    pixels[3, 5] = 200
    path = tmp_path / "mask.png"
    Image.fromarray(pixels).save(path)

    mask = load_mask(path, (4, 6), vae_scale=8)

    assert mask.dtype == torch.bool
    assert torch.nonzero(mask).tolist() == [[0, 0], [1, 2], [3, 5]]


def test_load_mask_from_rgb_png_at_image_size_max_pools_to_latent_size(tmp_path):
    pixels = np.zeros((32, 48, 3), dtype=np.uint8)
    pixels[9, 17] = 255  # one image pixel -> latent (1, 2)
    pixels[31, 40:47] = 255  # a strip inside latent (3, 5)
    pixels[16:24, 0:9] = 255  # a block covering latent (2, 0) and one column of (2, 1)
    path = tmp_path / "mask.png"
    Image.fromarray(pixels).save(path)

    mask = load_mask(str(path), (4, 6), vae_scale=8)

    assert mask.shape == (4, 6)
    assert torch.nonzero(mask).tolist() == [[1, 2], [2, 0], [2, 1], [3, 5]]


def test_load_mask_from_pil_image():
    image = Image.new("L", (6, 4))
    image.putpixel((5, 1), 255)  # PIL uses (x, y)

    assert torch.nonzero(load_mask(image, (4, 6), vae_scale=8)).tolist() == [[1, 5]]


def test_load_mask_from_numpy_float_uses_half_as_threshold():
    values = np.zeros((4, 6), dtype=np.float32)
    values[0, 1] = 0.6
    values[2, 2] = 0.5

    assert torch.nonzero(load_mask(values, (4, 6), vae_scale=8)).tolist() == [[0, 1]]


def test_load_mask_from_numpy_with_leading_or_trailing_channel_dim():
    leading = np.zeros((1, 32, 48), dtype=np.uint8)
    leading[0, 31, 47] = 1
    trailing = np.zeros((4, 6, 3), dtype=np.uint8)
    trailing[1, 1, 2] = 255  # active in the blue channel only

    assert torch.nonzero(load_mask(leading, (4, 6), vae_scale=8)).tolist() == [[3, 5]]
    assert torch.nonzero(load_mask(trailing, (4, 6), vae_scale=8)).tolist() == [[1, 1]]


def test_load_mask_from_torch_bool_int_and_float():
    as_bool = torch.zeros(4, 6, dtype=torch.bool)
    as_bool[3, 0] = True
    as_int = torch.zeros(32, 48, dtype=torch.int64)
    as_int[0, 8] = 7  # latent (0, 1)
    as_float = torch.full((4, 6), 0.4)
    as_float[2, 4] = 0.9

    assert torch.nonzero(load_mask(as_bool, (4, 6), vae_scale=8)).tolist() == [[3, 0]]
    assert torch.nonzero(load_mask(as_int, (4, 6), vae_scale=8)).tolist() == [[0, 1]]
    assert torch.nonzero(load_mask(as_float, (4, 6), vae_scale=8)).tolist() == [[2, 4]]


def test_load_mask_rejects_other_sizes_naming_both_accepted_sizes():
    message = "mask size (5, 5) matches neither the latent size (4, 6) nor the image size (32, 48)"

    with pytest.raises(ValueError, match=re.escape(message)):
        load_mask(np.zeros((5, 5)), (4, 6), vae_scale=8)


@pytest.mark.parametrize("shape", [(4, 6), (32, 48)], ids=["latent-size", "image-size"])
def test_an_empty_mask_is_a_clear_error(shape):
    with pytest.raises(ValueError, match="the mask is empty"):
        load_mask(np.zeros(shape, dtype=np.uint8), (4, 6), vae_scale=8)


def test_load_mask_reports_missing_and_unreadable_files(tmp_path):
    missing = tmp_path / "missing.png"
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")

    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_mask(missing, (4, 6), vae_scale=8)
    with pytest.raises(ValueError, match="cannot read mask image"):
        load_mask(broken, (4, 6), vae_scale=8)


# pool_mask


def test_pool_mask_marks_a_cell_active_if_any_pixel_in_it_is():
    mask = bool_tensor(
        [
            "......",
            ".....#",
            "#.....",
            "......",
        ]
    )

    assert pool_mask(mask, (2, 3)).tolist() == [[False, False, True], [True, False, False]]
    assert pool_mask(mask, (4, 6)).tolist() == mask.tolist()


def test_pool_mask_rejects_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match=re.escape("(4, 6) is not a multiple of (3, 3)")):
        pool_mask(torch.zeros(4, 6, dtype=torch.bool), (3, 3))
