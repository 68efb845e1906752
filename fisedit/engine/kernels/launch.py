"""Where a Triton kernel can run: compiled on CUDA tensors, interpreted on CPU ones.

`triton.jit` chooses between compiling and Triton's CPU interpreter once, when the kernel
(and triton.language itself) is imported, from TRITON_INTERPRET. The test suite sets it
before anything imports Triton when no GPU is present.

Every launch goes through `launcher`, so `recording_launches` can collect them instead of
running them: `fisedit.engine.kernels.aot` compiles what it collected for a GPU target.

Kernels that read or write a per-step cache take the map as a `StepView` (the whole
[steps, ...] buffer and a step index in device memory) and add the step's offset
themselves, so one captured graph serves every step; `step_addressed` gives them what to
point at, for views and plain tensors alike.
"""

import functools
import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel, its grid, and its arguments as the caller gave them."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class StepView:
    """Step `step` of a per-step buffer [steps, *shape], with the step index in device
    memory: a map that kernels address without the host knowing the step. Shape, strides
    and dtype are those of one step's map."""

    buffer: torch.Tensor
    step: torch.Tensor
    """A one-element int64 tensor on the buffer's device."""

    @property
    def shape(self) -> torch.Size:
        return self.buffer.shape[1:]

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def stride(self) -> tuple[int, ...]:
        return self.buffer.stride()[1:]

    def dim(self) -> int:
        return self.buffer.dim() - 1

    def read(self) -> torch.Tensor:
        """A copy of the step's map (indexing keeps a channels_last map channels_last)."""
        return self.buffer[self.step.reshape(1)][0]

    def write(self, value: torch.Tensor) -> None:
        """Sets the step's map to `value`."""
        self.buffer.index_copy_(0, self.step.reshape(1), value[None].to(self.dtype))


@dataclass(frozen=True)
class ChannelConcat:
    """Two maps [B, C1, H, W] and [B, C2, H, W] (tensors or StepViews) joined along channels
    without a copy: kernels that take one read each channel from its part (the input of a
    resnet after a skip connection)."""

    first: "torch.Tensor | StepView"
    second: "torch.Tensor | StepView"

    @property
    def shape(self) -> torch.Size:
        batch, channels, height, width = self.first.shape
        return torch.Size((batch, channels + self.second.shape[1], height, width))

    @property
    def dtype(self) -> torch.dtype:
        return self.first.dtype

    @property
    def device(self) -> torch.device:
        return self.first.device

    def dim(self) -> int:
        return 4

    def read(self) -> torch.Tensor:
        """The joined map, copied."""
        return torch.cat([_read(self.first), _read(self.second)], dim=1)


def _read(map_: "torch.Tensor | StepView | ChannelConcat") -> torch.Tensor:
    return map_.read() if isinstance(map_, StepView | ChannelConcat) else map_


@dataclass(frozen=True)
class PartAddress:
    """Where a kernel finds one part of a map: the tensor to point at, the step pointer, and
    the strides (between steps, then of the map's four dimensions)."""

    base: torch.Tensor
    step: torch.Tensor
    strides: tuple[int, ...]


def part_addresses(
    map_: "torch.Tensor | StepView | ChannelConcat",
) -> tuple[PartAddress, PartAddress, int]:
    """The two parts of a ChannelConcat as a kernel addresses them, and the first part's
    channel count; a single map is its own first part, and repeated as the second."""
    first, second = (map_.first, map_.second) if isinstance(map_, ChannelConcat) else (map_,) * 2

    def address(part) -> PartAddress:
        base, step, step_stride = step_addressed(part)
        return PartAddress(base, step, (step_stride, *part.stride()))

    return address(first), address(second), first.shape[1]


def step_addressed(map_: "torch.Tensor | StepView") -> tuple[torch.Tensor, torch.Tensor, int]:
    """What a kernel gets for a map: the tensor to point at, a pointer to the step index and
    the stride between steps. A plain tensor is its own step 0."""
    if isinstance(map_, StepView):
        return map_.buffer, map_.step, map_.buffer.stride(0)
    return map_, _step_zero(map_.device), 0


@functools.cache
def _step_zero(device: torch.device) -> torch.Tensor:
    # One per device, made on first use (before any graph capture: its warm-up call runs
    # the same launches eagerly).
    return torch.zeros(1, dtype=torch.int64, device=device)


def with_step_views(reference: Any) -> Any:
    """`reference` (a kernel's PyTorch reference, which writes in place only its `out`
    argument) taking StepViews and ChannelConcats too: they are read into tensors, and a
    view given as `out` is written back, and stands for the map in what the reference
    returns."""
    out = _out_position(reference)

    @functools.wraps(reference)
    def call(*args):
        tensors = [_read(a) for a in args]
        result = reference(*tensors)
        if out is None or out >= len(args) or not isinstance(args[out], StepView):
            return result
        args[out].write(tensors[out])
        view, tensor = args[out], tensors[out]
        if isinstance(result, tuple):
            return tuple(view if r is tensor else r for r in result)
        return view if result is tensor else result

    return call


@functools.cache
def _out_position(reference: Any) -> int | None:
    names = list(inspect.signature(reference).parameters)
    return names.index("out") if "out" in names else None


@dataclass
class _Recording:
    launches: list[Launch]
    multiprocessors: int | None


@dataclass
class _RecordedKernel:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` appends a Launch."""

    kernel: Any
    recording: _Recording

    def __getitem__(self, grid: tuple[int, ...]):
        def record(*args, **kwargs) -> None:
            self.recording.launches.append(Launch(self.kernel, tuple(grid), args, kwargs))

        return record


_recording: list[_Recording] = []


@contextmanager
def recording_launches(multiprocessors: int | None = None) -> Iterator[list[Launch]]:
    """Within this block kernel launches are recorded, on any device (meta too), and not run.

    Outputs the kernels would have written stay as allocated, so only the launches, not
    the values computed around them, mean anything. `multiprocessors` makes launch
    heuristics size their grids as for a GPU with that many SMs (an H100 SXM has 132).
    """
    recording = _Recording([], multiprocessors)
    _recording.append(recording)
    try:
        yield recording.launches
    finally:
        _recording.remove(recording)


def multiprocessors(device: torch.device) -> int | None:
    """The SM count grids are sized for: the recording's target, else the CUDA device's
    (None on other devices)."""
    if _recording and _recording[-1].multiprocessors is not None:
        return _recording[-1].multiprocessors
    return _cuda_multiprocessors(device) if device.type == "cuda" else None


@functools.cache
def _cuda_multiprocessors(device: torch.device) -> int:
    # Cached: launch heuristics ask per layer per step.
    return torch.cuda.get_device_properties(device).multi_processor_count


def interpreting() -> bool:
    """Whether this process runs Triton kernels under the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def runs_interpreted(device: torch.device) -> bool:
    """Whether a launch on `device` now runs in Triton's interpreter (not recorded): there
    each op takes a whole tile at once, so larger tiles cost less, and registers do not
    bound them."""
    return device.type == "cpu" and interpreting() and not _recording


def launcher(kernel: Any, device: torch.device) -> Any:
    """`kernel` (a `triton.jit` function), after checking it can run on `device`."""
    if _recording:
        return _RecordedKernel(kernel, _recording[-1])
    if device.type == "cuda" and not interpreting():
        return kernel
    if device.type == "cpu" and interpreting():
        return kernel
    raise RuntimeError(
        f"Triton kernel {kernel.__name__} cannot run on {device.type} tensors here: it needs "
        "CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before Triton is imported."
    )
