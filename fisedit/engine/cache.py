"""Per-step tensors recorded while denoising: the state the next edit reuses."""

import torch

from fisedit.engine.kernels.launch import StepView

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
    ) -> None:
        self.steps = steps
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self.channels_last = channels_last

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
        """A copy on `device`; host copies of a GPU cache are pinned for fast transfers.

        Feature maps keep their memory layout, or take the one `channels_last` names.
        """
        device = torch.device(device)
        pin = device.type == "cpu" and torch.cuda.is_available()
        moved = {}
        for name, tensor in self.tensors.items():
            tensor = tensor.to(device)
            if channels_last is not None and tensor.dim() == 5:
                tensor = _maps_in_layout(tensor, channels_last)
            moved[name] = tensor.pin_memory() if pin else tensor
        keep = self.channels_last if channels_last is None else channels_last
        return ActivationCache(self.steps, moved, keep)

    def reader(self, device: torch.device | str) -> "ActivationCache | HostPrefetcher":
        """Something with `get(name, step)` that returns tensors on `device`."""
        device = torch.device(device)
        if device.type != "cuda" or self.device.type == "cuda":
            return self
        return HostPrefetcher(self, device)


class StepSlots:
    """One step's recorded tensors in static buffers: what a captured UNet call writes,
    whatever step it runs (`ActivationCache.put_step` files them under the step). Feature
    maps are laid out as in an `ActivationCache` with the same `channels_last`."""

    def __init__(self, channels_last: bool = False) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.channels_last = channels_last

    def put(self, name: str, step: int | torch.Tensor, value: torch.Tensor) -> None:
        slot = self.tensors.get(name)
        if slot is None:
            nhwc = _nhwc(value, self.channels_last)
            layout = torch.channels_last if nhwc else torch.preserve_format
            self.tensors[name] = value.clone(memory_format=layout)
        else:
            slot.copy_(value)


class StepMaps:
    """The maps a sparse UNet call records at one step (those its layers recorded in the
    previous version), where it reads and writes them.

    Each starts as the previous version's map (`fill`, one batched copy); the call writes
    its region in place, so the run's cache ends up holding the new maps without further
    copies. With a Python step every map is a view of the run's cache at the step. With a
    step index in device memory (a captured graph replays one call for every step) a view
    cannot follow the step: layer outputs (`<layer>.out`), which the UNet's own ops read, go
    to static slots that `file` copies into the cache after the call; every other map is a
    StepView of the cache, which kernels address at the index.
    """

    def __init__(
        self,
        record: ActivationCache,
        source: "ActivationCache | HostPrefetcher",
        step: int | torch.Tensor,
    ) -> None:
        self.record = record
        self.maps: dict[str, torch.Tensor | StepView] = {}
        self.slots: dict[str, torch.Tensor] = {}
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
            elif name.endswith(".out"):
                self.maps[name] = self.slots[name] = torch.empty_like(buffer[0])
            else:
                self.maps[name] = StepView(buffer, step.reshape(1))

    def __getitem__(self, name: str) -> torch.Tensor | StepView:
        return self.maps[name]

    def fill(self, source: "ActivationCache | HostPrefetcher", step: int) -> None:
        """Sets every map to `source`'s at `step`."""
        targets = [
            self.slots[name] if name in self.slots else self.record.tensors[name][step]
            for name in self.maps
        ]
        torch._foreach_copy_(targets, [source.get(name, step) for name in self.maps])

    def put(self, name: str, step: int | torch.Tensor, value: torch.Tensor) -> None:
        """Records `value` as this step's map `name`, unless the call wrote it in place."""
        target = self.maps[name]
        if value is target:
            return
        if isinstance(target, StepView):
            target.write(value)
        else:
            target.copy_(value)

    def file(self, step: int) -> None:
        """Copies the slots into the run's cache at `step`."""
        if self.slots:
            self.record.put_step(step, self.slots)


class HostPrefetcher:
    """Reads a host-resident cache on a GPU: the first read of step t waits for its copy
    and starts copying step t+1 on a side stream, so transfers overlap compute.

    Steps must be read in non-decreasing order, as the denoise loop does.
    """

    def __init__(self, cache: ActivationCache, device: torch.device) -> None:
        self.cache, self.device = cache, device
        self.stream = torch.cuda.Stream(device)
        self.steps: dict[int, tuple[dict[str, torch.Tensor], torch.cuda.Event]] = {}
        self.current = -1

    def _copy(self, step: int) -> None:
        if step >= self.cache.steps or step in self.steps:
            return
        with torch.cuda.stream(self.stream):
            tensors = {
                name: t[step].to(self.device, non_blocking=True)
                for name, t in self.cache.tensors.items()
            }
            done = torch.cuda.Event()
            done.record(self.stream)
        self.steps[step] = (tensors, done)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The whole host-resident buffers."""
        return self.cache.tensors

    def get(self, name: str, step: int) -> torch.Tensor:
        if step != self.current:
            self._copy(step)
            tensors, done = self.steps[step]
            main = torch.cuda.current_stream(self.device)
            main.wait_event(done)
            for tensor in tensors.values():
                # The copies were allocated on the side stream but are used on the main one.
                tensor.record_stream(main)
            self.steps = {s: v for s, v in self.steps.items() if s >= step}
            self.current = step
            self._copy(step + 1)
        try:
            return self.steps[step][0][name]
        except KeyError:
            raise KeyError(f"nothing recorded under {name!r}") from None
