"""Stable Diffusion checkpoints loaded through diffusers, and a tiny model for tests and demos."""

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import diffusers
import numpy as np
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TinyVariant = Literal["sd15", "sd2", "sdxl"]
TINY_MODELS: dict[str, TinyVariant] = {"tiny": "sd15", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
"""Model names that `load_model` builds locally with `build_tiny_model`."""


class ModelLoadError(ValueError):
    """A checkpoint could not be found or is not a Stable Diffusion pipeline."""


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder takes; only its start was used."""


@dataclass
class PromptEmbeddings:
    """Text conditioning for a batch of prompts."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


@dataclass
class DiffusionModel:
    """The diffusers components the engine drives with its own denoise loop."""

    model_id: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizers: list[CLIPTokenizer]
    text_encoders: list[CLIPTextModel]
    scheduler_config: dict
    zero_empty_negative: bool = False
    """An empty negative prompt conditions on zeros (SDXL's `force_zeros_for_empty_prompt`)."""

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def is_sdxl(self) -> bool:
        return _is_sdxl(self.unet)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The latent shape at the model's default image size."""
        side = self.unet.config.sample_size
        return (self.unet.config.in_channels, side, side)

    @property
    def image_size(self) -> int:
        """The default image side: the one the model was trained at."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's scale times the UNet's halvings,
        so that every UNet resolution tiles the latent exactly."""
        halvings = len(self.unet.config.block_out_channels) - 1
        return self.vae_scale_factor * 2**halvings

    def latent_shape_at(self, height: int, width: int) -> tuple[int, int, int]:
        """The latent shape of a `height` x `width` image; a clear error for sizes the UNet
        cannot run at."""
        multiple = self.size_multiple
        for side, pixels in (("height", height), ("width", width)):
            if pixels % multiple:
                raise ValueError(
                    f"{side}: {pixels} is not a multiple of {multiple}, as both sides of an "
                    f"image of this model must be (its VAE scales by {self.vae_scale_factor} "
                    f"and its UNet halves the latent "
                    f"{len(self.unet.config.block_out_channels) - 1} times)"
                )
        scale = self.vae_scale_factor
        return (self.unet.config.in_channels, height // scale, width // scale)

    @property
    def config_hash(self) -> str:
        """Identifies the architecture, so caches are never mixed across models."""
        # Keys starting with "_" record where and with which version a model was saved.
        configs = [
            {k: v for k, v in dict(config).items() if not k.startswith("_")}
            for config in (self.unet.config, self.vae.config, self.scheduler_config)
        ]
        blob = json.dumps(configs, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def truncated_prompt(self, prompt: str) -> str | None:
        """The part of `prompt` the text encoder reads, when the prompt is longer than the
        encoder's limit (as diffusers does, the rest is dropped); None when it all fits."""
        tokenizer = self.tokenizers[0]
        limit = tokenizer.model_max_length - 2  # the start and end tokens take two places
        # verbose=False: transformers would warn that an overlong prompt cannot be encoded.
        ids = tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids
        return tokenizer.decode(ids[:limit]) if len(ids) > limit else None

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeddings:
        """Encodes prompts the way the matching diffusers pipeline does, truncating prompts
        longer than the text encoder takes with a PromptTruncatedWarning."""
        for prompt in prompts:
            if (kept := self.truncated_prompt(prompt)) is not None:
                warnings.warn(
                    f"prompt is longer than the text encoder's "
                    f"{self.tokenizers[0].model_max_length - 2} tokens; only this part is "
                    f"used: {kept!r}",
                    PromptTruncatedWarning,
                    stacklevel=2,
                )
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            if not self.is_sdxl:
                return PromptEmbeddings(hidden=encoder(ids)[0])
            # SDXL conditions on the penultimate layer of both encoders and the pooled second.
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]
        return PromptEmbeddings(hidden=torch.cat(hidden, dim=-1), pooled=pooled)

    def encode_for_guidance(self, prompt: str, negative_prompt: str = "") -> PromptEmbeddings:
        """[unconditional, conditional] embeddings for classifier-free guidance, built as the
        diffusers pipeline builds them: where the checkpoint says `force_zeros_for_empty_prompt`
        (SDXL), an empty negative prompt gives zero embeddings, hidden and pooled."""
        embeds = self.encode_prompts([negative_prompt, prompt])
        if self.zero_empty_negative and not negative_prompt:
            embeds.hidden[0] = 0
            embeds.pooled[0] = 0
        return embeds

    def added_conditions(
        self, embeds: PromptEmbeddings, image_hw: tuple[int, int] | None = None
    ) -> dict | None:
        """SDXL's extra conditioning: pooled text and (original size, crop, target size),
        both sizes (height, width) of the image made, the model's default if not given."""
        if not self.is_sdxl:
            return None
        height, width = image_hw or (self.image_size, self.image_size)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.hidden.dtype)
        batch = embeds.hidden.shape[0]
        return {"text_embeds": embeds.pooled, "time_ids": time_ids.repeat(batch, 1).to(self.device)}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents [1, C, h, w] to an RGB uint8 image [H, W, 3], in the VAE's dtype (float32
        for an SDXL VAE that says `force_upcast`, see `load_model`)."""
        config = self.vae.config
        latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        image = self.vae.decode(latents.to(self.vae.dtype)).sample[0]
        image = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return image.permute(1, 2, 0).cpu().numpy()


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Keeps diffusers' and transformers' progress bars and notices (weights loaded and
    written, torchvision missing) off the user's terminal while a model is loaded or
    written; their own settings come back afterwards."""
    libraries = [diffusers.utils.logging, transformers.utils.logging]
    saved = [(library.get_verbosity(), library.is_progress_bar_enabled()) for library in libraries]
    for library in libraries:
        library.set_verbosity_error()
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, (verbosity, progress_bars) in zip(libraries, saved, strict=True):
            library.set_verbosity(verbosity)
            if progress_bars:
                library.enable_progress_bar()


def load_model(
    source: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> DiffusionModel:
    """Loads an SD 1.x, SD 2.x or SDXL pipeline from a local directory or a hub id, or
    builds one of the TINY_MODELS (`tiny`, `tiny-sd2`, `tiny-sdxl`) in a temporary directory.

    As diffusers' StableDiffusionXLPipeline does, an SDXL VAE whose config says
    `force_upcast` decodes in float32 when the model runs in float16 (the stock SDXL VAE
    overflows to NaN or black images in float16); it is loaded in float32 once rather than
    converted at every decode. bfloat16 has float32's range and is kept.
    """
    source = str(source)
    if source in TINY_MODELS:
        with tempfile.TemporaryDirectory() as workdir:
            model = load_model(build_tiny_model(workdir, TINY_MODELS[source]), device, dtype)
        model.model_id = source
        return model
    with _quiet_libraries():
        return _load(source, device, dtype)


def check_model_source(source: str | os.PathLike) -> None:
    """Raises ModelLoadError unless `source` is a tiny model's name or a pipeline whose
    index loads: the cheap check made before starting workers that load the model."""
    source = str(source)
    if source in TINY_MODELS:
        return
    try:
        DiffusionPipeline.load_config(source)
    except (OSError, ValueError) as error:
        raise _load_error(source, error) from error


def _load_error(source: str, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load a Stable Diffusion pipeline from {source!r}: expected a local "
        f"directory written by save_pretrained or a hub id available offline ({error})"
    )


def _load(source: str, device: str, dtype: torch.dtype) -> DiffusionModel:
    try:
        index = DiffusionPipeline.load_config(source)
        has_second_encoder = (index.get("text_encoder_2") or [None])[0] is not None
        names = [("tokenizer", "text_encoder")]
        if has_second_encoder:
            names.append(("tokenizer_2", "text_encoder_2"))
        encoder_classes = [CLIPTextModel, CLIPTextModelWithProjection]
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)
        sdxl = _is_sdxl(unet)
        upcast = AutoencoderKL.load_config(source, subfolder="vae").get("force_upcast", True)
        vae_dtype = torch.float32 if sdxl and upcast and dtype == torch.float16 else dtype
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=vae_dtype)
        tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder=t) for t, _ in names]
        encoders = [
            cls.from_pretrained(source, subfolder=e, torch_dtype=dtype)
            for cls, (_, e) in zip(encoder_classes, names, strict=False)
        ]
        scheduler_config = dict(DDIMScheduler.load_config(source, subfolder="scheduler"))
    except (OSError, ValueError, KeyError) as error:
        raise _load_error(source, error) from error
    for module in [unet, vae, *encoders]:
        module.to(device).eval().requires_grad_(False)
    # The SDXL pipeline's default when model_index.json does not say.
    zero_empty_negative = sdxl and index.get("force_zeros_for_empty_prompt", True)
    return DiffusionModel(
        source, unet, vae, tokenizers, encoders, scheduler_config, zero_empty_negative
    )


def _is_sdxl(unet: UNet2DConditionModel) -> bool:
    return unet.config.addition_embed_type == "text_time"


def _byte_level_vocab() -> dict[str, int]:
    # CLIP's byte-to-unicode table: every byte gets a printable character.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = [chr(b) for b in printable]
    chars += [chr(256 + n) for n in range(256 - len(printable))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def tiny_tokenizer(workdir: str | os.PathLike) -> CLIPTokenizer:
    """A character-level CLIP tokenizer written locally, so nothing is downloaded."""
    vocab, merges = Path(workdir) / "vocab.json", Path(workdir) / "merges.txt"
    vocab.write_text(json.dumps(_byte_level_vocab()))
    merges.write_text("#version: 0.2\n")
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=77)


def tiny_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """The Stable Diffusion noise schedule."""
    return dict(
        DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type=prediction_type,
        ).config
    )


def _tiny_text_encoder(with_projection: bool) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _tiny_unet(variant: TinyVariant) -> UNet2DConditionModel:
    common = dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        # diffusers' name for the number of heads: 2 heads of 16 and 32 channels (SD's 8
        # would make heads of 4, whose attention costs CPU tests three times as much).
        attention_head_dim=2,
        norm_num_groups=8,
    )
    if variant == "sdxl":
        return UNet2DConditionModel(
            **common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            cross_attention_dim=64,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
        )
    return UNet2DConditionModel(
        **common,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        use_linear_projection=variant == "sd2",
    )


def build_tiny_model(path: str | os.PathLike, variant: TinyVariant = "sd15") -> Path:
    """Writes a small, randomly initialised, SD-shaped pipeline with save_pretrained.

    Three UNet resolutions (32, 16, 8 at a 32x32 latent), cross-attention and GroupNorm
    as in SD; `sd2` adds v-prediction and linear projections, `sdxl` a second text encoder
    and SDXL's added conditioning.
    """
    # The same weights every time, without touching the caller's random state.
    with _quiet_libraries(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _write_tiny_model(Path(path), variant)


def _write_tiny_model(path: Path, variant: TinyVariant) -> Path:
    # Importing the pipelines makes transformers warn about torchvision: import them quietly.
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path.mkdir(parents=True, exist_ok=True)
    unet = _tiny_unet(variant)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
    )
    prediction = "v_prediction" if variant == "sd2" else "epsilon"
    # DPM-Solver++ as the model's own scheduler: what generate runs when not told otherwise.
    scheduler = DPMSolverMultistepScheduler.from_config(tiny_scheduler_config(prediction))
    tokenizer = tiny_tokenizer(path)
    if variant == "sdxl":
        pipeline = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=_tiny_text_encoder(with_projection=False),
            text_encoder_2=_tiny_text_encoder(with_projection=True),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )
    else:
        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=_tiny_text_encoder(with_projection=False),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.save_pretrained(path)
    for scratch in ("vocab.json", "merges.txt"):
        (path / scratch).unlink()
    return path
