"""Full-size UNet shapes of public Stable Diffusion checkpoints, as config data.

Benchmarks and sizing build these with random weights (or on the meta device), so nothing
is downloaded. Values follow each checkpoint's `unet/config.json`.
"""

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

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


UNET_SHAPES = {
    shape.name: shape
    for shape in (
        UNetShape(
            "sd15-512",
            {**_SD_BLOCKS, "sample_size": 64, "attention_head_dim": 8, "cross_attention_dim": 768},
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
        ),
    )
}
