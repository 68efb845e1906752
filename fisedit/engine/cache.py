"""Per-step tensors recorded while denoising: the state the next edit reuses."""

import contextlib

import torch
import torch.utils._pytree
from torch.overrides import TorchFunctionMode

from fisedit.engine.kernels.launch import ChannelConcat, StepView

RUN_STATE = ("latents", "solver_history")
"""What the denoise loop records after each UNet call; the UNet's layers record the rest."""


def _nhwc(value: torch.Tensor, channels_last: bool) -> bool:
    """Whether `value` is stored channels_last: a feature map [B, C, H, W] that arrives so, or
    any one when `channels_last` (kernels reading the cache then gather whole channel
    vectors, whatever layout the layer that made the map returned)."""
    return value.dim() == 4 and (
        channels_last or value.is_contiguous(memory_format=torch.channels_last)
    )


def _steps_like(value: torch.Tensor, steps: int, channels_last: bool) -> torch.Tensor:
    """An empty [steps, *value.shape] buffer to record `value` in at each step."""
    if _nhwc(value, channels_last):
        batch, *map_shape = value.shape
        buffer = torch.empty(
            (steps * batch, *map_shape),
            dtype=value.dtype,
            device=value.device,
            memory_format=torch.channels_last,
        )
        return buffer.view(steps, *value.shape)
    return value.new_empty((steps, *value.shape))


def _maps_in_layout(maps: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Per-step feature maps [steps, B, C, H, W] laid out NCHW or NHWC within each step."""
    if channels_last:
        return maps.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return maps.contiguous()


class ActivationCache:
    """One dense [steps, ...] tensor per recorded name, indexed by denoise step.

    With `channels_last`, every feature map recorded is stored NHWC within each step (the
    copy into the cache converts it); otherwise maps keep the layout they arrive in."""

    def __init__(
        self,
        steps: int,
        tensors: dict[str, torch.Tensor] | None = None,
        channels_last: bool = False,
        graphs: dict | None = None,
    ) -> None:
        self.steps = steps
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self.channels_last = channels_last
        self.host_resident = False
        """Whether edits read this cache through a HostPrefetcher (see `to_host`)."""
        self.read_only = False
        """Whether an edit must leave this cache as it is (several sessions share it)."""
        self.graphs: dict = {} if graphs is None else graphs
        """Captured sparse steps that record into these maps, by plan signature: they live
        as long as the maps, and edits that record into the same maps replay them."""

    def edited_in_place(self) -> "ActivationCache":
        """A cache for an edit of this one that records into the same maps (each step's
        maps are read before that step writes them) and its own run state: this cache is
        the edit's afterwards, and no longer the previous version's."""
        maps = {name: t for name, t in self.tensors.items() if name not in RUN_STATE}
        return ActivationCache(self.steps, maps, self.channels_last, self.graphs)

    def put(self, name: str, step: int, value: torch.Tensor) -> None:
        buffer = self.tensors.get(name)
        if buffer is None:
            buffer = _steps_like(value, self.steps, self.channels_last)
            self.tensors[name] = buffer
        buffer[step].copy_(value)

    def put_step(self, step: int, values: dict[str, torch.Tensor]) -> None:
        """Records every tensor of `values` at `step`, in one batched copy."""
        for name, value in values.items():
            if name not in self.tensors:
                self.tensors[name] = _steps_like(value, self.steps, self.channels_last)
        targets = [self.tensors[name][step] for name in values]
        torch._foreach_copy_(targets, list(values.values()))

    def get(self, name: str, step: int | torch.Tensor) -> torch.Tensor:
        """The tensor recorded under `name` at `step`: a view, or with a 0-d index tensor on
        the cache's device (a step held in device memory), a copy."""
        try:
            buffer = self.tensors[name]
        except KeyError:
            raise KeyError(f"nothing recorded under {name!r}") from None
        if isinstance(step, torch.Tensor):
            # Indexing (unlike index_select) keeps a channels_last map channels_last.
            return buffer[step.reshape(1)][0]
        return buffer[step]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device if self.tensors else torch.device("cpu")

    def to(
        self, device: torch.device | str, channels_last: bool | None = None
    ) -> "ActivationCache":
        """A copy on `device` (also on the cache's own device: edits may write the original
        in place); host copies of a GPU cache are pinned for fast transfers.

        Feature maps keep their memory layout, or take the one `channels_last` names.
        """
        device = torch.device(device)
        pin = device.type == "cpu" and torch.cuda.is_available()
        moved = {}
        for name, tensor in self.tensors.items():
            tensor = tensor.to(device, copy=not pin)  # pin_memory copies
            if channels_last is not None and tensor.dim() == 5:
                tensor = _maps_in_layout(tensor, channels_last)
            moved[name] = tensor.pin_memory() if pin else tensor
        keep = self.channels_last if channels_last is None else channels_last
        return ActivationCache(self.steps, moved, keep)

    def to_host(self) -> "ActivationCache":
        """A copy in host memory (pinned where a GPU is) that edits read through a
        HostPrefetcher, on any device (on a CPU, too, so that path runs there)."""
        cache = self.to("cpu")
        cache.host_resident = True
        return cache

    def reader(self, device: torch.device | str) -> "ActivationCache | HostPrefetcher":
        """Something with `get(name, step)` that returns tensors on `device`."""
        device = torch.device(device)
        if self.host_resident or (device.type == "cuda" and self.device.type != "cuda"):
            return HostPrefetcher(self, device)
        return self


class StepSlots:
    """One step's recorded tensors, where a UNet call left them, whatever step it runs
    (`ActivationCache.put_step` files them under the step). Feature maps are laid out as in
    an `ActivationCache` with the same `channels_last`.

    A tensor in that layout is held as the call made it, not copied: in a captured call it
    lives in the graph's memory, which every replay writes again. One in another layout (a
    map a layer returns NCHW) is copied into a static slot of the cache's layout."""

    def __init__(self, channels_last: bool = False) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.channels_last = channels_last

    def put(self, name: str, step: int | torch.Tensor, value: torch.Tensor) -> None:
        nhwc = _nhwc(value, self.channels_last)
        layout = torch.channels_last if nhwc else torch.contiguous_format
        if value.is_contiguous(memory_format=layout):
            self.tensors[name] = value
            return
        slot = self.tensors.get(name)
        if slot is None:
            self.tensors[name] = value.clone(memory_format=layout)
        else:
            slot.copy_(value)


class StepMaps:
    """The maps a sparse UNet call records at one step (those its layers recorded in the
    previous version), where it reads and writes them.

    Each map the call reads (`reads`: those of layers whose resolution runs sparse) starts as
    the previous version's, and the call writes its region in place; layers that run dense
    write their whole maps. So the run's cache ends up holding the new maps without further
    copies; an edit that does not record in the previous version's own memory first copies
    them over (`fill`). With a Python step every map is a view of the run's cache at the
    step. With a step index in device memory (a captured graph replays one call for every
    step) a view cannot follow the step, so every map is a StepView of the cache, which
    kernels address at the index; the UNet's own ops, which pass sparse layers' outputs
    (`<layer>.out` among `reads`) on, get a static map for each, which the call fills from
    the cache only where one of those ops reads it (`reading`).
    """

    def __init__(
        self,
        record: ActivationCache,
        source: "ActivationCache | HostPrefetcher",
        step: int | torch.Tensor,
        reads: frozenset[str],
    ) -> None:
        self.record, self.reads = record, reads
        self.maps: dict[str, torch.Tensor | StepView] = {}
        self.statics: dict[str, torch.Tensor] = {}
        """Each sparse layer's output as the UNet's ops get it, with a step in device memory."""
        for name in source.tensors:
            if name in RUN_STATE:
                continue
            buffer = record.tensors.get(name)
            if buffer is None:
                # The previous version's layout, on the device `source` reads it to.
                buffer = torch.empty_like(source.tensors[name], device=source.device)
                record.tensors[name] = buffer
            if not isinstance(step, torch.Tensor):
                self.maps[name] = buffer[step]
                continue
            self.maps[name] = StepView(buffer, step.reshape(1))
            if name.endswith(".out") and name in reads:
                self.statics[name] = torch.empty_like(buffer[0])
        self._behind = {id(static): name for name, static in self.statics.items()}
        # By id, holding each join so that its id is not reused within the call.
        self._joins: dict[int, tuple[torch.Tensor, ChannelConcat]] = {}
        self._filled: set[int] = set()

    def __getitem__(self, name: str) -> torch.Tensor | StepView:
        return self.maps[name]

    def static(self, name: str) -> torch.Tensor | None:
        """The static map the UNet's ops get for map `name` (None: the map itself)."""
        return self.statics.get(name)

    def is_static(self, value: object) -> bool:
        """Whether `value` is a static map, or a join of maps (`joined`), filled when read."""
        return id(value) in self._behind or id(value) in self._joins

    def behind(self, value: torch.Tensor) -> torch.Tensor | StepView | ChannelConcat:
        """What kernels read for `value`: the map behind a static map, the parts of a join,
        else `value` itself."""
        if id(value) in self._joins:
            return self._joins[id(value)][1]
        name = self._behind.get(id(value))
        return value if name is None else self.maps[name]

    def joined(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """torch.cat([first, second], dim=1) of maps, either of them static, as a static map:
        filled when read (`filled`); kernels read its parts (`behind`)."""
        batch, channels, *hw = first.shape
        layout = torch.channels_last if _nhwc(first, False) else torch.contiguous_format
        out = torch.empty(
            (batch, channels + second.shape[1], *hw),
            dtype=first.dtype,
            device=first.device,
            memory_format=layout,
        )
        self._joins[id(out)] = (out, ChannelConcat(self.behind(first), self.behind(second)))
        return out

    def filled(self, value: torch.Tensor) -> torch.Tensor:
        """`value`, set first (once per call) to what it stands for when it is a static map:
        its map in the cache, or the parts of a join."""
        if not self.is_static(value) or id(value) in self._filled:
            return value
        self._filled.add(id(value))
        behind = self.behind(value)
        parts = [behind] if isinstance(behind, StepView) else [behind.first, behind.second]
        start = 0
        for part in parts:
            target = value[:, start : start + part.shape[1]]
            start += part.shape[1]
            if isinstance(part, StepView):
                # Indexing at the step straight into the target: one read, one write.
                torch.index_select(part.buffer, 0, part.step, out=target.unsqueeze(0))
            else:
                target.copy_(part)
        return value

    def start_call(self) -> None:
        """Forgets the last call's joins and fills: static maps are filled again."""
        self._joins.clear()
        self._filled.clear()

    def reading(self) -> "StaticMapReads | contextlib.nullcontext":
        """Where the UNet's ops read static maps, filled when read (see `StaticMapReads`)."""
        return StaticMapReads(self) if self.statics else contextlib.nullcontext()

    def fill(self, source: "ActivationCache | HostPrefetcher", step: int) -> None:
        """Sets every map the call reads to `source`'s at `step`, where the run's cache is not
        `source`'s own memory (recording in place, it is)."""
        targets, values = [], []
        for name in self.reads:
            if self.record.tensors[name] is not source.tensors.get(name):
                targets.append(self.record.tensors[name][step])
                values.append(source.get(name, step))
        if targets:
            torch._foreach_copy_(targets, values)

    def put(self, name: str, step: int | torch.Tensor, value: torch.Tensor) -> None:
        """Records `value` as this step's map `name`, unless the call wrote it in place."""
        target = self.maps[name]
        if value is target:
            return
        if isinstance(target, StepView):
            target.write(value)
        else:
            target.copy_(value)


# Tensor functions that read no elements: a static map stays unfilled through them.
_METADATA = {"shape", "dtype", "device", "size", "dim", "ndim", "stride", "numel", "layout"}
_METADATA |= {"is_contiguous", "element_size", "requires_grad", "is_cuda", "__len__"}


class StaticMapReads(TorchFunctionMode):
    """Fills a StepMaps' static maps when the UNet's ops read them in a call, from the
    cache at the step; a concatenation of two maps along channels (a skip connection) is a
    static map too, whose parts the resnet after it reads. Sparse layers read what is behind
    a static map themselves (`StepMaps.behind`), so a map only they read is never copied."""

    def __init__(self, maps: StepMaps) -> None:
        super().__init__()
        self.maps = maps

    def __enter__(self):
        self.maps.start_call()
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if name in _METADATA:
            return func(*args, **kwargs)
        if func is torch.cat and _joins_two_maps(args, kwargs, self.maps):
            return self.maps.joined(*args[0])
        for value in torch.utils._pytree.tree_leaves((args, kwargs)):
            self.maps.filled(value)
        return func(*args, **kwargs)


def _joins_two_maps(args: tuple, kwargs: dict, maps: StepMaps) -> bool:
    """Whether torch.cat's arguments join two [B, C, H, W] maps along C, one of them static."""
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    tensors = args[0]
    return (
        set(kwargs) <= {"dim"}
        and len(tensors) == 2
        and all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in tensors)
        and dim in (1, -3)
        and len({(t.shape[0], *t.shape[2:], t.dtype) for t in tensors}) == 1
        and any(maps.is_static(t) for t in tensors)
    )


class HostPrefetcher:
    """Reads a host-resident cache on a device, copying only what each step reads.

    A sparse step names the maps it reads with `load(step, names)`: they are copied into
    static device buffers, one per name, which `get` returns whatever step it is asked for,
    so a CUDA graph captured over them replays on every step's data. While step t runs, the
    same maps of step t+1 are copied into staging buffers on a side stream, and `load(t+1)`
    then copies only device to device. Any other read (the latents a capture step diffs
    against, the solver history) copies the one tensor it asks for. Without CUDA the copies
    are synchronous, so the same path runs (and is tested) on a CPU.
    """

    def __init__(self, cache: ActivationCache, device: torch.device | str) -> None:
        self.cache, self.device = cache, torch.device(device)
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.buffers: dict[str, torch.Tensor] = {}
        self.loaded: tuple[int, frozenset[str]] | None = None
        """The step and names whose maps the static buffers hold."""
        self._staging: dict[str, torch.Tensor] = {}
        self._staged: tuple[int, frozenset[str], torch.cuda.Event | None] | None = None
        self.copied: dict[int, dict[str, int]] = {}
        """Bytes copied from host memory, by step and name (prefetches included)."""

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The whole host-resident buffers."""
        return self.cache.tensors

    @property
    def copied_bytes(self) -> int:
        return sum(sum(names.values()) for names in self.copied.values())

    def load(self, step: int, names: frozenset[str]) -> None:
        """Puts the maps `names` of `step` in the static buffers, and starts copying those
        of step + 1. Steps are loaded in increasing order, as the denoise loop runs them."""
        staged = self._staged
        if staged is not None and staged[:2] == (step, names):
            if staged[2] is not None:
                torch.cuda.current_stream(self.device).wait_event(staged[2])
            sources = self._staging
        else:
            sources = {name: self._on_host(name, step) for name in names}
        for name in names:
            self._buffer(self.buffers, name).copy_(sources[name], non_blocking=True)
        self.loaded = (step, names)
        self._prefetch(step + 1, names)

    def get(self, name: str, step: int | torch.Tensor) -> torch.Tensor:
        """`name` at `step`: a static buffer if `load` put it there (whatever `step` is when
        it is an index tensor: a captured step replays over the buffers), else a copy."""
        step_loaded, names = self.loaded or (None, frozenset())
        if name in names and (isinstance(step, torch.Tensor) or step == step_loaded):
            return self.buffers[name]
        if isinstance(step, torch.Tensor):
            raise KeyError(
                f"{name!r} is not among the maps loaded for this step: a captured step reads "
                "only what `load` was given"
            )
        return self._on_host(name, step).to(self.device, non_blocking=True)

    def _on_host(self, name: str, step: int) -> torch.Tensor:
        tensor = self.cache.get(name, step)
        step_copies = self.copied.setdefault(step, {})
        step_copies[name] = step_copies.get(name, 0) + tensor.numel() * tensor.element_size()
        return tensor

    def _buffer(self, buffers: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        if name not in buffers:
            # Laid out like one step of the cache (channels_last maps stay so).
            buffers[name] = torch.empty_like(self.cache.tensors[name][0], device=self.device)
        return buffers[name]

    def _prefetch(self, step: int, names: frozenset[str]) -> None:
        if step >= self.cache.steps:
            self._staged = None
            return
        if self.stream is None:
            for name in names:
                self._buffer(self._staging, name).copy_(self._on_host(name, step))
            self._staged = (step, names, None)
            return
        staging = {name: self._buffer(self._staging, name) for name in names}
        # The staging buffers are free once the main stream has copied them to the static ones.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for name, buffer in staging.items():
                buffer.record_stream(self.stream)  # not freed before its copies are done
                buffer.copy_(self._on_host(name, step), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self._staged = (step, names, done)
