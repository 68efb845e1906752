import pytest
import torch

from fisedit.engine.config import SparseConfig
from fisedit.engine.plan import SparsePlan


def _mask(size: int, *pixels: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    for y, x in pixels:
        mask[y, x] = True
    return mask


def _active(plan: SparsePlan, side: int) -> set[tuple[int, int]]:
    return {(int(i) // side, int(i) % side) for i in plan.at((side, side)).index}


def test_one_pixel_grows_to_its_output_block():
    plan = SparsePlan(_mask(8, (3, 4)), SparseConfig(block_size=2, dense_below=1))

    assert _active(plan, 8) == {(2, 4), (2, 5), (3, 4), (3, 5)}


def test_mask_is_max_pooled_to_coarser_resolutions_before_blocking():
    plan = SparsePlan(_mask(8, (3, 4)), SparseConfig(block_size=1, dense_below=1))

    assert _active(plan, 4) == {(1, 2)}
    assert _active(plan, 2) == {(0, 1)}


def test_region_is_the_mask_grown_to_whole_blocks_at_latent_resolution():
    plan = SparsePlan(_mask(8, (3, 4), (6, 6)), SparseConfig(block_size=2, dense_below=1))

    expected = _mask(8, (2, 4), (2, 5), (3, 4), (3, 5), (6, 6), (6, 7), (7, 6), (7, 7))
    assert torch.equal(plan.region, expected)


def test_block_grid_is_clipped_at_odd_sides():
    plan = SparsePlan(_mask(6, (5, 5)), SparseConfig(block_size=4, dense_below=1))

    assert _active(plan, 6) == {(y, x) for y in (4, 5) for x in (4, 5)}


def test_small_layers_fall_back_to_dense_unless_nothing_is_active():
    config = SparseConfig(block_size=1, dense_below=4)
    partial = SparsePlan(_mask(8, (0, 0)), config)
    empty = SparsePlan(_mask(8), config)

    assert not partial.at((8, 8)).dense and partial.at((8, 8)).index.tolist() == [0]
    assert partial.at((2, 2)).dense and partial.at((2, 2)).index.tolist() == [0, 1, 2, 3]
    assert empty.at((2, 2)).empty and not empty.at((2, 2)).dense


def test_a_resolution_that_does_not_tile_the_mask_is_rejected():
    plan = SparsePlan(_mask(8), SparseConfig())

    with pytest.raises(ValueError, match="does not tile"):
        plan.at((3, 3))
