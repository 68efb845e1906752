import pytest
import torch

from fisedit.engine.config import SparseConfig
from fisedit.engine.plan import MIN_BUCKET, SparsePlan, bucket


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


def test_statistics_blocks_are_those_holding_active_pixels_padded_with_none():
    plan = SparsePlan(_mask(8, (3, 4)), SparseConfig(block_size=1, dense_below=1))
    geometry = plan.at((8, 8))

    # Pixel (3, 4) lies in block (1, 2) of the 4 x 4 grid of 2 x 2 blocks.
    assert geometry.blocks.tolist() == [6] + [-1] * 15
    assert geometry.active_blocks.tolist() == [0] * 6 + [1] + [0] * 9
    exact = SparsePlan(plan.mask, SparseConfig(block_size=1, dense_below=1, bucketed=False))
    assert exact.at((8, 8)).blocks.tolist() == [6]


def test_small_layers_fall_back_to_dense_unless_nothing_is_active():
    config = SparseConfig(block_size=1, dense_below=4)
    partial = SparsePlan(_mask(8, (0, 0)), config)
    empty = SparsePlan(_mask(8), config)

    assert not partial.at((8, 8)).dense and set(partial.at((8, 8)).index.tolist()) == {0}
    assert partial.at((2, 2)).dense and partial.at((2, 2)).index.tolist() == [0, 1, 2, 3]
    assert empty.at((2, 2)).empty and not empty.at((2, 2)).dense


def test_a_resolution_that_does_not_tile_the_mask_is_rejected():
    plan = SparsePlan(_mask(8), SparseConfig())

    with pytest.raises(ValueError, match="does not tile"):
        plan.at((3, 3))


def test_buckets_are_few_and_at_most_a_quarter_over_the_active_count():
    buckets = [bucket(active, 4096) for active in range(1, 4097)]

    assert sorted(set(buckets))[:9] == [64, 80, 96, 112, 128, 160, 192, 224, 256]
    assert len(set(buckets)) == 25 and max(buckets) == 4096
    assert all(b % 16 == 0 and b >= a for a, b in enumerate(buckets, start=1))
    assert all(b <= 1.25 * a for a, b in enumerate(buckets, start=1) if a > MIN_BUCKET)
    assert bucket(0, 4096) == 0 and bucket(3, 36) == 36


def _square(side: int, top: int, left: int, size: int) -> torch.Tensor:
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[top : top + size, left : left + size] = True
    return mask


def test_the_index_is_padded_to_its_bucket_with_an_active_pixel():
    mask = _square(32, 3, 5, 9)  # grows to 10 x 10 blocks of 2 x 2: 100 pixels
    padded = SparsePlan(mask, SparseConfig(dense_below=1)).at((32, 32))
    exact = SparsePlan(mask, SparseConfig(dense_below=1, bucketed=False)).at((32, 32))

    assert exact.index.numel() == 100 and padded.index.numel() == bucket(100, 1024) == 112
    assert torch.equal(padded.index[:100], exact.index)
    assert set(padded.index[100:].tolist()) == {exact.index[-1].item()}
    assert torch.equal(padded.region, exact.region)


def test_similar_masks_share_a_signature_and_other_sizes_do_not():
    config = SparseConfig()
    first = SparsePlan(_square(64, 8, 8, 20), config)
    # Moved by whole blocks of the coarsest sparse layer (2 x 2 at 16 x 16: 8 latent pixels).
    moved = SparsePlan(_square(64, 32, 40, 20), config)
    notched = _square(64, 8, 8, 20)
    notched[8:10, 8:10] = False
    larger = SparsePlan(_square(64, 8, 8, 28), config)

    assert first.signature == moved.signature == SparsePlan(notched, config).signature
    assert first.at((64, 64)).index.numel() == 448  # 400 active
    assert larger.signature != first.signature
    exact = config.model_copy(update={"bucketed": False})
    assert SparsePlan(first.mask, exact).signature != first.signature


def test_a_plan_loads_another_of_its_signature_into_its_own_tensors():
    config = SparseConfig()
    captured = SparsePlan(_square(64, 8, 8, 20), config)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    taps = captured.taps(conv, (32, 32), (32, 32))
    mask, geometries = captured.mask, dict(captured._geometry)
    tensors = {hw: (g.index, g.blocks, g.active_blocks) for hw, g in geometries.items()}
    moved = SparsePlan(_square(64, 32, 40, 20), config)

    captured.load(moved)

    # The same tensors (a captured step replays over them), holding the moved plan's values.
    assert captured.mask is mask and captured.taps(conv, (32, 32), (32, 32)) is taps
    for hw, (index, blocks, active) in tensors.items():
        geometry = captured.at(hw)
        assert geometry.index is index and geometry.blocks is blocks
        assert geometry.active_blocks is active
        assert torch.equal(blocks, moved.at(hw).blocks)
        assert torch.equal(active, moved.at(hw).active_blocks)
    assert torch.equal(captured.region, moved.region)
    assert torch.equal(taps, moved.taps(conv, (32, 32), (32, 32)))
    with pytest.raises(ValueError, match="only plans of its own signature"):
        captured.load(SparsePlan(_square(64, 8, 8, 28), config))
