"""Where a Triton kernel can run: compiled on CUDA tensors, interpreted on CPU ones.

`triton.jit` chooses between compiling and Triton's CPU interpreter once, when the kernel
(and triton.language itself) is imported, from TRITON_INTERPRET. The test suite sets it
before anything imports Triton when no GPU is present.

Every launch goes through `launcher`, so `recording_launches` can collect them instead of
running them: `fisedit.engine.kernels.aot` compiles what it collected for a GPU target.
"""

import functools
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
