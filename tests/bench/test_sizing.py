import pytest

from fisedit.bench.sizing import measure
from fisedit.engine.model_shapes import UNET_SHAPES


def test_sd15_step_costs_match_published_figures():
    size = measure(UNET_SHAPES["sd15-512"])

    # About 0.8 TMAC per CFG step at 512 px (shared/baselines/h200-dense.md).
    assert size.dense_macs_per_step == pytest.approx(0.80e12, rel=0.01)
    # What sparse steps read, fp16: block outputs (but those of resnets only a transformer
    # reads: 44 MiB), conv1 outputs, self-attention inputs and GroupNorm block statistics,
    # at the resolutions that run sparse (not the 8x8 one: 5 MiB): 165 MiB.
    assert size.cache_bytes_per_step == pytest.approx(165 * 2**20, rel=0.005)


def test_sd21_step_macs_match_the_paper_digest():
    # About 2.15 TMAC per step at 768 px with CFG (shared/research/fisedit.md, section 6).
    assert measure(UNET_SHAPES["sd21-768"]).dense_macs_per_step == pytest.approx(2.15e12, rel=0.01)


def test_sdxl_records_more_than_sd15_per_step():
    sdxl, sd15 = measure(UNET_SHAPES["sdxl-1024"]), measure(UNET_SHAPES["sd15-512"])

    assert sdxl.cache_bytes_per_step > 3 * sd15.cache_bytes_per_step
    assert sdxl.dense_macs_per_step > 5 * sd15.dense_macs_per_step
