"""Full-size shapes of public Stable Diffusion checkpoints, as config data.

Benchmarks and sizing build these with random weights (or on the meta device), so nothing
is downloaded. Values follow each checkpoint's `unet/config.json`, `vae/config.json` and
`text_encoder*/config.json`.
"""

import tempfile
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from fisedit.engine.models import DiffusionModel, tiny_scheduler_config, tiny_tokenizer

_SD_BLOCKS = {
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "in_channels": 4,
    "out_channels": 4,
}


@dataclass(frozen=True)
class UNetShape:
    """A UNet architecture and the conditioning it expects."""

    name: str
    config: dict
    text_encoders: list[dict] = field(default_factory=list)
    """CLIP text encoder configs; the last of two has a projection (SDXL)."""
    vae_scaling_factor: float = 0.18215
    prediction_type: str = "epsilon"
    text_tokens: int = 77

    @property
    def latent_side(self) -> int:
        return self.config["sample_size"]

    @property
    def context_dim(self) -> int:
        return self.config["cross_attention_dim"]

    def build(self, device: str | torch.device = "cpu", dtype=torch.float32):
        with torch.device(device):
            return UNet2DConditionModel(**self.config).to(dtype).eval().requires_grad_(False)

    def added_conditions(self, batch: int, device, dtype) -> dict | None:
        """SDXL's pooled text and size conditioning; None for SD 1.x and 2.x."""
        if self.config.get("addition_embed_type") != "text_time":
            return None
        pooled = self.config["projection_class_embeddings_input_dim"] - 6 * 256
        return {
            "text_embeds": torch.zeros(batch, pooled, device=device, dtype=dtype),
            "time_ids": torch.zeros(batch, 6, device=device, dtype=dtype),
        }

    def build_model(self, device: str | torch.device = "cpu", dtype=torch.float32):
        """The whole pipeline (UNet, VAE, text encoders) with random weights."""
        torch.manual_seed(0)
        # Initialising on the target device is much faster than on the CPU for large models.
        with torch.device(device):
            encoders = [
                (CLIPTextModelWithProjection if i == 1 else CLIPTextModel)(
                    CLIPTextConfig(**_CLIP_IDS, **config)
                )
                for i, config in enumerate(self.text_encoders)
            ]
            vae = AutoencoderKL(
                **_SD_VAE,
                sample_size=self.latent_side * 8,
                scaling_factor=self.vae_scaling_factor,
            )
        with tempfile.TemporaryDirectory() as workdir:
            tokenizer = tiny_tokenizer(workdir)
        model = DiffusionModel(
            model_id=f"random:{self.name}",
            unet=self.build(device),
            vae=vae,
            tokenizers=[tokenizer] * len(encoders),
            text_encoders=encoders,
            scheduler_config=tiny_scheduler_config(self.prediction_type),
        )
        for module in [model.unet, model.vae, *encoders]:
            module.to(device, dtype).eval().requires_grad_(False)
        return model


# The character-level tokenizer's start and end ids.
_CLIP_IDS = {"bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513}
_CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
_CLIP_H = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "projection_dim": 512,
    "hidden_act": "gelu",
}
_CLIP_BIGG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
_SD_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
}


UNET_SHAPES = {
    shape.name: shape
    for shape in (
        UNetShape(
            "sd15-512",
            {**_SD_BLOCKS, "sample_size": 64, "attention_head_dim": 8, "cross_attention_dim": 768},
            text_encoders=[_CLIP_L],
        ),
        UNetShape(
            "sd21-768",
            {
                **_SD_BLOCKS,
                "sample_size": 96,
                "attention_head_dim": (5, 10, 20, 20),
                "cross_attention_dim": 1024,
                "use_linear_projection": True,
                "upcast_attention": True,
            },
            text_encoders=[_CLIP_H],
            prediction_type="v_prediction",
        ),
        UNetShape(
            "sdxl-1024",
            {
                "sample_size": 128,
                "block_out_channels": (320, 640, 1280),
                "down_block_types": (
                    "DownBlock2D",
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                ),
                "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                "layers_per_block": 2,
                "transformer_layers_per_block": (1, 2, 10),
                "attention_head_dim": (5, 10, 20),
                "cross_attention_dim": 2048,
                "use_linear_projection": True,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816,
                "in_channels": 4,
                "out_channels": 4,
                "norm_num_groups": 32,
            },
            text_encoders=[_CLIP_L, _CLIP_BIGG],
            vae_scaling_factor=0.13025,
        ),
    )
}
