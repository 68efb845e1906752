"""Kernel launches, bytes moved and MACs of one dense and one sparse step of a full-size
UNet, on no GPU.

The UNet is built on the meta device (shapes, no storage) with the Triton kernels selected.
A recording step runs first, then sparse steps over centred square masks, as the engine
captures a session's edit: a dense step records its maps where it makes them (`StepSlots`),
then files them into the run's cache; a sparse step records in place into the maps of the
version it edits (`StepMaps`), runs with the step index in device memory, and copies a
sparse layer's output out of the cache only where the UNet's own ops read it
(`StaticMapReads`). (An edit of a fork, which shares its cache, also copies every map it
reads into a new cache: `StepMaps.fill`.) Triton launches are recorded, not run, with grids
sized for an H100 (132 SMs); every other op is counted by a dispatch mode. Maps are laid
out as on a GPU: a convolution with channels_last weights returns channels_last maps (the
meta device would return NCHW), so the copies that layout causes (PyTorch's GroupNorm makes
its input contiguous first) or saves are counted.

Bytes moved count what each launched op reads plus what it writes, from tensor sizes (no
profiler, no caches modelled):
- a PyTorch op reads every tensor argument it does not only write, and writes its outputs
  (an in-place op's `self` counts as read and written, a copy's destination as written);
  a tensor counts its distinct elements (an expanded dimension once); ops that index a
  tensor (`index`, `index_select`, ...) read as many elements as they return, and
  `index_copy_`/`index_put_` write as many as they are given; attention counts its
  queries, keys, values and output, as a fused kernel moves them;
- a Triton kernel counts what it addresses: the active rows it gathers or scatters (not the
  whole map, and a convolution's halo taps not again), whole maps it
  reduces or copies, whole weights once, and the partial sums of a split-K convolution
  written and read.

The weights the engine holds after the steps are counted too: the UNet's parameters, and
any packed or stacked copy of them its layers made (the kernels read weights where the
model holds them, and stacks of linears hold the layers' weights as views).

A CUDA graph removes launch overhead from the host, but each kernel still costs a few
microseconds on the GPU, so the count is a floor on the sparse step's time that no MAC
saving removes. With `--compile`, every distinct Triton launch is also compiled for sm_90
and its registers, spills and shared memory are reported.

    python -m fisedit.bench.step_launches [--models sd15-512] [--compile] [--out FILE]
"""

import argparse
import json
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fisedit.bench.edit_bench import square_mask
from fisedit.engine.cache import ActivationCache, StepMaps, StepSlots
from fisedit.engine.config import SparseConfig
from fisedit.engine.kernels.aot import compile_launches
from fisedit.engine.kernels.launch import Launch, recording_launches
from fisedit.engine.layers import (
    MacCount,
    StepState,
    sparse_reads,
    time_embeddings,
    weight_bytes_held,
    wrap_unet,
)
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
    triton_bytes: int
    other_bytes: int
    weight_bytes: int
    """The UNet's weights: every step reads each at least once (part of the bytes moved)."""
    weight_bytes_held: int
    """Memory the engine holds for weights after the steps: the UNet's, and any packed or
    stacked copy of them the steps made (`weight_bytes_held`)."""
    cache_bytes_per_step: int
    """What the dense step records: a session's cache per denoise step."""
    mac_share_bytes: int
    """The weights plus the step's MAC fraction of the dense step's other bytes: what it
    would move if its activation traffic scaled with its MACs (the dense step: its bytes).
    A reference point, not a floor: attention's MACs grow faster than its bytes."""
    bytes_by_op: dict[str, int]
    """The bytes moved by each op and Triton kernel (weights included), most first; the
    partial sums of split-K convolutions apart, under SPLIT_K_PARTIALS."""

    @property
    def launches(self) -> int:
        return self.triton_launches + self.other_launches

    @property
    def bytes_moved(self) -> int:
        return self.triton_bytes + self.other_bytes


def _nbytes(value) -> int:
    """Bytes of the distinct elements of a tensor, or of a list of them (else 0)."""
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    if not isinstance(value, torch.Tensor):
        return 0
    elements = 1
    for size, stride in zip(value.shape, value.stride(), strict=True):
        elements *= size if stride else 1
    return elements * value.element_size()


def _channels_last(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)


def _op_bytes(func, args, kwargs, out) -> int:
    """Bytes an op reads and writes, by the rules in the module docstring."""
    name = func.overloadpacket.__name__
    schema = func._schema
    bound = {**dict(zip((a.name for a in schema.arguments), args, strict=False)), **kwargs}
    written_by_return = not any(r.alias_info for r in schema.returns)
    moved = _nbytes(out) if written_by_return else 0
    for argument in schema.arguments:
        value = bound.get(argument.name)
        write = argument.alias_info is not None and argument.alias_info.is_write
        if name in _INDEXED_READS and argument.name == "self":
            moved += _nbytes(out)
        elif name in _INDEXED_WRITES and argument.name == "self":
            moved += 2 * _nbytes(bound.get("source", bound.get("values")))
        elif write:
            moved += _nbytes(value) * (1 if argument.is_out or name in _WRITE_ONLY else 2)
        else:
            moved += _nbytes(value)
    return moved


# What one launch of CUDA's multi-tensor apply covers for a foreach op over two tensor
# lists (PyTorch 2.x): up to 64 tensors, and up to 320 blocks of 64 Ki elements.
_FOREACH_TENSORS, _FOREACH_BLOCKS, _FOREACH_CHUNK = 64, 320, 65536


def _foreach_launches(tensors: list[torch.Tensor]) -> int:
    """Launches a foreach op over `tensors` makes on its fast path (tensors of one dtype and
    layout): a launch is full at either limit, and a tensor may span launches."""
    launches = count = blocks = 0
    for tensor in tensors:
        count += 1
        chunks = max(1, -(-tensor.numel() // _FOREACH_CHUNK))
        for chunk in range(chunks):
            blocks += 1
            last = chunk == chunks - 1
            if blocks == _FOREACH_BLOCKS or (last and count == _FOREACH_TENSORS):
                launches, blocks = launches + 1, 0
                count = 0 if last else 1
    return launches + (blocks > 0)


# Ops that read their `self` only where an index points, or write it only there.
_INDEXED_READS = {"index", "index_select", "gather", "embedding"}
_INDEXED_WRITES = {"index_copy_", "index_put_", "index_copy", "index_put"}
# In-place ops that write `self` without reading it.
_WRITE_ONLY = {"copy_", "_foreach_copy_", "fill_", "zero_"}


class _OpCounter(TorchDispatchMode):
    """Counts the ops that launch kernels, and the bytes they move. Attention counts once:
    on the meta device SDPA decomposes into its math ops, where a GPU runs one fused
    kernel (see `_AttentionAsOneOp`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        """Bytes moved, by op."""
        self.inside_attention = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name == "convolution" and any(_channels_last(t) for t in args[:2]):
            # On the meta device a convolution returns NCHW; cuDNN returns channels_last
            # where its input or weight is (as the model's weights are), and so do the ops
            # after it: the maps' layout decides which reshapes and records copy.
            out = out.contiguous(memory_format=torch.channels_last)
        if not (self.inside_attention or func.is_view or name in _NO_KERNEL):
            self.ops[name] += _foreach_launches(args[0]) if name.startswith("_foreach") else 1
            self.bytes[name] += _op_bytes(func, args, kwargs, out)
        return out


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
            out = func(*args, **(kwargs or {}))
            # A fused kernel writes its output [B, H, L, d] with the memory layout of its
            # queries, [B, L, H, d] here, so merging the heads after it is a view, not the
            # copy it would be after the decomposition.
            out = out.transpose(1, 2).contiguous().transpose(1, 2)
        finally:
            self.counter.inside_attention = False
        self.counter.bytes["scaled_dot_product_attention"] += _nbytes(args[:3]) + _nbytes(out)
        return out


def _bound(launch: Launch) -> dict:
    kernel = launch.kernel
    return {**dict(zip(kernel.arg_names, launch.args, strict=False)), **launch.kwargs}


def _launch_bytes(launch: Launch) -> int:
    """Bytes a recorded Triton launch reads and writes, by the rules in the module docstring."""
    return _TRITON_BYTES[launch.kernel.fn.__name__](_bound(launch), launch.grid)


SPLIT_K_PARTIALS = "split-K partial sums"


def _triton_bytes_by_part(launches: list[Launch]) -> Counter[str]:
    """The launches' bytes by kernel, with the partial sums that split-K convolutions
    write and their finalising launches read apart, under SPLIT_K_PARTIALS."""
    parts: Counter[str] = Counter()
    for launch in launches:
        name, moved, bound = launch.kernel.fn.__name__, _launch_bytes(launch), _bound(launch)
        if name == "_sparse_conv_kernel" and (bound["PARTIAL"] or bound["FINALISE"]):
            partials = _partial_bytes(bound)
            parts[SPLIT_K_PARTIALS] += partials
            moved -= partials
        parts[name] += moved
    return parts


def _element(bound: dict, name: str) -> int:
    return bound[name].element_size()


def _partial_bytes(bound: dict) -> int:
    """The partial sums a split-K convolution writes (and its finalising launch reads)."""
    return bound["n_splits"] * bound["M"] * bound["N"] * _element(bound, "part_ptr")


def _conv_bytes(bound: dict, grid) -> int:
    rows, cols = bound["M"], bound["N"]
    partials = _partial_bytes(bound)
    if bound["FINALISE"]:
        moved = partials
    else:
        moved = rows * bound["C"] * _element(bound, "x_ptr") + _nbytes(bound["w_ptr"])
        moved += _nbytes(bound["affine_ptr"]) if bound["HAS_AFFINE"] else 0
        if bound["PARTIAL"]:
            return moved + partials
    moved += rows * cols * _element(bound, "out_ptr")
    moved += rows * cols * _element(bound, "res_ptr") if bound["HAS_RESIDUAL"] else 0
    return moved + (_nbytes(bound["bias_ptr"]) if bound["HAS_BIAS"] else 0)


def _gather_tokens_bytes(bound: dict, grid) -> int:
    tokens = grid[2] * bound["P"] * bound["C"] * _element(bound, "x_ptr")
    if bound["HAS_AFFINE"]:
        return 3 * tokens + _nbytes(bound["affine_ptr"])
    return 2 * tokens


def _layernorm_rows_bytes(bound: dict, grid) -> int:
    elements = bound["P"] * grid[1] * bound["D"]
    moved = elements * (_element(bound, "rows_ptr") + _element(bound, "out_ptr"))
    moved += elements * _element(bound, "map_ptr") if bound["SCATTER"] else 0
    moved += _nbytes(bound["weight_ptr"]) if bound["HAS_WEIGHT"] else 0
    return moved + (_nbytes(bound["bias_ptr"]) if bound["HAS_BIAS"] else 0)


def _group_norm_bytes(bound: dict, grid) -> int:
    programs, block_pixels = grid[0] * grid[1], bound["SIDE"] ** 2
    blocks = -(-bound["H"] // bound["SIDE"]) * -(-bound["W"] // bound["SIDE"])
    if bound["LISTED"]:
        # Each program: the listed blocks' pixels and ids, every block's flag, the cached
        # statistics of the others (counting padding as blocks, an upper bound).
        computed = bound["n_listed"]
        per_program = computed * (block_pixels * bound["group_channels"] * _element(bound, "x_ptr"))
        per_program += computed * _element(bound, "blocks_ptr") + blocks * _element(
            bound, "active_ptr"
        )
        per_program += (blocks - computed) * 2 * _element(bound, "stats_ptr")
    else:
        computed = blocks
        per_program = bound["H"] * bound["W"] * bound["group_channels"] * _element(bound, "x_ptr")
    if bound["WRITE_STATS"]:
        per_program += computed * 2 * _element(bound, "stats_ptr")
    return programs * per_program + _nbytes(bound["out_ptr"])


def _group_norm_apply_bytes(bound: dict, grid) -> int:
    elements = grid[2] * bound["HW"] * bound["C"]
    moved = elements * (_element(bound, "x_ptr") + _element(bound, "out_ptr"))
    return moved + _nbytes(bound["affine_ptr"])


def _attention_bytes(bound: dict, grid) -> int:
    # As a fused attention: queries, keys, values and output once each.
    queries = bound["P"] * bound["inner"] * bound["q_ptr"].element_size()
    keys_values = bound["L"] * 2 * bound["inner"] * _element(bound, "kv_ptr")
    return grid[1] // bound["heads"] * (2 * queries + keys_values)


def _linear_bytes(bound: dict, grid) -> int:
    rows, outputs = bound["M"], bound["N"] // (2 if bound["GEGLU"] else 1)
    moved = rows * bound["K"] * _element(bound, "x_ptr") + _nbytes(bound["w_ptr"])
    moved += rows * outputs * _element(bound, "out_ptr")
    moved += rows * outputs * _element(bound, "res_ptr") if bound["HAS_RESIDUAL"] else 0
    return moved + (_nbytes(bound["bias_ptr"]) if bound["HAS_BIAS"] else 0)


_TRITON_BYTES = {
    "_attention_kernel": _attention_bytes,
    "_linear_kernel": _linear_bytes,
    "_sparse_conv_kernel": _conv_bytes,
    "_gather_tokens_affine_kernel": _gather_tokens_bytes,
    "_layernorm_rows_kernel": _layernorm_rows_bytes,
    "_group_norm_affine_kernel": _group_norm_bytes,
    "_group_norm_apply_kernel": _group_norm_apply_bytes,
}


class MetaUNet:
    """A full-size UNet on the meta device, wrapped for sparse steps, CFG batch 2, fp16,
    with `sparse`'s options and the Triton kernels."""

    def __init__(
        self,
        shape: UNetShape,
        dtype: torch.dtype = torch.float16,
        sparse: SparseConfig | None = None,
    ) -> None:
        self.shape = shape
        sparse = (sparse or SparseConfig()).model_copy(update={"kernels": "triton"})
        self.state = StepState(config=sparse)
        self.unet = shape.build("meta", dtype)
        self.layers = wrap_unet(self.unet, self.state)
        self.unet.to(memory_format=torch.channels_last)
        side, batch = shape.latent_side, 2
        self.sample = torch.empty(batch, 4, side, side, device="meta", dtype=dtype)
        self.context = torch.empty(
            batch, shape.text_tokens, shape.context_dim, device="meta", dtype=dtype
        )
        self.added = shape.added_conditions(batch, "meta", dtype)
        self.cache = ActivationCache(steps=1, channels_last=True)
        """What the dense step records; sparse steps read it."""

    @property
    def weight_bytes_held(self) -> int:
        """The engine's memory for weights so far (`weight_bytes_held`)."""
        return weight_bytes_held(self.unet, self.layers, self.state.shared)

    def step(self, plan: SparsePlan | None) -> tuple[MacCount, _OpCounter, list[Launch]]:
        """One UNet call as the engine captures it, and the filing of what it recorded: dense
        without a plan, else sparse over `plan` reading the dense step's record."""
        state = self.state
        state.step = torch.tensor(0, device="meta")
        state.plan, state.source, state.macs = (
            plan,
            None if plan is None else self.cache,
            MacCount(),
        )
        if plan is None:
            state.record = StepSlots(channels_last=True)
        else:
            edited = self.cache.edited_in_place()
            reads = sparse_reads(self.layers, plan, self.cache)
            state.record = StepMaps(edited, self.cache, state.step, reads)
        state.shared.forget()
        # A run computes its text keys and values and its resnets' time projections once,
        # before its steps; each step loads its row of the projections.
        state.shared.text.given(self.context, state.shared.text.compute(self.context))
        timesteps = torch.full((self.cache.steps,), 500.0, device="meta")
        run_projections = state.shared.time_projections(
            time_embeddings(self.unet, timesteps, self.added, batch=2)
        )
        projections = torch.empty_like(run_projections[0])
        state.shared.given_time_projections(projections)
        counter = _OpCounter()
        with recording_launches(H100_SMS) as launches, _AttentionAsOneOp(counter), counter:
            projections.copy_(run_projections[0])
            if plan is not None:
                state.record.fill(self.cache, 0)
            with state.record.reading() if plan is not None else nullcontext():
                out = self.unet(
                    self.sample,
                    torch.tensor(500, device="meta"),
                    encoder_hidden_states=self.context,
                    added_cond_kwargs=self.added,
                ).sample
                if plan is not None:
                    state.record.filled(out)
            if plan is None:
                self.cache.put_step(0, state.record.tensors)
        return state.macs, counter, launches


def measure(
    shape: UNetShape, sparse: SparseConfig | None = None
) -> tuple[list[StepLaunches], list[Launch]]:
    """The dense step and sparse steps at each mask ratio, with `sparse`'s options; also
    every Triton launch made."""
    unet = MetaUNet(shape, sparse=sparse)
    weights = sum(p.numel() * p.element_size() for p in unet.unet.parameters())
    unet.step(None)  # makes what a graph capture's warm-up makes once (a step index of 0)
    macs, counter, launches = unet.step(None)
    rows = [_row(shape, "dense", None, macs, counter, launches, weights, unet)]
    activations = rows[0].bytes_moved - weights
    every_launch = list(launches)
    for ratio in MASK_RATIOS:
        plan = SparsePlan(square_mask(shape.latent_side, ratio), unet.state.config, "meta")
        unet.step(plan)  # builds the plan's indices, as a graph capture's warm-up does
        macs, counter, launches = unet.step(plan)
        row = _row(shape, "sparse", ratio, macs, counter, launches, weights, unet, activations)
        rows.append(row)
        every_launch += launches
    return rows, every_launch


def _row(
    shape, step, ratio, macs, counter, launches, weights, unet, activations=None
) -> StepLaunches:
    ops, bytes_by_op = counter.ops, counter.bytes + _triton_bytes_by_part(launches)
    triton_bytes = sum(_launch_bytes(launch) for launch in launches)
    other_bytes = counter.bytes.total()
    if activations is None:
        mac_share = triton_bytes + other_bytes
    else:
        mac_share = weights + round(macs.fraction * activations)
    return StepLaunches(
        model=shape.name,
        step=step,
        mask_ratio=ratio,
        mac_fraction=macs.fraction,
        triton_launches=len(launches),
        other_launches=sum(ops.values()),
        other_ops=dict(ops.most_common()),
        triton_bytes=triton_bytes,
        other_bytes=other_bytes,
        weight_bytes=weights,
        weight_bytes_held=unet.weight_bytes_held,
        cache_bytes_per_step=unet.cache.nbytes,
        mac_share_bytes=mac_share,
        bytes_by_op=dict(bytes_by_op.most_common()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd15-512", help="comma-separated UNet shapes")
    parser.add_argument("--compile", action="store_true", help="also compile for sm_90")
    parser.add_argument(
        "--cached-keys-values",
        action="store_true",
        help="with SparseConfig(cached_keys_values=True): self-attention's keys and values cached",
    )
    parser.add_argument(
        "--split-k-partials",
        type=float,
        default=SparseConfig.model_fields["split_k_partials"].default,
        metavar="FRACTION",
        help="SparseConfig.split_k_partials: most bytes a conv's split-K partial sums may "
        "move, as a fraction of its weights' (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    sparse = SparseConfig(
        cached_keys_values=args.cached_keys_values, split_k_partials=args.split_k_partials
    )
    payload: dict = {
        "device": "meta (no GPU): launches and bytes counted, "
        + ("kernels compiled for sm_90, " if args.compile else "")
        + "not timed",
        "sms": H100_SMS,
        "sparse_config": sparse.model_dump(),
        "steps": [],
        "kernels": [],
    }
    for name in args.models.split(","):
        rows, launches = measure(UNET_SHAPES[name], sparse)
        for row in rows:
            ratio = "-" if row.mask_ratio is None else f"{row.mask_ratio:.2f}"
            print(
                f"{row.model:10} {row.step:6} mask {ratio:4}  MACs {row.mac_fraction:5.3f}  "
                f"launches {row.launches:5} (Triton {row.triton_launches}, "
                f"other {row.other_launches})  bytes {row.bytes_moved / 2**30:6.3f} GiB "
                f"(Triton {row.triton_bytes / 2**30:.3f}, other {row.other_bytes / 2**30:.3f}; "
                f"weights {row.weight_bytes / 2**30:.3f}, held "
                f"{row.weight_bytes_held / 2**30:.3f}; MAC share "
                f"{row.mac_share_bytes / 2**30:.3f}; cache {row.cache_bytes_per_step / 2**20:.0f} "
                "MiB/step)"
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
