"""Cache size and dense MACs per denoise step of full-size UNets, without any compute.

The UNet is built on the meta device and run once in recording mode, so every recorded
tensor has its real shape and dtype but no storage.

    python -m fisedit.bench.sizing [--out bench/results/cache-sizes.json]
"""

import argparse
import json
from pathlib import Path

import torch
from pydantic import BaseModel

from fisedit.engine.cache import ActivationCache
from fisedit.engine.layers import StepState, wrap_unet
from fisedit.engine.model_shapes import UNET_SHAPES, UNetShape


class StepSize(BaseModel):
    """What one recorded denoise step of a model shape costs."""

    model: str
    dtype: str
    cache_bytes_per_step: int
    dense_macs_per_step: int

    def snapshot_bytes(self, steps: int) -> int:
        return self.cache_bytes_per_step * steps


def measure(shape: UNetShape, dtype: torch.dtype = torch.float16, batch: int = 2) -> StepSize:
    """Records one step of `shape` (CFG batch 2 by default) on the meta device."""
    unet = shape.build("meta", dtype)
    state = StepState()
    wrap_unet(unet, state)
    state.record = ActivationCache(steps=1)
    side = shape.latent_side
    sample = torch.empty(batch, 4, side, side, device="meta", dtype=dtype)
    context = torch.empty(batch, shape.text_tokens, shape.context_dim, device="meta", dtype=dtype)
    unet(
        sample,
        torch.tensor(500, device="meta"),
        encoder_hidden_states=context,
        added_cond_kwargs=shape.added_conditions(batch, "meta", dtype),
    )
    return StepSize(
        model=shape.name,
        dtype=str(dtype).removeprefix("torch."),
        cache_bytes_per_step=state.record.nbytes,
        dense_macs_per_step=state.macs.dense,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    rows = []
    for shape in UNET_SHAPES.values():
        size = measure(shape)
        rows.append({**size.model_dump(), "snapshot_bytes": size.snapshot_bytes(args.steps)})
        print(
            f"{shape.name:10} {size.cache_bytes_per_step / 2**20:8.1f} MiB/step  "
            f"{size.snapshot_bytes(args.steps) / 2**30:6.2f} GiB/{args.steps} steps  "
            f"{size.dense_macs_per_step / 1e12:5.2f} TMAC/step (fp16, CFG batch 2)"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"steps": args.steps, "models": rows}, indent=2))


if __name__ == "__main__":
    main()
