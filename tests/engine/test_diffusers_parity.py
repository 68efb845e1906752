"""The engine gives the diffusers pipelines' images: same checkpoint, seed, scheduler, guidance.

Each side loads the tiny model from its directory; the pipeline gets the engine's initial
noise as `latents=` and the scheduler the engine builds. Also SDXL's two departures from
plain encoding and decoding: zero embeddings for an empty negative prompt, and a float32 VAE
decode under a float16 model.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from fisedit.engine import Engine, EngineConfig, load_model
from fisedit.engine.session import make_scheduler

PROMPT, SEED, STEPS, GUIDANCE = "a photo of a cat sitting on a bench", 21, 4, 6.0


def _pipeline_image(model_dir: str, engine: Engine, scheduler: str, size) -> np.ndarray:
    model = engine.model
    pipeline_class = StableDiffusionXLPipeline if model.is_sdxl else StableDiffusionPipeline
    pipeline = pipeline_class.from_pretrained(
        model_dir, scheduler=make_scheduler(scheduler, model.scheduler_config)
    )
    pipeline.set_progress_bar_config(disable=True)
    # The engine's noise: a CPU generator seeded with the seed, drawn at the latent shape.
    generator = torch.Generator("cpu").manual_seed(SEED)
    noise = torch.randn((1, *model.latent_shape_at(*size)), generator=generator)
    height, width = size
    image = pipeline(
        PROMPT,
        height=height,
        width=width,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=noise,
        output_type="np",
    ).images[0]
    return (image * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    ("variant", "scheduler", "size"),
    # SDXL conditions on the size: a non-square one checks the order of height and width.
    [("sd15", "dpm++", (128, 128)), ("sd2", "ddim", (128, 128)), ("sdxl", "euler", (64, 96))],
)
def test_generate_gives_the_diffusers_pipeline_image(tiny_model_dirs, variant, scheduler, size):
    model_dir = tiny_model_dirs[variant]
    engine = Engine.from_pretrained(model_dir, EngineConfig(progress=False))

    ours = engine.generate(
        PROMPT,
        seed=SEED,
        steps=STEPS,
        guidance=GUIDANCE,
        scheduler=scheduler,
        height=size[0],
        width=size[1],
    ).image
    theirs = _pipeline_image(model_dir, engine, scheduler, size)

    assert ours.shape == theirs.shape == (*size, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    assert ours.std() > 5  # a real image, not a flat one that would match anything


def _copy_with_model_index(source: str, target: Path, **changes) -> str:
    shutil.copytree(source, target)
    index = target / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), **changes}))
    return str(target)


def test_empty_negative_prompt_gives_zero_embeddings_where_sdxl_says_so(tiny_model_dirs, tmp_path):
    sdxl = load_model(tiny_model_dirs["sdxl"])
    encodes_empty = load_model(
        _copy_with_model_index(
            tiny_model_dirs["sdxl"], tmp_path / "sdxl", force_zeros_for_empty_prompt=False
        )
    )

    empty = sdxl.encode_for_guidance(PROMPT)
    negative = sdxl.encode_for_guidance(PROMPT, negative_prompt="blurry")
    encoded = encodes_empty.encode_for_guidance(PROMPT)

    assert sdxl.zero_empty_negative and not encodes_empty.zero_empty_negative
    assert not empty.hidden[0].any() and not empty.pooled[0].any()
    assert empty.hidden[1].any() and empty.pooled[1].any()
    assert negative.hidden[0].any() and negative.pooled[0].any()
    torch.testing.assert_close(encoded.hidden, sdxl.encode_prompts(["", PROMPT]).hidden)


def test_sd_models_encode_the_empty_negative_prompt(tiny_model_dir):
    model = load_model(tiny_model_dir)

    embeds = model.encode_for_guidance(PROMPT)

    assert not model.zero_empty_negative
    torch.testing.assert_close(embeds.hidden, model.encode_prompts(["", PROMPT]).hidden)


def test_sdxl_vae_decodes_in_float32_under_a_float16_model(tiny_model_dirs):
    half = load_model(tiny_model_dirs["sdxl"], dtype=torch.float16)
    full = load_model(tiny_model_dirs["sdxl"], dtype=torch.float32)
    # Small latents: float16 convolutions are slow on a CPU.
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()

    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32
    # Loaded in float32 from the checkpoint: the same decode as the float32 model's.
    assert np.array_equal(half.decode(latents), full.decode(latents))


def test_vae_stays_float16_without_force_upcast_and_for_sd_models(tiny_model_dirs, tmp_path):
    copy = Path(shutil.copytree(tiny_model_dirs["sdxl"], tmp_path / "sdxl"))
    vae_config = copy / "vae" / "config.json"
    vae_config.write_text(json.dumps({**json.loads(vae_config.read_text()), "force_upcast": False}))

    for source in (copy, tiny_model_dirs["sd15"]):
        model = load_model(source, dtype=torch.float16)
        assert model.vae.dtype == torch.float16
        assert model.decode(torch.zeros(1, 4, 8, 8, dtype=torch.float16)).shape == (32, 32, 3)
