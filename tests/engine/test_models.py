import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch
import transformers

from fisedit.engine.models import (
    ModelLoadError,
    PromptTruncatedWarning,
    build_tiny_model,
    load_model,
)
from fisedit.engine.session import default_scheduler


@pytest.mark.parametrize("variant", ["sd15", "sd2", "sdxl"])
def test_tiny_models_round_trip_through_from_pretrained(tiny_model_dirs, variant):
    model = load_model(tiny_model_dirs[variant])

    assert model.latent_shape == (4, 32, 32)
    assert model.vae_scale_factor == 4
    assert model.image_size == 128
    assert model.is_sdxl == (variant == "sdxl")
    expected = "v_prediction" if variant == "sd2" else "epsilon"
    assert model.scheduler_config["prediction_type"] == expected
    assert model.unet.config.use_linear_projection == (variant != "sd15")


def test_loading_twice_gives_identical_weights(tiny_model_dir):
    first, second = load_model(tiny_model_dir), load_model(tiny_model_dir)

    for (name, a), (_, b) in zip(
        first.unet.state_dict().items(), second.unet.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert first.config_hash == second.config_hash


def test_sdxl_conditions_on_both_text_encoders(tiny_model_dirs):
    model = load_model(tiny_model_dirs["sdxl"])

    embeds = model.encode_prompts(["", "a cat"])
    added = model.added_conditions(embeds)

    assert embeds.hidden.shape == (2, 77, 64)
    assert embeds.pooled.shape == (2, 32)
    assert added["time_ids"].tolist() == [[128, 128, 0, 0, 128, 128]] * 2
    sized = model.added_conditions(embeds, (64, 96))
    assert sized["time_ids"].tolist() == [[64, 96, 0, 0, 64, 96]] * 2


def test_prompt_encoding_is_deterministic_and_prompt_dependent(tiny_model_dir):
    model = load_model(tiny_model_dir)

    a, b, c = (model.encode_prompts([p]).hidden for p in ("a cat", "a cat", "a dog"))

    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_decode_returns_an_rgb_uint8_image(tiny_model_dir):
    model = load_model(tiny_model_dir)

    image = model.decode(torch.zeros(1, 4, 32, 32))

    assert image.shape == (128, 128, 3) and image.dtype == np.uint8


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load a Stable Diffusion pipeline from"):
        load_model(tmp_path / "no-such-model")


def test_an_overlong_prompt_is_encoded_as_its_first_75_tokens_with_a_warning(tiny_model_dir):
    model = load_model(tiny_model_dir)
    prompt = "a photo of a cat " * 7

    kept = model.truncated_prompt(prompt)
    with pytest.warns(PromptTruncatedWarning, match=f"only this part is used: '{kept}'"):
        embeds = model.encode_prompts([prompt])

    assert prompt.startswith(kept)
    assert len(model.tokenizers[0](kept, add_special_tokens=False).input_ids) == 75
    # The encoder is causal: up to the last kept token (which ends a word only in `kept`,
    # here cut mid-word) both read the same tokens.
    assert torch.equal(embeds.hidden[:, :75], model.encode_prompts([kept]).hidden[:, :75])
    assert model.truncated_prompt("a cat") is None


def test_latent_shape_follows_the_image_size_in_multiples_the_unet_can_run(tiny_model_dir):
    model = load_model(tiny_model_dir)

    assert model.size_multiple == 16  # VAE scale 4, two UNet halvings
    assert model.latent_shape_at(64, 96) == (4, 16, 24)
    with pytest.raises(ValueError, match="^width: 72 is not a multiple of 16"):
        model.latent_shape_at(64, 72)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"_class_name": "DDIMScheduler"}, "ddim"),
        ({"_class_name": "DPMSolverMultistepScheduler"}, "dpm++"),
        ({"_class_name": "EulerDiscreteScheduler"}, "euler"),
        ({"_class_name": "PNDMScheduler"}, "dpm++"),  # SD 1.5's, which the engine lacks
        ({}, "dpm++"),
    ],
)
def test_the_default_scheduler_is_the_checkpoints_own_when_supported(config, expected):
    assert default_scheduler(config) == expected


def test_config_hash_ignores_where_the_model_was_saved(tmp_path):
    first = load_model(build_tiny_model(tmp_path / "a"))
    second = load_model(build_tiny_model(tmp_path / "b"))
    other = load_model(build_tiny_model(tmp_path / "c", "sd2"))

    assert first.config_hash == second.config_hash != other.config_hash


def test_tiny_names_build_the_tiny_models_without_touching_the_callers_state(tiny_model_dirs):
    verbosity = transformers.utils.logging.get_verbosity()
    torch.manual_seed(3)
    expected_draw = torch.rand(4)
    torch.manual_seed(3)

    model = load_model("tiny-sd2")

    assert torch.equal(torch.rand(4), expected_draw)
    assert transformers.utils.logging.get_verbosity() == verbosity
    assert diffusers.utils.logging.is_progress_bar_enabled()
    assert model.model_id == "tiny-sd2"
    assert model.config_hash == load_model(tiny_model_dirs["sd2"]).config_hash
    assert model.scheduler_config["prediction_type"] == "v_prediction"


def test_from_pretrained_tiny_as_a_user_runs_it_shows_no_library_noise():
    script = (
        "from fisedit.engine import Engine, EngineConfig\n"
        "engine = Engine.from_pretrained('tiny', EngineConfig(progress=False))\n"
        "print(engine.generate('a cat', steps=2).pil_image.size)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True
    )

    assert result.stdout.strip() == "(128, 128)"
    # Weights written and loaded, torchvision missing: none of it is the user's business.
    assert result.stderr == ""
