"""Full-size model shapes hang together: built on the meta device, nothing is allocated."""

import pytest
import torch

from fisedit.bench.edit_bench import _pipeline
from fisedit.engine.model_shapes import UNET_SHAPES


@pytest.mark.parametrize("name", sorted(UNET_SHAPES))
def test_full_size_pipelines_are_consistent(name):
    model = UNET_SHAPES[name].build_model("meta", torch.float16)

    embeds = model.encode_prompts(["", "a photo of a cat"])
    pipeline = _pipeline(model)

    assert embeds.hidden.shape == (2, 77, model.unet.config.cross_attention_dim)
    assert model.vae_scale_factor == pipeline.vae_scale_factor == 8
    assert model.image_size == int(name.split("-")[1])
    if model.is_sdxl:
        time_ids = model.added_conditions(embeds)["time_ids"]
        added = embeds.pooled.shape[1] + time_ids.shape[1] * 256
        assert added == model.unet.config.projection_class_embeddings_input_dim
    assert type(pipeline).__name__ == (
        "StableDiffusionXLPipeline" if model.is_sdxl else "StableDiffusionPipeline"
    )
