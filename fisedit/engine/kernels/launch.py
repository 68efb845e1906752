"""Where a Triton kernel can run: compiled on CUDA tensors, interpreted on CPU ones.

`triton.jit` chooses between compiling and Triton's CPU interpreter once, when the kernel
(and triton.language itself) is imported, from TRITON_INTERPRET. The test suite sets it
before anything imports Triton when no GPU is present.

Every launch goes through `launcher`, so `recording_launches` can collect them instead of
running them: `fisedit.engine.kernels.aot` compiles what it collected for a GPU target.
"""

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


class _Recorder:
    def __init__(self, kernel: Any, log: list[Launch]) -> None:
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid: tuple[int, ...]):
        def record(*args, **kwargs) -> None:
            self.log.append(Launch(self.kernel, tuple(grid), args, kwargs))

        return record


_recording: list[list[Launch]] = []


@contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Within this block kernel launches are recorded, on any device, and not run.

    Outputs the kernels would have written stay as allocated, so only the launches, not
    the values computed around them, mean anything.
    """
    log: list[Launch] = []
    _recording.append(log)
    try:
        yield log
    finally:
        _recording.remove(log)


def interpreting() -> bool:
    """Whether this process runs Triton kernels under the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def launcher(kernel: Any, device: torch.device) -> Any:
    """`kernel` (a `triton.jit` function), after checking it can run on `device`."""
    if _recording:
        return _Recorder(kernel, _recording[-1])
    if device.type == "cuda" and not interpreting():
        return kernel
    if device.type == "cpu" and interpreting():
        return kernel
    raise RuntimeError(
        f"Triton kernel {kernel.__name__} cannot run on {device.type} tensors here: it needs "
        "CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before Triton is imported."
    )
