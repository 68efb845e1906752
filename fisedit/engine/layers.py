"""Wrappers that give diffusers UNet layers a dense, recording and sparse mode.

The wrappers replace ResnetBlock2D, Transformer2DModel, Downsample2D, Upsample2D, conv_in
and the output head (GroupNorm, SiLU, conv_out) inside a UNet2DConditionModel, so the
UNet's own forward drives them. Dense calls run the diffusers module itself, except where
it would recompute, at every call, a linear over an input the whole run shares: a resnet's
time projection and a cross-attention's text keys and values come from the call's shared
linears (`SharedLinears`), computed once per run (and attention takes its keys and values
from one matmul: `ProjectedAttention`). Forward hooks record what the sparse pass will
read. Sparse calls compute only the active pixels of the layer's output and take every
other pixel from the cache of the same step: each map they record starts as the cached one
(`StepMaps`), and their kernels write the active pixels into it in place. Layers record
only what sparse calls read: nothing at resolutions that run dense (`dense_below`), and a
resnet that only a sparse transformer reads (in diffusers' cross-attention blocks) no
output, as the transformer reads it at active pixels only (sparse calls write it into a
map of the resnet's own). Every GroupNorm becomes a MapGroupNorm, which keeps
channels_last maps channels_last in dense calls too.

With `SparseConfig(kernels="dense")` sparse calls are done the slow way, as a reference:
the whole diffusers module runs, and hooks paste the cached map outside the active region
wherever the sparse call reads one from the cache (the layer's output, and inside it the
inputs of resnets' second norm and of transformer blocks' self-attention, or that
attention's keys and values); a transformer after a resnet that records no output takes
the GroupNorm statistics outside its region from the cache instead.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import (
    Transformer2DModel,
    Transformer2DModelOutput,
)
from diffusers.models.unets.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    UNetMidBlock2DCrossAttn,
)
from torch import nn

from fisedit.engine.cache import ActivationCache, HostPrefetcher, StepMaps, StepSlots
from fisedit.engine.config import SparseConfig
from fisedit.engine.kernels import attention as attention_kernels
from fisedit.engine.kernels import group_norm as norm_kernels
from fisedit.engine.kernels import linear as linear_kernels
from fisedit.engine.kernels import sparse_conv as conv_kernels
from fisedit.engine.kernels import tokens as token_kernels
from fisedit.engine.kernels.launch import ChannelConcat, StepView, with_step_views
from fisedit.engine.plan import LayerGeometry, SparsePlan
from fisedit.engine.sparse_ops import (
    attended_values,
    attention_over,
    key_value_parts,
    key_value_projection,
    multi_head_attention,
    pointwise,
    stacked_linear,
)


@dataclass
class MacCount:
    """Multiply-accumulates a dense pass would do, and those actually executed."""

    dense: int = 0
    executed: int = 0

    def add(self, dense: int, executed: int) -> None:
        self.dense += dense
        self.executed += executed

    @property
    def fraction(self) -> float:
        return self.executed / self.dense if self.dense else 0.0


class SharedInputLinears:
    """Linear layers that each UNet call applies to one input shared by many of them (the
    time embedding, the text embeddings): one matmul over their stacked weights per call,
    instead of one launch per layer; each layer's output is a slice of the result.

    `forget` starts a new call: a captured graph then computes the matmul itself, whatever
    an earlier call computed for the same input buffer, unless `given` hands it the outputs
    computed before."""

    ANY_INPUT = object()
    """For `given`: the outputs hold for whatever input the call's layers pass."""

    def __init__(self, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.prepare = prepare
        """Applied to the input first (once)."""
        self.layers: dict[Any, Callable[[], list[tuple[torch.Tensor, torch.Tensor | None]]]] = {}
        self.slices: dict[Any, slice] = {}
        self.stacked: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def add(self, key: Any, weights: Callable[[], list[tuple[torch.Tensor, torch.Tensor | None]]]):
        """Registers layer `key`; `weights()` gives the linears whose outputs it concatenates,
        each (weight [out, in], bias [out] or None), when first needed, on the device and in
        the dtype of the model by then. The layers' weights become views of the stack
        (`stacked_linear`)."""
        self.layers[key] = weights

    @property
    def width(self) -> int:
        """The stacked outputs' size: the sum of the layers' output sizes."""
        if self.stacked is None:
            self._stack()
        return self.stacked[0].shape[0]

    def _stack(self) -> None:
        parts = {key: weights() for key, weights in self.layers.items()}
        start = 0
        for key, linears in parts.items():
            width = sum(weight.shape[0] for weight, _ in linears)
            self.slices[key] = slice(start, start + width)
            start += width
        self.stacked = stacked_linear([linear for linears in parts.values() for linear in linears])

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """Every layer's output for the input `x`, stacked along the last dimension."""
        if self.stacked is None:
            self._stack()
        return F.linear(x if self.prepare is None else self.prepare(x), *self.stacked)

    def of(self, key: Any, x: torch.Tensor) -> torch.Tensor:
        """The output [..., out] of layer `key` for the input `x`."""
        # Identity, not value: the input is held here until the next call, so its id is
        # never reused while it is compared.
        if x is not self.input and self.input is not self.ANY_INPUT:
            self.input, self.output = x, self.compute(x)
        return self.output[..., self.slices[key]]

    def given(self, x: "torch.Tensor | object", output: torch.Tensor) -> None:
        """Makes `output`, `compute(x)` done before this call, the call's outputs for `x`
        (or for any input, with `ANY_INPUT`): an input known before many calls is
        multiplied once."""
        self.input, self.output = x, output

    def forget(self) -> None:
        self.input = self.output = None


@dataclass
class SharedLinears:
    """The linears whose inputs every layer of a UNet call shares."""

    time: SharedInputLinears = field(default_factory=lambda: SharedInputLinears(F.silu))
    """Each resnet's time_emb_proj (after the SiLU), with conv1's bias folded in."""
    raw_time: SharedInputLinears = field(default_factory=SharedInputLinears)
    """The same, for resnets that skip the SiLU."""
    text: SharedInputLinears = field(default_factory=SharedInputLinears)
    """Each cross-attention's keys and values of the text embeddings, which stay the same
    over a run's steps: computed once per run (`Engine.text_keys_values`)."""

    def forget(self) -> None:
        """Starts a new UNet call."""
        for linears in (self.time, self.raw_time, self.text):
            linears.forget()

    @property
    def _time_parts(self) -> list[SharedInputLinears]:
        return [linears for linears in (self.time, self.raw_time) if linears.layers]

    def time_projections(self, emb: torch.Tensor) -> torch.Tensor | None:
        """Every resnet's time projection of the time embeddings `emb` [..., D], stacked
        along the last dimension (None without such resnets). A run's embeddings are known
        before its steps (its timesteps, and SDXL's added conditions), so it computes these
        for all its steps in one matmul, not one per step."""
        parts = [linears.compute(emb) for linears in self._time_parts]
        return torch.cat(parts, -1) if parts else None

    def given_time_projections(self, projections: torch.Tensor) -> None:
        """Makes `projections` (one step of `time_projections`) this call's, whatever time
        embedding its resnets pass."""
        start = 0
        for linears in self._time_parts:
            width = linears.width
            linears.given(SharedInputLinears.ANY_INPUT, projections[..., start : start + width])
            start += width


@dataclass
class StepState:
    """What the wrapped layers do in the current UNet call; the denoise loop sets it."""

    config: SparseConfig = field(default_factory=SparseConfig)
    step: int | torch.Tensor = 0
    plan: SparsePlan | None = None
    source: ActivationCache | HostPrefetcher | None = None
    record: ActivationCache | StepSlots | StepMaps | None = None
    """Where calls record: a sparse call into the StepMaps of its step."""
    shared: SharedLinears = field(default_factory=SharedLinears)
    """Linears over inputs the layers share; whoever starts a UNet call calls `forget`."""
    macs: MacCount = field(default_factory=MacCount)

    @property
    def sparse(self) -> bool:
        return self.plan is not None

    def use_triton(self, x: torch.Tensor | StepView) -> bool:
        kernels = self.config.kernels
        return kernels == "triton" or (kernels == "auto" and x.device.type == "cuda")


def _linear_macs(layer: nn.Module, rows: int) -> int:
    if isinstance(layer, nn.Conv2d):
        return rows * layer.weight.numel()
    return rows * layer.in_features * layer.out_features


def _conv_macs(conv: nn.Conv2d, pixels: int) -> int:
    return pixels * conv.weight.numel()


class MapGroupNorm(nn.GroupNorm):
    """A UNet's nn.GroupNorm (same parameters) that keeps channels_last maps channels_last
    off the CPU where the step state runs Triton kernels: there PyTorch's GroupNorm copies
    such a map to NCHW and returns NCHW, which the next convolution then converts back (two
    copies of the map per norm in a dense step). On CPU, PyTorch's GroupNorm keeps the
    layout itself; everything else goes to nn.GroupNorm too."""

    def __init__(self, norm: nn.GroupNorm, state: StepState) -> None:
        super().__init__(norm.num_groups, norm.num_channels, norm.eps, affine=norm.affine)
        self.weight, self.bias = norm.weight, norm.bias
        self.state = state
        self.statistics_name: str | None = None
        """Where calls that record put the block statistics of the input, for the sparse
        layer that reads them (`SparseLayer.record_statistics`)."""
        self.merged: LayerGeometry | None = None
        """In a sparse call run densely over an input with nothing cached outside its region:
        that geometry, whose blocks' statistics come from the input and every other block's
        from the cache (what the sparse call computes)."""

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        """GroupNorm of `x`, then SiLU if `silu` (in the norm's own kernel, where it runs
        one)."""
        record, name = self.state.record, self.statistics_name
        if self.merged is not None:
            merged = with_step_views(norm_kernels.group_norm_affine_reference)
            affine = merged(self, x, record[name], self.merged.blocks, self.merged.active_blocks)
            return norm_kernels.group_norm_apply_reference(x, affine, silu)
        recording = record is not None and name is not None
        channels_last = (
            x.dim() == 4
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
        )
        triton = x.device.type != "cpu" and self.affine and self.state.use_triton(x)
        if triton and (channels_last or recording):
            statistics = None
            if recording:
                # The statistics kernel writes them as it goes: in a sparse step, in place.
                in_place = isinstance(record, StepMaps)
                statistics = (
                    record[name] if in_place else norm_kernels.empty_block_statistics(self, x)
                )
            out = norm_kernels.group_norm(self, x, statistics, silu)
        else:
            out = super().forward(x)
            out = F.silu(out) if silu else out
            statistics = norm_kernels.block_statistics_reference(self, x) if recording else None
        if recording:
            record.put(name, self.state.step, statistics)
        return out


def _map_group_norms(unet: nn.Module, state: StepState) -> None:
    """Replaces every nn.GroupNorm in `unet` with a MapGroupNorm, wherever it is held."""
    replaced: dict[nn.Module, MapGroupNorm] = {}
    for module in list(unet.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.GroupNorm:
                if child not in replaced:
                    replaced[child] = MapGroupNorm(child, state)
                setattr(module, name, replaced[child])


class SparseLayer(nn.Module):
    """Common control flow: dense and recording through the wrapped module, or sparse."""

    recorded: tuple[str, ...] = ("out",)
    """The maps this layer records (`<name>.<key>` in the cache)."""
    reads_parts = False
    """Whether a sparse call takes its input as a ChannelConcat (the kernels it runs on it
    read each channel from its part)."""

    def __init__(self, name: str, inner: nn.Module, state: StepState) -> None:
        super().__init__()
        self.name = name
        self.inner = inner
        self.state = state
        self._packed: dict[Any, Any] = {}
        self.statistics: dict[nn.GroupNorm, str] = {}
        """The GroupNorms whose input's block statistics this layer records, and under what
        key (`record_statistics`)."""
        self.region: torch.Tensor | None = None
        """While a sparse call runs densely (kernels="dense"): its active pixels, [H, W]."""
        self._own_maps: dict[tuple, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, *args, **kwargs):
        state = self.state
        hw = self.output_hw(x, *args, **kwargs)
        # No sparse step reads the maps of a layer at a resolution that runs dense: such a
        # call runs dense and records nothing.
        records = hw is None or not state.config.dense_at(hw)
        geometry = state.plan.at(hw) if state.sparse and hw is not None else None
        record = state.record
        state.record = record if records else None
        try:
            if geometry is None or geometry.dense:
                out = self.dense(x, *args, **kwargs)
                executed = None
            elif state.config.kernels == "dense":
                out = self.dense_pasted(x, geometry, *args, **kwargs)
                executed = None
            elif geometry.empty:
                # Nothing to recompute: this step's maps already hold the cached ones (and
                # where none are recorded, nothing reads them).
                out = self.output_map(x, hw) if records else self.own_map(x, hw)
                executed = 0
            else:
                out = self.sparse(self.behind(x), geometry, *args, **kwargs)
                executed = self.macs(x, geometry.index.numel(), **kwargs)
            if "out" in self.recorded:
                self.save("out", out)
        finally:
            state.record = record
        pixels = out.shape[-2] * out.shape[-1]
        dense_macs = self.macs(x, pixels, **kwargs)
        state.macs.add(dense_macs, dense_macs if executed is None else executed)
        return self.wrap(self.passed_on(out), **kwargs)

    def behind(self, x: torch.Tensor) -> torch.Tensor | StepView | ChannelConcat:
        """The map a sparse call reads for its input `x`: what is behind it when `x` is a
        static map (`StepMaps.behind`), which is then never copied for this layer; the
        parts of a join only for a layer that `reads_parts`."""
        record = self.state.record
        if not isinstance(record, StepMaps):
            return x
        behind = record.behind(x)
        if isinstance(behind, ChannelConcat) and not self.reads_parts:
            return record.filled(x)
        return behind

    def passed_on(self, out: torch.Tensor | StepView) -> torch.Tensor:
        """What the UNet gets for this call's output: the output, or with a step in device
        memory its static map (`StepMaps.static`)."""
        if not isinstance(out, StepView):
            return out
        return self.state.record.static(f"{self.name}.out")

    def reads(self, plan: SparsePlan, cache: ActivationCache) -> list[str]:
        """The names in `cache` a sparse call over `plan` reads: everything this layer
        records, unless its resolution runs dense (then none)."""
        # The first map a layer records is a map [B, C, H, W] at its output's resolution.
        first = cache.tensors.get(f"{self.name}.{self.recorded[0]}")
        if first is None or plan.at(tuple(first.shape[-2:])).dense:
            return []
        return [f"{self.name}.{key}" for key in (*self.recorded, *self.statistics.values())]

    def output_hw(self, x: torch.Tensor, *args, **kwargs) -> tuple[int, int] | None:
        """The output resolution, or None when this call must run dense."""
        return tuple(x.shape[-2:])

    def dense(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.inner(x, *args, **kwargs)

    def sparse(self, x: torch.Tensor, geometry: LayerGeometry, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def dense_pasted(
        self, x: torch.Tensor, geometry: LayerGeometry, *args, **kwargs
    ) -> torch.Tensor:
        """What `sparse` computes, the slow way: the whole layer, with the cached maps pasted
        outside the active region (here the output, inside it by hooks)."""
        self.region = geometry.region
        try:
            out = self.dense(x, *args, **kwargs)
        finally:
            self.region = None
        return self.pasted("out", out, geometry.region) if "out" in self.recorded else out

    def macs(self, x: torch.Tensor, active: int, **kwargs) -> int:
        raise NotImplementedError

    def wrap(self, out: torch.Tensor, **kwargs):
        return out

    def kernel(self, module, name: str, like: torch.Tensor):
        """The Triton kernel `name` from `module`, or the reference beside it (both take
        StepViews for maps)."""
        if self.state.use_triton(like):
            return getattr(module, name)
        return with_step_views(getattr(module, f"{name}_reference"))

    def conv_active(
        self,
        x: torch.Tensor,
        conv: nn.Conv2d | nn.Linear,
        taps: torch.Tensor,
        norm_affine: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        out_scale: float = 1.0,
        bias: torch.Tensor | None = None,
        into: tuple[torch.Tensor | StepView, torch.Tensor] | None = None,
        split_k: int | None = None,
    ) -> torch.Tensor:
        """(conv(x) + bias + residual) * out_scale at the active pixels (bias: the conv's own
        unless given; a linear runs as a 1x1 conv), as tokens [B, P, C_out], or with `into` =
        (map, index) scattered straight into `map`, which it returns.
        `split_k`: see `sparse_conv2d_triton`."""
        bias = conv.bias if bias is None else bias
        out, out_index = (None, None) if into is None else into
        args = (x, taps, conv.weight, bias, norm_affine, residual, out_scale, out, out_index)
        if not self.state.use_triton(x):
            return with_step_views(conv_kernels.sparse_conv2d_reference)(*args)
        packed = self.packed(conv, lambda c: conv_kernels.pack_conv_weight(c.weight))
        return conv_kernels.sparse_conv2d_triton(
            *args,
            packed_weight=packed,
            split_k=split_k,
            partial_budget=self.state.config.split_k_partials,
        )

    def packed(self, module: nn.Module, pack: Callable[[nn.Module], Any]) -> Any:
        """`pack(module)`: weights arranged for the sparse pass, computed once."""
        if module not in self._packed:
            self._packed[module] = pack(module)
        return self._packed[module]

    def linear(
        self,
        x: torch.Tensor | StepView,
        layer: nn.Module,
        weights: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
        residual: torch.Tensor | None = None,
        geglu: bool = False,
        into: tuple[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | StepView:
        """A linear over token rows x [B, L, K] (a StepView too) with `weights(layer)`
        (weight [N, K], bias; by default the layer's own), GEGLU after it with `geglu`, then
        + residual; with `into` = (key, index) written into rows `index` of this step's
        token map `key`, which it returns."""
        weight, bias = self.packed(layer, weights or (lambda m: (m.weight, m.bias)))
        out, out_index = (None, None) if into is None else (self.target(into[0]), into[1])
        args = (x, weight, bias, residual, geglu, out, out_index)
        if not self.state.use_triton(x):
            return with_step_views(linear_kernels.linear_reference)(*args)
        return linear_kernels.linear(*args)

    def gather(
        self, x: torch.Tensor, index: torch.Tensor, norm_affine: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The active pixels of the map `x` as tokens [B, P, C], raw and with the [2, B, C]
        GroupNorm affine applied (raw twice without one)."""
        return self.kernel(token_kernels, "gather_tokens_affine", x)(x, index, norm_affine)

    def layer_norm(
        self, norm: nn.LayerNorm, rows: torch.Tensor, into: tuple[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The LayerNorm of tokens [B, P, D]; with `into` = (key, index) it also goes into
        rows `index` of this step's token map `key`."""
        out, index = (None, None) if into is None else (self.target(into[0]), into[1])
        layernorm = self.kernel(token_kernels, "layernorm_rows", rows)
        return layernorm(rows, norm.weight, norm.bias, norm.eps, out, index)

    def record_statistics(self, norm: MapGroupNorm, key: str) -> None:
        """Records the block statistics of `norm`'s input (a norm of this layer) under `key`
        in dense calls, for sparse calls to read (`group_norm_affine`)."""
        self.statistics[norm] = key
        norm.statistics_name = f"{self.name}.{key}"

    def group_norm_affine(
        self, norm: nn.GroupNorm, x: torch.Tensor, geometry: LayerGeometry
    ) -> torch.Tensor:
        """GroupNorm statistics of the map `x` (this sparse call's input to `norm`, one of
        `statistics`) as a [2, B, C] (scale, shift) affine, in fp32 whatever the map's dtype
        (an fp16 shift loses precision when the mean is large). Exact, as the layer run
        densely on `x` would compute them: x differs from the cached map only in the active
        blocks of `geometry`, so their statistics are computed again and recorded, and the
        cached ones of every other block merged with them (kernels/group_norm.py)."""
        statistics = self.target(self.statistics[norm])
        affine_of = self.kernel(norm_kernels, "group_norm_affine", x)
        return affine_of(norm, x, statistics, geometry.blocks, geometry.active_blocks)

    def cached(self, key: str) -> torch.Tensor:
        return self.state.source.get(f"{self.name}.{key}", self.state.step)

    def target(self, key: str) -> torch.Tensor | StepView:
        """This step's map `key`, which a sparse call records: the cached one until the call
        writes into it."""
        return self.state.record[f"{self.name}.{key}"]

    def output_map(
        self, x: torch.Tensor | StepView | ChannelConcat, hw: tuple[int, int]
    ) -> torch.Tensor | StepView:
        """The map a sparse call over input `x` writes its output (of size `hw`) into: this
        step's recorded one, or the layer's own where it records none."""
        return self.target("out") if "out" in self.recorded else self.own_map(x, hw)

    def own_map(
        self, x: torch.Tensor | StepView | ChannelConcat, hw: tuple[int, int]
    ) -> torch.Tensor:
        """A map of the layer's own for its output (of size `hw`, for input `x`) where no
        step records one. Steps read it only where they write it, so one per shape serves
        every step; it starts as NaN, so a read anywhere else would show in the results."""
        key = (x.shape[0], hw, x.dtype, x.device)
        if key not in self._own_maps:
            shape = (x.shape[0], self.out_channels, *hw)
            nan = torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)
            self._own_maps[key] = nan.contiguous(memory_format=torch.channels_last)
        return self._own_maps[key]

    @property
    def out_channels(self) -> int:
        return self.inner.out_channels

    def save(self, key: str, value: torch.Tensor) -> None:
        if self.state.record is not None:
            self.state.record.put(f"{self.name}.{key}", self.state.step, value)

    def pasted(self, key: str, value: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """`value` (a map [B, C, H, W] or token rows [B, H * W, D]) in the active `region`
        [H, W], this step's cached `key` elsewhere."""
        if value.dim() == 3:
            region = region.reshape(-1, 1)
        return torch.where(region, value, self.cached(key))

    def recorded_within(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """Records `value`, a map computed inside this layer, under `key` in dense calls, and
        returns what the call goes on with: `value`, or in a sparse call run densely
        `value` pasted into the cached map first."""
        if self.region is not None:
            value = self.pasted(key, value, self.region)
        self.save(key, value)
        return value

    def record_input(self, module: nn.Module, key: str) -> None:
        """Records the input of `module` (a sub-layer) under `key` in dense calls, when `key`
        is among what the layer records (`recorded_within`)."""

        def hook(_, args):
            if key not in self.recorded:
                return None
            value = self.recorded_within(key, args[0])
            return None if value is args[0] else (value, *args[1:])

        module.register_forward_pre_hook(hook)


@torch.no_grad()
def time_embeddings(
    unet: nn.Module, timesteps: torch.Tensor, added: dict | None, batch: int
) -> torch.Tensor | None:
    """The time embeddings a UNet2DConditionModel hands its resnets at each of `timesteps`
    [S] (float), for a batch of `batch` with the added conditions `added` (SDXL's): [S, batch,
    D], made by the UNet's own embedding modules as its forward makes them, all steps in one
    call. None for a UNet whose embedding depends on more (class labels, a timestep
    condition, other added embeddings)."""
    config = unet.config
    if (
        unet.class_embedding is not None
        or config.time_cond_proj_dim is not None
        or config.addition_embed_type not in (None, "text_time")
    ):
        return None
    steps = timesteps.shape[0]
    like = torch.empty(steps * batch, device=unet.device, dtype=unet.dtype)
    flat = timesteps.to(unet.device, torch.float32).repeat_interleave(batch)
    emb = unet.time_embedding(unet.get_time_embed(sample=like, timestep=flat), None)
    if config.addition_embed_type is not None:
        repeated = {k: v.repeat(steps, *[1] * (v.dim() - 1)) for k, v in added.items()}
        emb = emb + unet.get_aug_embed(emb, None, repeated)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb.reshape(steps, batch, -1)


def _time_projection(block: ResnetBlock2D) -> tuple[torch.Tensor, torch.Tensor]:
    """time_emb_proj's weight, and its bias with conv1's folded in."""
    zero = block.time_emb_proj.weight.new_zeros(block.time_emb_proj.out_features)
    time, conv = block.time_emb_proj.bias, block.conv1.bias
    bias = (zero if time is None else time) + (zero if conv is None else conv)
    return block.time_emb_proj.weight, bias


class SparseResnet(SparseLayer):
    """ResnetBlock2D: GN -> SiLU -> conv1 (+temb) -> GN -> SiLU -> conv2, plus the shortcut."""

    def __init__(self, name: str, inner: ResnetBlock2D, state: StepState) -> None:
        super().__init__(name, inner, state)
        self.output_recorded = True
        """False where a sparse transformer alone reads the output, at active pixels only
        (`wrap_unet`): no step reads it from the cache, so it is not recorded, and sparse
        calls write it into a map of their own (`own_map`)."""
        self.time = state.shared.raw_time if inner.skip_time_act else state.shared.time
        if inner.time_emb_proj is not None:
            self.time.add(inner, lambda: [_time_projection(inner)])
        self.record_input(inner.norm2, "norm2_in")
        self.record_statistics(inner.norm1, "norm1_statistics")
        self.record_statistics(inner.norm2, "norm2_statistics")
        # After a skip connection, the kernels read the joined maps' parts.
        self.reads_parts = inner.conv_shortcut is not None

    @staticmethod
    def supports(module: nn.Module) -> bool:
        return (
            isinstance(module, ResnetBlock2D)
            and module.time_embedding_norm == "default"
            and module.upsample is None
            and module.downsample is None
            and isinstance(module.nonlinearity, nn.SiLU)
            and (module.conv_shortcut is None or module.conv_shortcut.kernel_size == (1, 1))
        )

    def dense(self, x, temb=None, *args, **kwargs):
        """ResnetBlock2D's forward, with the time projection (conv1's bias folded in) from
        the call's shared time linears, each SiLU applied by the norm before it, and no
        division by an output scale of 1."""
        block = self.inner
        h = block.norm1(x, silu=True)
        if block.time_emb_proj is None or temb is None:
            h = block.conv1(h)
        else:
            conv = block.conv1
            h = F.conv2d(h, conv.weight, None, conv.stride, conv.padding, conv.dilation)
            h = h + self.time.of(block, temb)[:, :, None, None]
        h = block.conv2(block.dropout(block.norm2(h, silu=True)))
        out = (x if block.conv_shortcut is None else block.conv_shortcut(x)) + h
        scale = block.output_scale_factor
        return out if scale == 1 else out / scale

    @property
    def recorded(self) -> tuple[str, ...]:
        return ("out", "norm2_in") if self.output_recorded else ("norm2_in",)

    def sparse(self, x, geometry, temb=None, *args, **kwargs):
        block, index = self.inner, geometry.index
        taps = self.state.plan.taps(block.conv1, geometry.hw, geometry.hw)
        bias = None
        if block.time_emb_proj is not None and temb is not None:
            # The time embedding adds a per-sample constant to conv1: it becomes the bias.
            bias = self.time.of(block, temb)
        affine = self.group_norm_affine(block.norm1, x, geometry)
        into = (self.target("norm2_in"), index)
        mid = self.conv_active(x, block.conv1, taps, affine, bias=bias, into=into)
        if block.conv_shortcut is None:
            skip, _ = self.gather(x, index)
        else:
            # A 1x1 conv: its K loop is short, and splitting it would only add traffic.
            at_index = self.state.plan.taps(block.conv_shortcut, geometry.hw, geometry.hw)
            skip = self.conv_active(x, block.conv_shortcut, at_index, split_k=1)
        affine = self.group_norm_affine(block.norm2, mid, geometry)
        scale = 1 / block.output_scale_factor
        into = (self.output_map(x, geometry.hw), index)
        return self.conv_active(mid, block.conv2, taps, affine, skip, scale, into=into)

    def macs(self, x, active, **kwargs):
        block, batch = self.inner, x.shape[0]
        total = _conv_macs(block.conv1, active) + _conv_macs(block.conv2, active)
        if block.conv_shortcut is not None:
            total += _conv_macs(block.conv_shortcut, active)
        return batch * total


def _plain_attention(attn: Attention) -> bool:
    """Whether `attn` is what `attention_over` computes: no norm, residual or rescaling
    around the attention itself."""
    return (
        attn.spatial_norm is None
        and attn.group_norm is None
        and attn.norm_cross is None
        and attn.norm_q is None
        and attn.norm_k is None
        and not attn.residual_connection
        and attn.rescale_output_factor == 1
    )


class ProjectedAttention:
    """An `Attention`'s processor: diffusers' attention, with the context's keys and values
    from `keys_values(context)` [B, L, 2 * inner] (one matmul, or none where the run computed
    them before), and no division by a rescale of 1."""

    def __init__(self, keys_values: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.keys_values = keys_values
        self.default = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None:
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        return attention_over(attn, hidden_states, self.keys_values(context))


class SparseTransformer(SparseLayer):
    """Transformer2DModel: GN -> proj_in -> transformer blocks -> proj_out, plus the input.

    Queries exist at active tokens only. Self-attention keys and values cover every token.
    By default they are projected from the block's full normalised input (the input of
    attn1, which the cache keeps: normalising is per token, so the cached rows stay right),
    fresh at active tokens and cached elsewhere. With `cached_keys_values` the cache keeps
    the keys and values themselves, and a sparse call projects only the active tokens',
    into the step's cached ones. With `active_only_attention`, they come from the active
    tokens alone.
    """

    def __init__(self, name: str, inner: Transformer2DModel, state: StepState) -> None:
        super().__init__(name, inner, state)
        self._token_taps: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.text = state.shared.text
        self.input_recorded = True
        """False where the resnet before it does not record its output (`wrap_unet`)."""
        self.record_statistics(inner.norm, "norm_statistics")
        for j, block in enumerate(inner.transformer_blocks):
            self.record_input(block.attn1, f"block{j}.attn1_in")
            self.text.add(block.attn2, lambda attn=block.attn2: key_value_parts(attn))
            # Dense calls too: self-attention's keys and values in one matmul, and the text's
            # from the run's shared text linears.
            keys_values = partial(self.keys_values, block.attn1, f"block{j}.attn1_kv")
            block.attn1.set_processor(ProjectedAttention(keys_values))
            block.attn2.set_processor(ProjectedAttention(partial(self.text.of, block.attn2)))

    @property
    def recorded(self) -> tuple[str, ...]:
        return ("out", *self._block_keys)

    @property
    def _block_keys(self) -> list[str]:
        """What the layer records for each block: attn1's input, or its keys and values."""
        kind = "attn1_kv" if self.state.config.cached_keys_values else "attn1_in"
        return [f"block{j}.{kind}" for j in range(len(self.inner.transformer_blocks))]

    @staticmethod
    def supports(module: nn.Module) -> bool:
        if not (isinstance(module, Transformer2DModel) and module.is_input_continuous):
            return False
        return all(
            block.norm_type == "layer_norm"
            and block.pos_embed is None
            and not block.only_cross_attention
            and block.attn2 is not None
            and _plain_attention(block.attn1)
            and _plain_attention(block.attn2)
            for block in module.transformer_blocks
        )

    def dense(self, x, encoder_hidden_states=None, *args, **kwargs):
        """Transformer2DModel's forward, keeping the map's layout: tokens [B, H * W, C] are
        a view of a channels_last map and the output is one, where diffusers copies the
        output to NCHW. With masks or other inputs, the module's own forward."""
        model = self.inner
        if args or any(value is not None for key, value in kwargs.items() if key != "return_dict"):
            kwargs = {**kwargs, "return_dict": False}
            return model(x, encoder_hidden_states, *args, **kwargs)[0]
        batch, _, height, width = x.shape
        h = model.norm(x)
        h = h if model.use_linear_projection else model.proj_in(h)
        tokens = h.permute(0, 2, 3, 1).reshape(batch, height * width, -1)
        tokens = model.proj_in(tokens) if model.use_linear_projection else tokens
        for block in model.transformer_blocks:
            tokens = block(tokens, encoder_hidden_states=encoder_hidden_states)
        tokens = model.proj_out(tokens) if model.use_linear_projection else tokens
        out = tokens.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        out = out if model.use_linear_projection else model.proj_out(out)
        return out + x

    def dense_pasted(self, x, geometry, *args, **kwargs):
        if self.state.config.active_only_attention:
            # Self-attention keys at active tokens only: the others are masked out.
            keep = geometry.region.reshape(1, -1).expand(x.shape[0], -1)
            kwargs = {**kwargs, "attention_mask": keep.to(x.dtype)}
        # An input not recorded holds no cached values outside the region to paste; the
        # sparse call reads none either, only the statistics recorded from them.
        norm = self.inner.norm
        norm.merged = None if self.input_recorded else geometry
        try:
            return super().dense_pasted(x, geometry, *args, **kwargs)
        finally:
            norm.merged = None

    def wrap(self, out, return_dict: bool = True, **kwargs):
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def sparse(self, x, geometry, encoder_hidden_states=None, *args, **kwargs):
        model, index = self.inner, geometry.index
        affine = self.group_norm_affine(model.norm, x, geometry)
        residual, normed = self.gather(x, index, affine)
        h = pointwise(model.proj_in, normed)
        for key, block in zip(self._block_keys, model.transformer_blocks, strict=True):
            h = self.self_attention(block, key, h, index)
            normed = self.layer_norm(block.norm2, h)
            text = self.text.of(block.attn2, encoder_hidden_states)
            h = self.attention(block.attn2, normed, text, residual=h)
            normed = self.layer_norm(block.norm3, h)
            h = self.feed_forward(block.ff, normed, h)
        # proj_out as a 1x1 conv over the tokens, scattering its rows + residual into the map.
        as_map = h.transpose(1, 2).unsqueeze(2)
        taps = self.token_taps(h.shape[1], h.device)
        return self.conv_active(
            as_map, model.proj_out, taps, residual=residual, into=(self.target("out"), index)
        )

    def keys_values(self, attn: Attention, key: str, context: torch.Tensor) -> torch.Tensor:
        """`attn`'s keys and values of `context` [B, L, D] in a dense call: one matmul,
        recorded under `key` when the layer records them (`recorded_within`)."""
        keys_values = F.linear(context, *self.packed(attn, key_value_projection))
        return self.recorded_within(key, keys_values) if key in self.recorded else keys_values

    def self_attention(
        self, block: nn.Module, key: str, tokens: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """tokens + attn1 of LayerNorm1(tokens), at the active tokens [B, P, D], recording
        what the layer records for it under `key` (see the class docstring)."""
        attn, config = block.attn1, self.state.config
        if config.cached_keys_values:
            queries = self.layer_norm(block.norm1, tokens)
            keys_values = self.linear(queries, attn, key_value_projection, into=(key, index))
            core = self.kernel(attention_kernels, "attention", queries)
            return self.attention(attn, queries, keys_values, tokens, core)
        # attn1's input map: cached, with the active rows set to the new ones.
        queries = self.layer_norm(block.norm1, tokens, into=(key, index))
        context = queries if config.active_only_attention else self.target(key)
        keys_values = self.linear(context, attn, key_value_projection)
        return self.attention(attn, queries, keys_values, tokens)

    def attention(
        self,
        attn: Attention,
        queries: torch.Tensor,
        keys_values: torch.Tensor | StepView,
        residual: torch.Tensor,
        core: Callable[..., torch.Tensor] = multi_head_attention,
    ) -> torch.Tensor:
        """residual + `attention_over(attn, queries, keys_values, core)`: the output
        projection adds the residual, so the sum is written once (and the LayerNorm after
        it reads one tensor, not two)."""
        values = attended_values(attn, queries, keys_values, core)
        return self.linear(values, attn.to_out[0], residual=residual)

    def token_taps(self, count: int, device: torch.device) -> torch.Tensor:
        """Taps [count, 1] that read token p of `count` tokens laid out as a 1 x count map.
        Made once per count (in a captured step's warm-up, as the plan's taps are)."""
        if (count, device) not in self._token_taps:
            self._token_taps[count, device] = torch.arange(count, device=device)[:, None]
        return self._token_taps[count, device]

    def feed_forward(self, ff: nn.Module, tokens: torch.Tensor, residual: torch.Tensor):
        """A diffusers FeedForward on tokens, + residual; with a GEGLU, as two fused linears:
        the projection with the GEGLU, the output projection with the residual."""
        activation, *rest = ff.net
        # Dropout is the identity: the engine runs the model in eval mode.
        layers = [m for m in rest if not isinstance(m, nn.Dropout)]
        if not isinstance(activation, GEGLU) or [type(m) for m in layers] != [nn.Linear]:
            return ff(tokens) + residual
        hidden = self.linear(tokens, activation.proj, geglu=True)
        return self.linear(hidden, layers[0], residual=residual)

    def macs(self, x, active, encoder_hidden_states=None, **kwargs):
        model, batch = self.inner, x.shape[0]
        tokens = x.shape[-2] * x.shape[-1]
        config = self.state.config
        keys = active if config.active_only_attention else tokens
        projected = active if config.cached_keys_values else keys
        context = encoder_hidden_states.shape[1]
        total = _linear_macs(model.proj_in, active) + _linear_macs(model.proj_out, active)
        for block in model.transformer_blocks:
            # attn2's keys and values count at every step, as diffusers' UNet computes them,
            # though every step reads them from its run (under 1% of its MACs).
            attentions = ((block.attn1, keys, projected), (block.attn2, context, context))
            for attn, kv, fresh in attentions:
                inner_dim = attn.to_q.out_features
                total += _linear_macs(attn.to_q, active) + _linear_macs(attn.to_out[0], active)
                total += _linear_macs(attn.to_k, fresh) + _linear_macs(attn.to_v, fresh)
                total += 2 * active * kv * inner_dim
            total += sum(
                _linear_macs(m, active) for m in block.ff.modules() if isinstance(m, nn.Linear)
            )
        return batch * total


class SparseConv(SparseLayer):
    """A layer whose work is one convolution: conv_in, Downsample2D, Upsample2D, or the
    output head (GroupNorm -> SiLU -> conv_out)."""

    def __init__(
        self,
        name: str,
        inner: nn.Module,
        conv: nn.Conv2d,
        state: StepState,
        norm: nn.GroupNorm | None = None,
        upsample: int = 1,
    ) -> None:
        super().__init__(name, inner, state)
        self.conv, self.norm, self.upsample = conv, norm, upsample
        if norm is not None:
            self.record_statistics(norm, "norm_statistics")

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def output_hw(self, x, *args, output_size=None, **kwargs):
        height, width = x.shape[-2:]
        stride = self.conv.stride[0]
        hw = (height * self.upsample // stride, width * self.upsample // stride)
        return hw if output_size is None or tuple(output_size) == hw else None

    def sparse(self, x, geometry, *args, **kwargs):
        taps = self.state.plan.taps(self.conv, tuple(x.shape[-2:]), geometry.hw, self.upsample)
        affine = None if self.norm is None else self.group_norm_affine(self.norm, x, geometry)
        into = (self.target("out"), geometry.index)
        return self.conv_active(x, self.conv, taps, affine, into=into)

    def macs(self, x, active, **kwargs):
        return x.shape[0] * _conv_macs(self.conv, active)


class _OutputHead(nn.Module):
    """A UNet's output head, GroupNorm -> SiLU -> conv_out, with the SiLU in the norm's own
    kernel."""

    def __init__(self, norm: MapGroupNorm, conv: nn.Conv2d) -> None:
        super().__init__()
        self.norm, self.conv = norm, conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x, silu=True))


def _wrap(name: str, module: nn.Module, state: StepState) -> SparseLayer | None:
    if SparseResnet.supports(module):
        return SparseResnet(name, module, state)
    if SparseTransformer.supports(module):
        return SparseTransformer(name, module, state)
    if isinstance(module, Downsample2D) and module.use_conv and module.norm is None:
        return SparseConv(name, module, module.conv, state)
    if (
        isinstance(module, Upsample2D)
        and module.use_conv
        and module.interpolate
        and not module.use_conv_transpose
        and module.norm is None
    ):
        conv = module.conv if module.name == "conv" else module.Conv2d_0
        return SparseConv(name, module, conv, state, upsample=2)
    return None


def weight_bytes_held(unet: nn.Module, layers: list[SparseLayer], shared: SharedLinears) -> int:
    """Bytes of the distinct storages behind `unet`'s parameters and behind the weights its
    `layers` packed and the `shared` linears stacked from them: the parameters' own bytes
    (and a few biases) while every pack and stack is a view of them."""
    tensors = list(unet.parameters())

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, tuple | list):
            for item in value:
                add(item)

    for layer in layers:
        add(list(layer._packed.values()))
    for linears in (shared.time, shared.raw_time, shared.text):
        add(linears.stacked)
    # Storages by identity: on the meta device every data pointer is 0.
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def sparse_reads(layers: list[SparseLayer], plan: SparsePlan, cache) -> frozenset[str]:
    """The names in `cache` a sparse step over `plan` reads (its layers' maps)."""
    return frozenset(name for layer in layers for name in layer.reads(plan, cache))


def wrap_unet(unet: nn.Module, state: StepState) -> list[SparseLayer]:
    """Replaces the layers the sparse pass handles, and every GroupNorm with a MapGroupNorm,
    in place; returns the wrappers."""
    _map_group_norms(unet, state)  # first: the wrappers hook the norms they record around
    wrappers: list[SparseLayer] = []
    for name, module in list(unet.named_modules()):
        if any(name.startswith(w.name + ".") for w in wrappers):
            continue
        wrapper = _wrap(name, module, state)
        if wrapper is not None:
            parent, _, attr = name.rpartition(".")
            setattr(unet.get_submodule(parent), attr, wrapper)
            wrappers.append(wrapper)
    conv_in = SparseConv("conv_in", unet.conv_in, unet.conv_in, state)
    if not isinstance(unet.conv_act, nn.SiLU):
        raise ValueError(f"unsupported UNet output activation {unet.conv_act}")
    head_modules = _OutputHead(unet.conv_norm_out, unet.conv_out)
    head = SparseConv("conv_out", head_modules, unet.conv_out, state, norm=unet.conv_norm_out)
    unet.conv_in, unet.conv_out = conv_in, head
    unet.conv_norm_out, unet.conv_act = nn.Identity(), nn.Identity()
    _unrecorded_outputs(unet, state.config)
    return [*wrappers, conv_in, head]


def _unrecorded_outputs(unet: nn.Module, config: SparseConfig) -> None:
    """Marks the resnets whose output no step reads from the cache. In diffusers'
    cross-attention blocks resnets[i] feeds attentions[i] alone; a sparse transformer reads
    its input at active pixels only, and the statistics of whole blocks of them, when every
    active output block is made of whole statistics blocks."""
    if config.block_size % norm_kernels.BLOCK_SIDE:
        return
    blocks = (CrossAttnDownBlock2D, CrossAttnUpBlock2D, UNetMidBlock2DCrossAttn)
    for block in unet.modules():
        if isinstance(block, blocks):
            for resnet, attention in zip(block.resnets, block.attentions, strict=False):
                if isinstance(resnet, SparseResnet) and isinstance(attention, SparseTransformer):
                    resnet.output_recorded = attention.input_recorded = False
