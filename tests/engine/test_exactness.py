"""The sparse path computes what it claims, on partial masks: every layer's output is the
dense layer's inside the layer's active region and the cached one outside it.

The reference computes that the slow way (`reference_edit(mode="layers")`: each layer run
whole, the cached maps pasted outside its region), and the sparse edit must equal it to
fp32 rounding in every recorded tensor of every step, on irregular masks, every tiny model
shape and every scheduler. How far that computation is from a dense edit is a different
question, the fidelity figure of `test_session.py`.
"""

import pytest
import torch

from fisedit.engine import EditConfig, Engine, EngineConfig, SparseConfig

CAT, DOG = "a photo of a cat sitting on a bench", "a photo of a dog sitting on a bench"
STEPS = 4
EVERY_LAYER_SPARSE = SparseConfig.exact(dense_below=1)
"""Every approximation off, and no layer falls back to dense below a size."""


def _blob() -> torch.Tensor:
    """Two overlapping discs, one cut by the right edge (halos reach the padding)."""
    y, x = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    return ((y - 12) ** 2 + (x - 27) ** 2 < 36) | ((y - 17) ** 2 + (x - 22) ** 2 < 20)


def _l_shape() -> torch.Tensor:
    """An L whose arms are 3 latent pixels wide: rows and columns off the 2x2 blocks."""
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[5:25, 3:6] = True
    mask[22:25, 3:20] = True
    return mask


def _scattered() -> torch.Tensor:
    """Isolated pixels, about 3% of the latent."""
    return torch.rand(32, 32, generator=torch.Generator().manual_seed(0)) < 0.03


MASKS = {"blob": _blob, "l-shape": _l_shape, "scattered": _scattered}


@pytest.fixture(scope="module")
def engines(tiny_model_dirs):
    """One engine per tiny model and sparse config, built on first use."""
    built: dict[tuple[str, SparseConfig], Engine] = {}

    def get(variant: str, sparse: SparseConfig = EVERY_LAYER_SPARSE) -> Engine:
        key = (variant, sparse)
        if key not in built:
            config = EngineConfig(
                progress=False, sparse=sparse, edit=EditConfig(preserve_background=False)
            )
            built[key] = Engine.from_pretrained(tiny_model_dirs[variant], config)
        return built[key]

    return get


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def _assert_sparse_edit_is_the_layer_reference(engine, scheduler, mask, mask_steps):
    session = engine.generate(CAT, steps=STEPS, seed=5, scheduler=scheduler)
    base = session.current.cache.tensors["latents"]

    reference = session.reference_edit(DOG, mask=mask, mask_steps=mask_steps, mode="layers")
    edit = session.edit(DOG, mask=mask, mask_steps=mask_steps)

    assert torch.equal(edit.mask, reference.mask) and 0 < edit.report.region_ratio < 0.5
    assert edit.report.sparse_steps == STEPS - mask_steps
    assert edit.cache.tensors.keys() == reference.cache.tensors.keys()
    errors = {
        name: _relative_error(edit.cache.tensors[name], tensor)
        for name, tensor in reference.cache.tensors.items()
    }
    # Recorded in the order the UNet runs: the first to differ is where to look.
    differ = [name for name, error in errors.items() if error >= 1e-4]
    assert not differ, (
        f"{differ[0]} (and {len(differ) - 1} after it) differs: {errors[differ[0]]:.1e}"
    )
    # Not vacuous: the edit changed the region.
    edited = edit.cache.tensors["latents"]
    assert _relative_error(edited[-1][..., edit.mask], base[-1][..., edit.mask]) > 1e-2


# Each model meets each scheduler once and each mask once, and so does each scheduler.
CASES = [
    ("sd15", "ddim", "blob"),
    ("sd15", "dpm++", "l-shape"),
    ("sd15", "euler", "scattered"),
    ("sd2", "ddim", "l-shape"),
    ("sd2", "dpm++", "scattered"),
    ("sd2", "euler", "blob"),
    ("sdxl", "ddim", "scattered"),
    ("sdxl", "dpm++", "blob"),
    ("sdxl", "euler", "l-shape"),
]


@pytest.mark.parametrize(("variant", "scheduler", "mask"), CASES)
def test_exact_sparse_edit_equals_its_layer_reference(engines, variant, scheduler, mask):
    # One dense step first, so the sparse steps also start from latents and solver history
    # reset outside the region.
    _assert_sparse_edit_is_the_layer_reference(engines(variant), scheduler, MASKS[mask](), 1)


def test_active_only_attention_equals_its_layer_reference(engines):
    """The reference of the one approximation left: self-attention keys masked to the active
    tokens."""
    sparse = SparseConfig(dense_below=1, active_only_attention=True)
    _assert_sparse_edit_is_the_layer_reference(engines("sdxl", sparse), "dpm++", _blob(), 0)


def test_cached_keys_values_equal_their_layer_reference(engines):
    """Self-attention's keys and values recorded, and a sparse step projecting only the
    active tokens' into the step's cached ones: the same computation (on SDXL's tiny
    model, whose deepest transformers have two blocks)."""
    sparse = EVERY_LAYER_SPARSE.model_copy(update={"cached_keys_values": True})
    _assert_sparse_edit_is_the_layer_reference(engines("sdxl", sparse), "euler", _l_shape(), 1)
