"""Kernel launches and MACs of one dense and one sparse step of a full-size UNet, on no GPU.

The UNet is built on the meta device (shapes, no storage) with the Triton kernels selected.
A recording step runs first, then sparse steps over centred square masks, as the engine
captures them: reading the cache at a step held in device memory, recording into slots.
Triton launches are recorded, not run, with grids sized for an H100 (132 SMs); every other
op is counted by a dispatch mode.

A CUDA graph removes launch overhead from the host, but each kernel still costs a few
microseconds on the GPU, so the count is a floor on the sparse step's time that no MAC
saving removes. With `--compile`, every distinct Triton launch is also compiled for sm_90
and its registers, spills and shared memory are reported.

    python -m fisedit.bench.step_launches [--models sd15-512] [--compile] [--out FILE]
"""

import argparse
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fisedit.bench.edit_bench import square_mask
from fisedit.engine.cache import ActivationCache, StepSlots
from fisedit.engine.config import SparseConfig
from fisedit.engine.kernels.aot import compile_launches
from fisedit.engine.kernels.launch import Launch, recording_launches
from fisedit.engine.layers import MacCount, StepState, wrap_unet
from fisedit.engine.model_shapes import UNET_SHAPES, UNetShape
from fisedit.engine.plan import SparsePlan

H100_SMS = 132
MASK_RATIOS = (0.05, 0.15, 0.30)
# Ops that allocate or only describe memory: no kernel.
_NO_KERNEL = {"empty", "empty_strided", "new_empty", "empty_like", "_unsafe_view", "lift_fresh"}


class StepLaunches(BaseModel):
    """What one UNet step launches: Triton kernels, and other ops that launch a kernel."""

    model: str
    step: str
    mask_ratio: float | None
    mac_fraction: float
    triton_launches: int
    other_launches: int
    other_ops: dict[str, int]
    """The other ops by name, most frequent first."""

    @property
    def launches(self) -> int:
        return self.triton_launches + self.other_launches


class _OpCounter(TorchDispatchMode):
    """Counts the ops that launch kernels. Attention counts once: on the meta device SDPA
    decomposes into its math ops, where a GPU runs one fused kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.inside_attention = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (self.inside_attention or func.is_view or name in _NO_KERNEL):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class _AttentionAsOneOp(TorchFunctionMode):
    def __init__(self, counter: _OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        self.counter.ops["scaled_dot_product_attention"] += 1
        self.counter.inside_attention = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.inside_attention = False


class MetaUNet:
    """A full-size UNet on the meta device, wrapped for sparse steps, CFG batch 2, fp16."""

    def __init__(self, shape: UNetShape, dtype: torch.dtype = torch.float16) -> None:
        self.shape = shape
        self.state = StepState(config=SparseConfig(kernels="triton"))
        self.unet = shape.build("meta", dtype)
        wrap_unet(self.unet, self.state)
        self.unet.to(memory_format=torch.channels_last)
        side, batch = shape.latent_side, 2
        self.sample = torch.empty(batch, 4, side, side, device="meta", dtype=dtype)
        self.context = torch.empty(
            batch, shape.text_tokens, shape.context_dim, device="meta", dtype=dtype
        )
        self.added = shape.added_conditions(batch, "meta", dtype)
        self.cache = ActivationCache(steps=1, channels_last=True)

    def step(self, plan: SparsePlan | None) -> tuple[MacCount, Counter[str], list[Launch]]:
        """One UNet call as the engine captures it: dense without a plan, else sparse over
        `plan` reading the dense step's record; recording into static slots either way."""
        state = self.state
        state.step = torch.tensor(0, device="meta")
        state.plan, state.source = plan, None if plan is None else self.cache
        state.record, state.macs = StepSlots(channels_last=True), MacCount()
        counter = _OpCounter()
        with recording_launches(H100_SMS) as launches, _AttentionAsOneOp(counter), counter:
            self.unet(
                self.sample,
                torch.tensor(500, device="meta"),
                encoder_hidden_states=self.context,
                added_cond_kwargs=self.added,
            )
        if plan is None:
            self.cache.put_step(0, state.record.tensors)
        return state.macs, counter.ops, launches


def measure(shape: UNetShape) -> tuple[list[StepLaunches], list[Launch]]:
    """The dense step and sparse steps at each mask ratio; also every Triton launch made."""
    unet = MetaUNet(shape)
    macs, ops, launches = unet.step(None)
    rows = [_row(shape, "dense", None, macs, ops, launches)]
    every_launch = list(launches)
    for ratio in MASK_RATIOS:
        plan = SparsePlan(square_mask(shape.latent_side, ratio), unet.state.config, "meta")
        unet.step(plan)  # builds the plan's indices, as a graph capture's warm-up does
        macs, ops, launches = unet.step(plan)
        rows.append(_row(shape, "sparse", ratio, macs, ops, launches))
        every_launch += launches
    return rows, every_launch


def _row(shape, step, ratio, macs, ops, launches) -> StepLaunches:
    return StepLaunches(
        model=shape.name,
        step=step,
        mask_ratio=ratio,
        mac_fraction=macs.fraction,
        triton_launches=len(launches),
        other_launches=sum(ops.values()),
        other_ops=dict(ops.most_common()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd15-512", help="comma-separated UNet shapes")
    parser.add_argument("--compile", action="store_true", help="also compile for sm_90")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    payload: dict = {
        "device": "meta (no GPU): launches counted and kernels compiled for sm_90, not timed",
        "sms": H100_SMS,
        "steps": [],
        "kernels": [],
    }
    for name in args.models.split(","):
        rows, launches = measure(UNET_SHAPES[name])
        for row in rows:
            ratio = "-" if row.mask_ratio is None else f"{row.mask_ratio:.2f}"
            print(
                f"{row.model:10} {row.step:6} mask {ratio:4}  MACs {row.mac_fraction:5.3f}  "
                f"launches {row.launches:5} (Triton {row.triton_launches}, "
                f"other {row.other_launches})"
            )
        payload["steps"] += [row.model_dump() for row in rows]
        if args.compile:
            for kernel in compile_launches(launches, arch=90):
                print(
                    f"  {kernel.kernel:30} regs {kernel.registers:3}  spills {kernel.spill_bytes}"
                    f"  smem {kernel.shared_bytes:6}  {kernel.constexprs}"
                )
                payload["kernels"].append({"model": name, **asdict(kernel)})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
